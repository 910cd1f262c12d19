"""A synthetic run directory in the exact output schemas of every stage the report reads.

For the report's tests and its size benchmark (`benchmarks/report_size.py`): documents
made of short arithmetic reasoning traces, per-token activations in which each feature
fires on a few trigger tokens (plus noise), top-k contexts and statistics computed from
those activations, a sparse SAE encoding, explanations, categories, evaluation and
ablation tables. Each stage is written through `run_stage`, so its manifest and `_SUCCESS`
marker are real. `evil=True` puts HTML/JS injection strings into tokens, explanations,
categories and benchmark names, for the escaping tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rank1_core.config import LORA_MODULES
from rank1_core.rundir import RunDir, StageRun, run_stage

EVIL = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "</script><script>alert(2)</script>",
        "<b onmouseover=alert(3)>x</b>"]
CATEGORIES = [("math_operators", "Mathematical Operators"), ("numbers", "Numbers and Quantities"),
              ("discourse_markers", "Discourse and Reasoning Markers"), ("procedural_markers", "Procedural Markers"),
              ("formatting", "Formatting Tokens")]
TEMPLATES = [
    "Let me add {a} and {b}. {a} + {b} = {c}. Wait, let me double-check: {b} + {a} = {c}. So the answer is {c}.",
    "First, compute {a} times {b}. Hmm, {a} * {b} = {d}. Then subtract {a}: {d} - {a} = {e}.\nThe result is {e}.",
    "We need {a} + {b} + {a}. Step 1: {a} + {b} = {c}. Step 2: {c} + {a} = {f}. Wait, is that right? Yes, {f}.",
    "Okay, so the question asks for {b} minus {a}. That is {g}. Hmm, let me verify: {a} + {g} = {b}. Correct.",
]


def tokenize(text: str) -> list[str]:
    return re.findall(r" ?[A-Za-z]+| ?\d|[^\w\s]| ?[=+*-]|\n", text)


def make_docs(n_docs: int, doc_len: int, rng: np.random.Generator, evil: bool) -> list[list[str]]:
    docs = []
    for d in range(n_docs):
        toks = ["<|im_start|>", "assistant", "\n"]
        while len(toks) < doc_len:
            a, b = int(rng.integers(1, 9)), int(rng.integers(1, 9))
            t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            toks += tokenize(t.format(a=a, b=b, c=a + b, d=a * b, e=a * b - a, f=2 * a + b, g=b - a)) + ["\n"]
        toks = toks[:doc_len]
        if evil:
            for j, e in enumerate(EVIL):
                toks[5 + 7 * j] = e
        docs.append(toks)
    return docs


@dataclass
class SyntheticSpec:
    layers: int = 2
    neurons: int = 4
    """Neurons per layer (the extract stage's mlp_neurons)."""
    sae_latents: int = 32
    docs: int = 8
    doc_len: int = 96
    k: int = 8
    """Top contexts per feature and sign."""
    before: int = 8
    after: int = 4
    seed: int = 0
    evil: bool = False
    docs_per_file: int = 4


def _stage(run: RunDir, name: str, body) -> dict:
    return run_stage(run.stage(name), f"synthetic-{name}", f"# synthetic {name}\n", body, log=lambda m: None)


def _write(sr: StageRun, rel: str, table: pa.Table | pd.DataFrame) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    path = sr.stage.path(rel)
    sr.stage.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with sr.stage.fs.open_output_stream(path) as f:
        pq.write_table(table, f)
    sr.rows[rel] = table.num_rows


def _features(keys: list[str], vocab: list[str], rng: np.random.Generator) -> dict[str, tuple[set, set]]:
    """Each feature: tokens it fires on positively and negatively."""
    out = {}
    for k in keys:
        pos = set(rng.choice(vocab, size=int(rng.integers(1, 4)), replace=False).tolist())
        neg = set(rng.choice(vocab, size=int(rng.integers(1, 3)), replace=False).tolist()) - pos
        out[k] = (pos, neg)
    return out


def _activations(docs: list[list[str]], keys: list[str], triggers: dict, rng: np.random.Generator,
                 noise: float = 0.15) -> np.ndarray:
    """(tokens, features) float32: trigger tokens fire, everything else is small noise."""
    flat = [t for d in docs for t in d]
    vocab = sorted(set(flat))
    vi = {t: i for i, t in enumerate(vocab)}
    ids = np.array([vi[t] for t in flat])
    gain = np.zeros((len(vocab), len(keys)), dtype=np.float32)
    for j, k in enumerate(keys):
        pos, neg = triggers[k]
        for t in pos:
            if t in vi:
                gain[vi[t], j] = rng.uniform(1.0, 3.0)
        for t in neg:
            if t in vi:
                gain[vi[t], j] = -rng.uniform(0.5, 2.0)
    x = gain[ids] * rng.uniform(0.6, 1.0, size=(len(ids), 1)).astype(np.float32)
    x += rng.normal(0, noise, size=x.shape).astype(np.float32)
    return x


def _topk(x: np.ndarray, doc_of: np.ndarray, pos_of: np.ndarray, docs: list[list[str]], keys: list[str],
          source: str, spec: SyntheticSpec) -> tuple[pa.Table, pd.DataFrame]:
    rows = {c: [] for c in ("source", "feature", "sign", "rank", "doc_id", "pos", "value", "context_token_ids",
                            "context_tokens", "context_values", "hit_index")}
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    vocab = {t: i for i, t in enumerate(sorted({t for d in docs for t in d}))}
    for j, key in enumerate(keys):
        col = x[:, j]
        for sign, order in (("pos", np.argsort(-col, kind="stable")), ("neg", np.argsort(col, kind="stable"))):
            sel = [i for i in order[: spec.k] if (col[i] > 0 if sign == "pos" else col[i] < 0)]
            for rank, i in enumerate(sel, 1):
                d, p = int(doc_of[i]), int(pos_of[i])
                lo, hi = max(0, p - spec.before), min(len(docs[d]), p + spec.after + 1)
                toks = docs[d][lo:hi]
                rows["source"].append(source)
                rows["feature"].append(key)
                rows["sign"].append(sign)
                rows["rank"].append(rank)
                rows["doc_id"].append(d)
                rows["pos"].append(p)
                rows["value"].append(float(col[i]))
                rows["context_token_ids"].append([vocab[t] for t in toks])
                rows["context_tokens"].append(toks)
                rows["context_values"].append(x[starts[d] + lo: starts[d] + hi, j].tolist())
                rows["hit_index"].append(p - lo)
    schema = pa.schema([("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()),
                        ("rank", pa.int32()), ("doc_id", pa.int64()), ("pos", pa.int32()), ("value", pa.float32()),
                        ("context_token_ids", pa.list_(pa.int32())), ("context_tokens", pa.list_(pa.string())),
                        ("context_values", pa.list_(pa.float32())), ("hit_index", pa.int32())])
    ctx = pa.table(rows, schema=schema)
    stats = pd.DataFrame({"source": source, "feature": keys, "n_tokens": len(x), "mean": x.mean(0),
                          "std": x.std(0), "min": x.min(0), "max": x.max(0), "frac_active": (x > 0).mean(0)})
    return ctx, stats


def make_synthetic_run(run_dir: str, spec: Optional[SyntheticSpec] = None,
                       stages: Iterable[str] = ("train", "train_full", "evaluate", "ablate", "extract", "topk",
                                                "sae", "autointerp")) -> RunDir:
    """Write the outputs of the listed stages into `run_dir` (any subset: a partial run)."""
    spec = spec or SyntheticSpec()
    stages = set(stages)
    rng = np.random.default_rng(spec.seed)
    run = RunDir(run_dir)
    docs = make_docs(spec.docs, spec.doc_len, rng, spec.evil)
    vocab = sorted({t for d in docs for t in d})
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    pos_of = np.concatenate([np.arange(len(d)) for d in docs])
    adapter = [f"L{l:02d}_{m}" for l in range(spec.layers) for m in LORA_MODULES]
    neurons = [f"N{l:02d}_{i:04d}" for l in range(spec.layers) for i in range(spec.neurons)]
    sae_keys = [f"F{i:05d}" for i in range(spec.sae_latents)]
    trig = _features(adapter + neurons + sae_keys, vocab, rng)
    xa = _activations(docs, adapter, trig, rng)
    xn = _activations(docs, neurons, trig, rng)
    xs = np.maximum(_activations(docs, sae_keys, trig, rng, noise=0.05), 0)
    live = np.ones(spec.sae_latents, dtype=bool)
    live[:: 7] = False
    xs[:, ~live] = 0
    xs[xs < 0.2] = 0

    def files():
        for s in range(0, spec.docs, spec.docs_per_file):
            yield s, min(spec.docs, s + spec.docs_per_file)

    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])

    if "train" in stages or "train_full" in stages:
        for name in ("train", "train_full"):
            if name not in stages:
                continue

            def body(sr, name=name):
                n = 20
                step = np.arange(1, n + 1)
                loss = 2.5 * np.exp(-step / 8) + 0.6 + rng.normal(0, 0.02, n)
                _write(sr, "metrics.parquet", pd.DataFrame({
                    "step": step, "epoch": step * 2 // n, "loss": loss, "lr": 1e-3 * np.minimum(1, step / 3),
                    "tokens": step * 4096, "tokens_per_s": rng.uniform(400, 500, n),
                    "heldout_loss": np.where(step % 5 == 0, loss + 0.1, np.nan)}))
            _stage(run, name, body)

    if "evaluate" in stages:
        def body(sr):
            benches = ["arith-heldout", "math500"] + (['<img src=x onerror=alert(4)>'] if spec.evil else [])
            rows = []
            for b in benches:
                for v, p in (("base", 0.12), ("lora", 0.70), ("full", 0.76)):
                    rows.append({"variant": v, "benchmark": b, "n_problems": 50, "n_samples": 1,
                                 "pass1": p + rng.normal(0, 0.02), "stderr": 0.05})
            s = pd.DataFrame(rows)
            _write(sr, "summary.parquet", s)
            s.to_csv(sr.stage.local_path("table1.csv"), index=False)
            sr.stage.write_text("table1.md", "| synthetic |\n|---|\n")
            _write(sr, "samples.parquet", pd.DataFrame({
                "variant": "base", "benchmark": "arith-heldout", "problem_id": ["p0"], "sample": [0],
                "response": ["4"], "extracted": ["4"], "correct": [True], "n_tokens": [3], "finished": [True],
                "backend": ["transformers"], "lora_mode": [None]}))
        _stage(run, "evaluate", body)

    if "ablate" in stages:
        def body(sr):
            comp = []
            for l in range(spec.layers):
                for m in LORA_MODULES:
                    kind = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "attn"
                    base = (0.02 if kind == "mlp" else 0.004) * (1 + l) * (3 if m == "gate_proj" else 1)
                    comp.append({"column": f"L{l:02d}_{m}", "layer": l, "module": m, "kind": kind,
                                 "kl_mean": base * rng.uniform(0.7, 1.3), "kl_sem": base * 0.1, "n_tokens": 1000})
            _write(sr, "kl_components.parquet", pd.DataFrame(comp))
            _write(sr, "kl_layers.parquet", pd.DataFrame({
                "layer": np.arange(spec.layers), "kl_mean": 0.05 * (1 + np.arange(spec.layers)),
                "kl_sem": 0.005, "n_tokens": 1000}))
            g = []
            for b in ("arith-heldout", "math500"):
                for grp, p in (("attn", 0.6), ("mlp", 0.2)):
                    g.append({"group": grp, "variant": f"{grp}_ablated", "benchmark": b, "pass1": p,
                              "kl_mean": 0.3 if grp == "mlp" else 0.05, "n_tokens": 1000})
            gdf = pd.DataFrame(g)
            _write(sr, "groups.parquet", gdf)
            gdf.to_csv(sr.stage.local_path("table2.csv"), index=False)
            sr.stage.write_text("table2.md", "| synthetic |\n|---|\n")
        _stage(run, "ablate", body)

    if "extract" in stages:
        def body(sr):
            _write(sr, "components.parquet", pd.DataFrame({
                "component_id": np.arange(len(adapter)), "column": adapter,
                "layer": [int(c[1:3]) for c in adapter], "module": [c[4:] for c in adapter],
                "kind": ["mlp" if c[4:] in ("gate_proj", "up_proj", "down_proj") else "attn" for c in adapter],
                "a_norm": rng.uniform(0.5, 1.5, len(adapter)), "b_norm": rng.uniform(0.01, 0.1, len(adapter))}))
            _write(sr, "neuron_catalogue.parquet", pd.DataFrame({
                "column": neurons, "layer": [int(c[1:3]) for c in neurons], "neuron": [int(c[4:]) for c in neurons]}))
            tid = {t: i for i, t in enumerate(vocab)}
            for fi, (a, b) in enumerate(files()):
                sl = slice(starts[a], starts[b])
                ids = pd.DataFrame({"doc_id": doc_of[sl].astype(np.int64), "pos": pos_of[sl].astype(np.int32)})
                toks = [t for d in docs[a:b] for t in d]
                _write(sr, f"tokens/part-{fi:05d}.parquet", ids.assign(
                    token_id=np.array([tid[t] for t in toks], dtype=np.int32), token=toks,
                    split=["train"] * len(toks)))
                _write(sr, f"activations/part-{fi:05d}.parquet", _wide(ids, [tid[t] for t in toks], adapter, xa[sl]))
                _write(sr, f"neurons/part-{fi:05d}.parquet", _wide(ids, None, neurons, xn[sl]))
        _stage(run, "extract", body)

    if "sae" in stages:
        def body(sr):
            n = 30
            step = np.arange(1, n + 1)
            _write(sr, "metrics.parquet", pd.DataFrame({
                "step": step, "tokens": step * 256, "loss": 1.2 * np.exp(-step / 10) + 0.2, "mse": np.exp(-step / 10),
                "aux_loss": 0.1 * np.exp(-step / 5), "fvu": 0.9 * np.exp(-step / 12) + 0.1, "l0": 4.0,
                "dead_fraction": np.linspace(0.3, 0.12, n), "lr": 3e-3, "threshold": 0.2}))
            _write(sr, "latents.parquet", pd.DataFrame({
                "feature": np.arange(spec.sae_latents, dtype=np.int32), "name": sae_keys, "live": live,
                "dead_in_training": ~live, "count": (xs > 0).sum(0), "freq": (xs > 0).mean(0),
                "mean_act": xs.mean(0), "max_act": xs.max(0)}))
            for fi, (a, b) in enumerate(files()):
                sl = slice(starts[a], starts[b])
                r, c = np.nonzero(xs[sl])
                _write(sr, f"features/part-{fi:05d}.parquet", pa.table({
                    "doc_id": pa.array(doc_of[sl][r], pa.int64()), "pos": pa.array(pos_of[sl][r], pa.int32()),
                    "feature": pa.array(c, pa.int32()), "value": pa.array(xs[sl][r, c], pa.float32())}))
            sr.extra.update({"fvu": 0.12, "nmse": 0.11, "l0": 4.0, "live_features": int(live.sum()),
                             "latents": spec.sae_latents})
        _stage(run, "sae", body)

    if "topk" in stages:
        def body(sr):
            parts, stats = [], []
            for src, keys, x in (("adapter", adapter, xa), ("neuron", neurons, xn),
                                 ("sae", [k for k, l in zip(sae_keys, live) if l], xs[:, live])):
                c, s = _topk(x, doc_of, pos_of, docs, keys, src, spec)
                parts.append(c)
                stats.append(s)
            _write(sr, "contexts.parquet", pa.concat_tables(parts))
            _write(sr, "stats.parquet", pd.concat(stats, ignore_index=True))
        _stage(run, "topk", body)

    if "autointerp" in stages:
        def body(sr):
            rows = []
            cats = list(CATEGORIES) + ([("evil_cat", EVIL[1] + " category")] if spec.evil else [])
            for src, keys in (("adapter", adapter), ("neuron", neurons),
                              ("sae", [k for k, l in zip(sae_keys, live) if l])):
                for i, k in enumerate(keys):
                    pos, _ = trig[k]
                    expl = "fires on " + ", ".join(repr(t) for t in sorted(pos))
                    if spec.evil and i == 0:
                        expl = EVIL[0] + " and " + EVIL[1]
                    cls = [0, 0, 1, 2, None][int(rng.integers(5))] if src != "sae" else [0, 0, 0, 1, 2][int(rng.integers(5))]
                    if src != "sae" and i % 2 == 0:  # autointerp explains each sign; SAE features are >= 0
                        neg = "negative on " + ", ".join(repr(t) for t in sorted(trig[k][1])) if trig[k][1] else None
                        rows.append({"source": src, "feature": k, "sign": "neg", "explanation": neg,
                                     "classification": 1 if neg else None, "classification_reasoning": "synthetic",
                                     "category": cats[i % len(cats)][0] if neg else None,
                                     "score": 0.5 if neg else None, "model": "synthetic-llm",
                                     "error": None if neg else "no negative activations"})
                    rows.append({"source": src, "feature": k, "sign": "pos", "explanation": None if i == 1 else expl,
                                 "classification": None if i == 1 else cls,
                                 "classification_reasoning": "synthetic", "category": None if i == 1 else
                                 cats[(i + len(src)) % len(cats)][0],
                                 "score": None if i == 1 else float(np.clip(rng.normal(0.7 if cls == 0 else 0.5, 0.15), 0, 1)),
                                 "model": "synthetic-llm", "error": "timeout" if i == 1 else None})
            df = pd.DataFrame(rows)
            df["classification"] = df["classification"].astype("Int64")
            _write(sr, "explanations.parquet", df)
            sr.stage.write_json("categories.json", {"categories": [
                {"string_id": sid, "name": name, "definition": "synthetic", "examples": []} for sid, name in cats],
                "summary": "synthetic"})
            n = 12
            _write(sr, "calls.parquet", pd.DataFrame({
                "time": np.arange(n, dtype=float), "task": ["explain", "classify", "categorize", "score"] * (n // 4),
                "model": "synthetic-llm", "cached": [False, True] * (n // 2), "tokens_in": 900, "tokens_out": 40,
                "cost_usd": 0.0004, "latency_s": 0.8, "status": ["ok"] * (n - 1) + ["error"],
                "error": [None] * (n - 1) + ["timeout"]}))
        _stage(run, "autointerp", body)
    return run


def _wide(ids: pd.DataFrame, token_ids: Optional[list[int]], columns: list[str], x: np.ndarray) -> pa.Table:
    arrays = [pa.array(ids["doc_id"].to_numpy(), pa.int64()), pa.array(ids["pos"].to_numpy(), pa.int32())]
    names = ["doc_id", "pos"]
    if token_ids is not None:
        arrays.append(pa.array(token_ids, pa.int32()))
        names.append("token_id")
    for j, c in enumerate(columns):
        arrays.append(pa.array(x[:, j], pa.float32()))
        names.append(c)
    return pa.table(arrays, names=names)
