"""A synthetic run directory in the exact output schemas of every stage the report reads.

For the report's tests and its size benchmark (`benchmarks/report_size.py`): documents
made of short arithmetic reasoning traces, per-token activations in which each feature
fires on a few trigger tokens (plus noise), top-k contexts and statistics computed from
those activations, a sparse SAE encoding, explanations, categories, evaluation and
ablation tables. Each stage is written through `run_stage`, so its manifest and `_SUCCESS`
marker are real. `evil=True` puts HTML/JS injection strings into tokens, explanations,
categories and benchmark names, for the escaping tests. `transcoder=True` also writes the
transcoder stages (faithfulness, per-layer FVE, training metrics; sparse latents in the SAE
layout with two hesitation features firing on ' Wait' / ' Hmm'; the benchmarks with the
adapters, hesitation features ablated and a random control) and transcoder rows in topk and
autointerp, in the schemas of `ray_jobs/transcoder*.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

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
    transcoder: bool = False
    """Also write the transcoder stages (those listed in `stages`) and, with transcoder_extract
    listed, transcoder rows in topk and autointerp."""
    transcoder_latents: int = 12
    """Latents per adapted layer (d_latent): feature l * d_latent + i is latent i of layer l."""
    transcoder_problems: int = 20
    """Problems per benchmark in transcoder_eval (evaluate has 50: transcoder_eval.limit)."""


def _stage(run: RunDir, name: str, body) -> dict:
    return run_stage(run.stage(name), f"synthetic-{name}", f"# synthetic {name}\n", body, log=lambda m: None)


def _write(sr: StageRun, rel: str, table: pa.Table | pd.DataFrame) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    sr.stage.write_parquet(rel, table)
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


TRANSCODER_STAGES = ("transcoder", "transcoder_extract", "transcoder_eval")


def make_synthetic_run(run_dir: str, spec: Optional[SyntheticSpec] = None,
                       stages: Iterable[str] = ("train", "train_full", "evaluate", "ablate", "extract", "topk",
                                                "sae", "autointerp", *TRANSCODER_STAGES)) -> RunDir:
    """Write the outputs of the listed stages into `run_dir` (any subset: a partial run).
    The transcoder stages are written only with `spec.transcoder`."""
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
    benches = ["arith-heldout", "math500"] + (['<img src=x onerror=alert(4)>'] if spec.evil else [])
    tc = _transcoder_features(spec, docs, vocab) if spec.transcoder else None
    tc_ranked = tc is not None and "transcoder_extract" in stages  # topk ranks them once they are extracted

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
            rows = []
            for b in benches:
                for v, p in (("base", 0.12), ("lora", 0.70), ("full", 0.76)):
                    rows.append({"variant": v, "benchmark": b, "n_problems": 50, "n_samples": 1,
                                 "pass1": p + rng.normal(0, 0.02), "stderr": 0.05})
            s = pd.DataFrame(rows)
            _write(sr, "summary.parquet", s)
            sr.stage.write_text("table1.csv", s.to_csv(index=False))
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
            sr.stage.write_text("table2.csv", gdf.to_csv(index=False))
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
            sources = [("adapter", adapter, xa), ("neuron", neurons, xn),
                       ("sae", [k for k, l in zip(sae_keys, live) if l], xs[:, live])]
            if tc_ranked:
                sources.append(("transcoder", [k for k, l in zip(tc["keys"], tc["live"]) if l], tc["x"][:, tc["live"]]))
            for src, keys, x in sources:
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
            sources = [("adapter", adapter), ("neuron", neurons), ("sae", [k for k, l in zip(sae_keys, live) if l])]
            if tc_ranked:
                sources.append(("transcoder", [k for k, l in zip(tc["keys"], tc["live"]) if l]))
            for src, keys in sources:
                triggers = tc["triggers"] if src == "transcoder" else trig  # transcoder keys reuse F%05d
                for i, k in enumerate(keys):
                    pos, _ = triggers[k]
                    expl = "fires on " + ", ".join(repr(t) for t in sorted(pos))
                    if spec.evil and i == 0:
                        expl = EVIL[0] + " and " + EVIL[1]
                    sparse = src in ("sae", "transcoder")
                    cls = [0, 0, 1, 2, None][int(rng.integers(5))] if not sparse else [0, 0, 0, 1, 2][int(rng.integers(5))]
                    if not sparse and i % 2 == 0:  # autointerp explains each sign; sparse features are >= 0
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

    if tc is not None:
        _write_transcoder(run, spec, stages, tc, docs, doc_of, pos_of, starts, vocab, benches, files)
    return run


def _transcoder_features(spec: SyntheticSpec, docs: list[list[str]], vocab: list[str]) -> dict:
    """Transcoder latents (own generator: the other stages' numbers do not move): keys
    F%05d of l * d_latent + i, sparse non-negative activations, every fifth latent dead, and
    two hesitation features (' Wait', ' Hmm') in the last layer."""
    rng = np.random.default_rng([spec.seed, 10])
    d = spec.transcoder_latents
    keys = [f"F{l * d + i:05d}" for l in range(spec.layers) for i in range(d)]
    trig = _features(keys, vocab, rng)
    last = (spec.layers - 1) * d
    hes = []
    for j, word in ((last + 1, " Wait"), (last + 2, " Hmm")):
        if word in vocab:
            trig[keys[j]] = ({word}, set())
            hes.append(j)
    x = np.maximum(_activations(docs, keys, trig, rng, noise=0.05), 0)
    live = np.ones(len(keys), dtype=bool)
    live[3::5] = False
    live[hes] = True
    x[:, ~live] = 0
    x[x < 0.2] = 0
    live = (x > 0).any(axis=0)
    return {"keys": keys, "x": x, "live": live, "triggers": trig, "hesitation": hes, "d_latent": d, "rng": rng}


def _write_transcoder(run: RunDir, spec: SyntheticSpec, stages: set, tc: dict, docs, doc_of, pos_of, starts,
                      vocab, benches, files) -> None:
    rng, x, live, d = tc["rng"], tc["x"], tc["live"], tc["d_latent"]
    n_feat = len(tc["keys"])
    layer_of = np.arange(n_feat) // d
    faith = {"tokens": int(len(x)), "kl_adapted": 0.041, "kl_base": 0.312, "kl_closed": 1 - 0.041 / 0.312,
             "ce_adapted": 1.18, "ce_base": 1.52, "ce_target": 1.11, "top1_agree_adapted": 0.91,
             "top1_agree_base": 0.74, "fve_difference_mean": 0.0, "l0_per_layer": 3.2,
             "live_latents": int(live.sum()), "latents": n_feat, "positions": "all"}
    fve = np.linspace(0.78, 0.41, spec.layers) if spec.layers > 1 else np.array([0.6])
    faith["fve_difference_mean"] = float(fve.mean())

    if "transcoder" in stages:
        def body(sr):
            n = 24
            step = np.arange(1, n + 1)
            _write(sr, "metrics.parquet", pd.DataFrame({
                "step": step, "epoch": (step - 1) * 2 // n, "loss": 1.6 * np.exp(-step / 7) + 0.35,
                "kl": 0.3 * np.exp(-step / 8) + 0.04, "recon": 0.9 * np.exp(-step / 9) + 0.3,
                "sparsity": 0.02 + 0.001 * step, "l0": np.full(n, 3.2), "fve": 0.7 - 0.6 * np.exp(-step / 9),
                "lr": 2e-3 * np.minimum(1, step / 3), "grad_norm": rng.uniform(0.5, 1.5, n), "tokens": step * 1024,
                "tokens_per_s": rng.uniform(140, 160, n), "wall": step * 7.0}))
            sr.stage.write_json("faithfulness.json", faith)
            _write(sr, "faithfulness_layers.parquet", pd.DataFrame({
                "layer": np.arange(spec.layers, dtype=np.int64), "tokens": len(x), "fve_difference": fve,
                "fvu_difference": 1 - fve, "diff_norm": np.linspace(0.8, 2.4, spec.layers),
                "adapter_norm": np.linspace(0.7, 1.7, spec.layers), "l0": 3.2,
                "live_latents": [int(live[layer_of == l].sum()) for l in range(spec.layers)], "d_latent": d}))
            sr.extra.update({"faithfulness": faith})
        _stage(run, "transcoder", body)

    if "transcoder_extract" in stages:
        def body(sr):
            tid = {t: i for i, t in enumerate(vocab)}
            for fi, (a, b) in enumerate(files()):
                sl = slice(starts[a], starts[b])
                r, c = np.nonzero(x[sl])
                _write(sr, f"features/part-{fi:05d}.parquet", pa.table({
                    "doc_id": pa.array(doc_of[sl][r], pa.int64()), "pos": pa.array(pos_of[sl][r], pa.int32()),
                    "feature": pa.array(c, pa.int32()), "value": pa.array(x[sl][r, c], pa.float32())}))
                toks = [t for dd in docs[a:b] for t in dd]
                _write(sr, f"tokens/part-{fi:05d}.parquet", pa.table({
                    "doc_id": pa.array(doc_of[sl], pa.int64()), "pos": pa.array(pos_of[sl], pa.int32()),
                    "token_id": pa.array([tid[t] for t in toks], pa.int32()), "token": toks,
                    "split": ["train"] * len(toks)}))
            count = (x > 0).sum(0)
            _write(sr, "latents.parquet", pa.table({
                "feature": pa.array(np.arange(n_feat), pa.int32()), "name": tc["keys"],
                "layer": pa.array(layer_of, pa.int32()), "latent": pa.array(np.arange(n_feat) % d, pa.int32()),
                "live": pa.array(count > 0), "count": pa.array(count, pa.int64()), "freq": count / len(x),
                "mean_act": np.where(count > 0, x.sum(0) / np.maximum(count, 1), 0.0), "max_act": x.max(0),
                "dec_norm": rng.uniform(0.2, 1.0, n_feat), "enc_norm": rng.uniform(0.5, 1.5, n_feat)}))
            hes = tc["hesitation"]
            other = next(i for i in range(n_feat) if live[i] and i not in hes)
            rows = []
            for j in hes + [other]:
                sel = j in hes
                top = sorted(tc["triggers"][tc["keys"][j]][0]) + ([EVIL[0]] if spec.evil and not sel else [])
                rows.append({"feature": j, "name": tc["keys"][j], "layer": int(layer_of[j]), "latent": j % d,
                             "contexts": 16, "matches": 14 if sel else 3, "share": 14 / 16 if sel else 3 / 16,
                             "selected": sel, "freq": float(count[j] / len(x)), "max_act": float(x[:, j].max()),
                             "top_tokens": top, "next_tokens": [" let", ","]})
            _write(sr, "hesitation_features.parquet", pa.table({
                "feature": pa.array([r["feature"] for r in rows], pa.int32()),
                "name": [r["name"] for r in rows], "layer": pa.array([r["layer"] for r in rows], pa.int32()),
                "latent": pa.array([r["latent"] for r in rows], pa.int32()),
                "contexts": pa.array([r["contexts"] for r in rows], pa.int64()),
                "matches": pa.array([r["matches"] for r in rows], pa.int64()),
                "share": [r["share"] for r in rows], "selected": [r["selected"] for r in rows],
                "freq": [r["freq"] for r in rows], "max_act": [r["max_act"] for r in rows],
                "top_tokens": pa.array([r["top_tokens"] for r in rows], pa.list_(pa.string())),
                "next_tokens": pa.array([r["next_tokens"] for r in rows], pa.list_(pa.string()))}))
            summary = {"tokens": int(len(x)), "docs": len(docs), "feature_rows": int((x > 0).sum()),
                       "latents": n_feat, "live_features": int((count > 0).sum()),
                       "l0_per_token": float((x > 0).sum() / len(x)), "hesitation_candidates": len(rows),
                       "hesitation_features": len(hes), "hesitation_selected": [int(j) for j in hes]}
            sr.stage.write_json("summary.json", summary)
            sr.extra.update(summary)
        _stage(run, "transcoder_extract", body)

    if "transcoder_eval" in stages:
        def body(sr):
            n_hes = len(tc["hesitation"])
            conds = [("transcoder", 0.66, 212.0, 1.9, 0)]
            if n_hes:
                conds += [("transcoder_no_hesitation", 0.58, 168.0, 0.3, n_hes),
                          ("transcoder_random_ablated", 0.65, 209.0, 1.8, n_hes)]
            rows = []
            for b in benches:
                for v, p1, toks, hz, k in conds:
                    hz_ = hz + rng.normal(0, 0.05)
                    rows.append({"variant": v, "benchmark": b, "n_problems": spec.transcoder_problems, "n_samples": 1,
                                 "pass1": p1 + rng.normal(0, 0.02), "stderr": 0.1, "mean_tokens": toks + rng.normal(0, 3),
                                 "finished_rate": 0.9, "marker_rate": 0.95, "mean_hesitations": max(hz_, 0.0),
                                 "hesitation_rate": min(1.0, max(hz_, 0.0) / 2), "features_ablated": k})
            s = pd.DataFrame(rows)
            s["features_ablated"] = s["features_ablated"].astype("int64")
            _write(sr, "summary.parquet", s)
            _write(sr, "samples.parquet", pd.DataFrame({
                "variant": "transcoder", "benchmark": benches[0], "problem_id": ["p0"], "sample": [0],
                "response": ["Wait, 4"], "extracted": ["4"], "correct": [True], "n_tokens": [3], "finished": [True],
                "backend": ["transformers"], "lora_mode": [None], "hesitations": [1]}))
            t = s[s["variant"] == "transcoder"]
            rec = pd.DataFrame({"benchmark": t["benchmark"], "base": 0.1, "full": 0.8, "transcoder": t["pass1"],
                                "recovered_pct": (t["pass1"] - 0.1) / 0.7 * 100, "reference": "evaluate"})
            sr.stage.write_text("recovery.csv", rec.to_csv(index=False))
            sr.stage.write_text("recovery.md", "| synthetic |\n|---|\n")
            sr.stage.write_text("hesitation.csv", s.to_csv(index=False))
            sr.stage.write_text("hesitation.md", "| synthetic |\n|---|\n")
            sr.stage.write_text("faithfulness.md", "# synthetic\n")
        _stage(run, "transcoder_eval", body)


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
