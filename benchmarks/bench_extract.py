"""Extraction throughput against a bare forward pass, and memory against token count.

    python benchmarks/bench_extract.py                       # SmolLM2-135M, 60 neurons per MLP
    python benchmarks/bench_extract.py --model tiny-qwen2 --ray-tokens 50000,200000,800000

Part 1 (one process, the same padded batches for every method, interleaved rounds, best
round reported):
  bare      the forward passes extraction makes, and nothing else: the adapted decoder, plus
            the decoder with the adapter disabled when neurons are extracted (no hooks, no
            lm_head, no output)
  compute   Extractor.compute: the same passes with the hooks, gathered to Arrow tables
  write     Extractor.__call__: compute + three Parquet files written and renamed
  ratio = method tokens/s / bare tokens/s (target >= 0.85).
Part 2: the real stage (`ray_jobs.extract.run`, Ray Data actor pool) on synthetic traces of
growing size, each in a fresh process, and right after it in the same Ray instance the same
pipeline with a bare-forward actor (same pool, same batches): wall time and actor CPU time
of both, the marginal rates between sizes (start-up excluded), peak RSS of the driver and of
the actors, bytes written. On a shared machine compare CPU time, not wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rank1_core.activations import max_rss_mb  # noqa: E402  (peak RSS of this process: VmHWM)


def synthetic_docs(n_tokens: int, doc_len: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(min(rng.integers(doc_len // 2, doc_len * 3 // 2 + 1), n_tokens - total))
        docs.append(rng.integers(0, vocab - 300, n).astype(np.int32))
        total += n
    return docs


def make_adapter(model_dir: Path, dest: Path, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rank1_core.activations import MODULES

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=1, lora_alpha=16, use_rslora=True, target_modules=list(MODULES)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(str(dest))
    return dest


def part1(args, model_dir: Path, adapter: Path) -> dict:
    import torch

    from rank1_core.activations import Extractor, batch_name, plan_forward_batches
    from rank1_core.models import load_model

    torch.set_num_threads(args.threads)
    ex = Extractor(model_dir, str(adapter), None, mlp_neurons=args.mlp_neurons, batch_tokens=args.batch_tokens,
                   dtype=args.dtype, torch_threads=args.threads)
    bare_model = load_model(model_dir, dtype=args.dtype, adapter=str(adapter))  # a second copy, no hooks
    lm = bare_model.get_base_model()
    decoder = getattr(lm, lm.base_model_prefix)
    vocab = lm.config.vocab_size
    docs = synthetic_docs(args.tokens, args.doc_len, vocab, seed=1)
    n_tok = sum(len(d) for d in docs)
    ids = list(range(len(docs)))
    groups = plan_forward_batches([len(d) for d in docs], args.batch_tokens)
    padded = []
    for g in groups:
        t = torch.zeros((len(g), max(len(docs[i]) for i in g)), dtype=torch.long)
        for r, i in enumerate(g):
            t[r, : len(docs[i])] = torch.from_numpy(docs[i].astype(np.int64))
        padded.append(t)

    def bare():
        with torch.inference_mode():
            for t in padded:
                decoder(input_ids=t, use_cache=False)
                if args.mlp_neurons:
                    with bare_model.disable_adapter():
                        decoder(input_ids=t, use_cache=False)

    def compute():
        ex.compute(ids, docs, ["train"] * len(docs))

    tmp = Path(tempfile.mkdtemp(prefix="rank1-bench-extract-"))
    from rank1_core.rundir import RunDir

    ex.stage = RunDir(str(tmp / "run")).stage("extract")
    batch = {"doc_id": np.asarray(ids, np.int64), "split": np.asarray(["train"] * len(docs), object),
             "input_ids": np.asarray(docs + [None], object)[:-1]}

    def write():
        for t in ("activations", "neurons", "tokens"):  # force a real write every round
            p = tmp / "run" / "extract" / t / batch_name(ids)
            if p.exists():
                p.unlink()
        ex(batch)

    bare()  # warm-up
    times = {"bare": [], "compute": [], "write": []}
    cpu = {"bare": [], "compute": [], "write": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("compute", compute), ("write", write)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    size = sum(f.stat().st_size for f in (tmp / "run" / "extract").rglob("*.parquet"))
    out = {
        "model": args.model, "dtype": args.dtype, "threads": args.threads, "tokens": n_tok, "docs": len(docs),
        "forward_batches": len(groups), "components": len(ex.columns), "neuron_columns": len(ex.neuron_columns),
        "passes_per_batch": 2 if args.mlp_neurons else 1,
        **{f"{k}_tokens_per_s": round(n_tok / v, 1) for k, v in best.items()},
        **{f"{k}_tokens_per_cpu_s": round(n_tok / v, 1) for k, v in best_cpu.items()},
        "compute_vs_bare": round(best["bare"] / best["compute"], 3),
        "write_vs_bare": round(best["bare"] / best["write"], 3),
        "compute_vs_bare_cpu": round(best_cpu["bare"] / best_cpu["compute"], 3),
        "write_vs_bare_cpu": round(best_cpu["bare"] / best_cpu["write"], 3),
        "bytes_per_token": round(size / n_tok, 1),
        "rounds_wall_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "rounds_cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
    }
    return out


class BareForward:
    """The baseline inside Ray: the same actor pool and batches, only the forward passes the
    extraction makes (adapted decoder, plus the decoder with the adapter disabled when
    neurons are extracted). No hooks, no output."""

    def __init__(self, model_dir, adapter_dir, batch_tokens, dtype, neurons):
        import torch

        from rank1_core.models import load_model

        torch.set_num_threads(1)
        self.model = load_model(model_dir, dtype=dtype, adapter=adapter_dir)
        lm = self.model.get_base_model()
        self.decoder = getattr(lm, lm.base_model_prefix)
        self.batch_tokens, self.neurons = batch_tokens, neurons

    def __call__(self, batch):
        import torch

        from rank1_core.activations import cpu_seconds, plan_forward_batches

        docs = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
        with torch.inference_mode():
            for g in plan_forward_batches([len(d) for d in docs], self.batch_tokens):
                t = torch.zeros((len(g), max(len(docs[i]) for i in g)), dtype=torch.long)
                for r, i in enumerate(g):
                    t[r, : len(docs[i])] = torch.from_numpy(docs[i])
                self.decoder(input_ids=t, use_cache=False)
                if self.neurons:
                    with self.model.disable_adapter():
                        self.decoder(input_ids=t, use_cache=False)
        return {"tokens": np.asarray([sum(len(d) for d in docs)]), "cpu_s": np.asarray([cpu_seconds()]),
                "pid": np.asarray([os.getpid()])}


def ray_bare(cfg, model_dir, adapter_dir) -> dict:
    import ray

    ec = cfg.extract
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(str(Path(cfg.run.dir) / "prepare" / "tokens")).select_columns(
        ["doc_id", "split", "input_ids"])
    ds = ds.repartition(target_num_rows_per_block=ec.batch_docs)
    ds = ds.map_batches(BareForward, fn_constructor_kwargs=dict(
        model_dir=str(model_dir), adapter_dir=str(adapter_dir), batch_tokens=ec.batch_tokens,
        dtype=cfg.model.dtype, neurons=ec.mlp_neurons > 0), batch_size=ec.batch_docs, batch_format="numpy",
        concurrency=ec.actors, num_cpus=ec.cpus_per_actor)
    rows = list(ds.iter_rows())
    wall = time.perf_counter() - t0
    cpu = sum(max(float(r["cpu_s"]) for r in rows if r["pid"] == pid) for pid in {int(r["pid"]) for r in rows})
    return {"wall_s": round(wall, 2), "actor_cpu_s": round(cpu, 1), "tokens": int(sum(int(r["tokens"]) for r in rows))}


def ray_child(args) -> dict:
    """One run of the real stage on `args.child_tokens` synthetic tokens (in a fresh process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rank1_core.config import config_from_dict
    from rank1_core.data.prepare import TOKENS_SCHEMA
    from rank1_core.models import hf_config_for
    from rank1_core.rundir import RunDir, run_stage
    from ray_jobs import extract

    run_dir = Path(args.child_run)
    cfg = config_from_dict({
        "run": {"dir": str(run_dir)}, "model": {"name": args.model, "dtype": args.dtype},
        "ray": {"num_cpus": 4},
        "extract": {"actors": args.actors, "cpus_per_actor": 1, "batch_docs": args.batch_docs,
                    "batch_tokens": args.batch_tokens, "mlp_neurons": args.mlp_neurons},
    })
    vocab = hf_config_for(cfg.model).vocab_size
    docs = synthetic_docs(args.child_tokens, args.doc_len, vocab, seed=2)
    run = RunDir(str(run_dir))
    prep = run.stage("prepare")

    def write_prep(sr):
        rows = [{"doc_id": i, "split": "train", "input_ids": d.tolist(), "loss_mask": [1] * len(d),
                 "num_tokens": len(d), "prompt_len": 0, "truncated": False} for i, d in enumerate(docs)]
        prep.fs.create_dir(prep.path("tokens"), recursive=True)
        for k in range(0, len(rows), 512):
            pq.write_table(pa.Table.from_pylist(rows[k:k + 512], schema=TOKENS_SCHEMA),
                           prep.path("tokens", f"part-{k // 512:05d}.parquet"))

    run_stage(prep, "bench", "", write_prep, log=lambda m: None)
    train = run.stage("train")
    run_stage(train, "bench", "", lambda sr: __import__("shutil").copytree(args.child_adapter, train.local_path("adapter")),
              log=lambda m: None)
    t0 = time.perf_counter()
    m = extract.run(cfg)
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (run_dir / "extract").rglob("*.parquet"))
    from rank1_core.models import resolve_model_dir

    bare = ray_bare(cfg, resolve_model_dir(cfg.model), train.local_path("adapter"))
    return {"tokens": m["rows"]["tokens"], "docs": m["rows"]["docs"], "files": m["rows"]["files"],
            "bare_wall_s": bare["wall_s"], "bare_actor_cpu_s": bare["actor_cpu_s"],
            "wall_s": round(wall, 2), "extract_s": m["timings"]["extract"],
            "tokens_per_s": m["extra"]["tokens_per_s"], "actor_max_rss_mb": m["extra"]["actor_max_rss_mb"],
            "actor_cpu_s": m["extra"]["actor_cpu_s"],
            "driver_max_rss_mb": round(max_rss_mb(), 1),
            "bytes_written": size}


def part2(args, adapter: Path) -> list[dict]:
    out = []
    for n in [int(x) for x in args.ray_tokens.split(",") if x]:
        with tempfile.TemporaryDirectory(prefix="rank1-bench-ray-") as tmp:
            cmd = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype,
                   "--mlp-neurons", str(args.mlp_neurons), "--batch-tokens", str(args.batch_tokens),
                   "--batch-docs", str(args.batch_docs), "--doc-len", str(args.doc_len), "--actors", str(args.actors),
                   "--child-tokens", str(n), "--child-run", str(Path(tmp) / "run"), "--child-adapter", str(adapter)]
            env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not line:
                print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"ray run with {n} tokens failed")
            r = json.loads(line[-1][len("RESULT "):])
            out.append(r)
            print(f"  ray  {r['tokens']:>9,} tokens: bare pipeline wall {r['bare_wall_s']:7.1f}s actor CPU "
                  f"{r['bare_actor_cpu_s']:6.1f}s | extraction wall {r['wall_s']:7.1f}s  {r['tokens_per_s']:8.1f} tok/s  "
                  f"actor CPU {r['actor_cpu_s']:6.1f}s  driver RSS {r['driver_max_rss_mb']:6.0f} MB  "
                  f"actor RSS {r['actor_max_rss_mb']:6.0f} MB  "
                  f"{r['bytes_written'] / r['tokens']:.0f} B/token", flush=True)
    for a, b in zip(out, out[1:]):
        b["marginal_tokens_per_s"] = round((b["tokens"] - a["tokens"]) / max(b["extract_s"] - a["extract_s"], 1e-9), 1)
        b["marginal_tokens_per_cpu_s"] = round((b["tokens"] - a["tokens"]) / max(b["actor_cpu_s"] - a["actor_cpu_s"], 1e-9), 1)
        dn = b["tokens"] - a["tokens"]
        b["bare_marginal_tokens_per_s"] = round(dn / max(b["bare_wall_s"] - a["bare_wall_s"], 1e-9), 1)
        b["bare_marginal_tokens_per_cpu_s"] = round(dn / max(b["bare_actor_cpu_s"] - a["bare_actor_cpu_s"], 1e-9), 1)
        b["marginal_wall_vs_bare"] = round((b["bare_wall_s"] - a["bare_wall_s"]) / max(b["wall_s"] - a["wall_s"], 1e-9), 3)
        b["marginal_cpu_vs_bare"] = round(b["marginal_tokens_per_cpu_s"] / b["bare_marginal_tokens_per_cpu_s"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=8192, help="tokens for part 1")
    p.add_argument("--doc-len", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--batch-docs", type=int, default=16)
    p.add_argument("--mlp-neurons", type=int, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch threads in part 1 (1: as one actor)")
    p.add_argument("--actors", type=int, default=2, help="actors in part 2 (1 CPU each)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ray-tokens", default="4096,16384", help="comma-separated token counts for part 2 ('' skips)")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-run", help=argparse.SUPPRESS)
    p.add_argument("--child-adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_tokens:
        print("RESULT " + json.dumps(ray_child(args)), flush=True)
        return

    from rank1_core.config import ModelConfig
    from rank1_core.models import resolve_model_dir

    model_dir = resolve_model_dir(ModelConfig(name=args.model))
    with tempfile.TemporaryDirectory(prefix="rank1-bench-adapter-") as tmp:
        adapter = make_adapter(model_dir, Path(tmp) / "adapter")
        result = {}
        if not args.skip_part1:
            r = part1(args, model_dir, adapter)
            result["in_process"] = r
            print(f"in-process, {r['model']} {r['dtype']}, {r['threads']} threads, {r['tokens']:,} tokens in "
                  f"{r['docs']} docs, {r['components']} components + {r['neuron_columns']} neurons, "
                  f"{r['passes_per_batch']} passes per batch:")
            for k in ("bare", "compute", "write"):
                ratio = "" if k == "bare" else (f"  ({r[f'{k}_vs_bare']:.1%} of bare by wall time, "
                                                f"{r[f'{k}_vs_bare_cpu']:.1%} by CPU time)")
                print(f"  {k:<8} {r[f'{k}_tokens_per_s']:9.1f} tok/s, {r[f'{k}_tokens_per_cpu_s']:9.1f} tok/CPU-s{ratio}")
            print(f"  output {r['bytes_per_token']:.0f} bytes/token", flush=True)
        if args.ray_tokens:
            print(f"Ray Data stage, {args.actors} actors x 1 CPU:", flush=True)
            result["ray"] = part2(args, adapter)
            ip = result.get("in_process")
            for r in result["ray"][1:]:
                print(f"  marginal, start-up excluded: extraction {r['marginal_tokens_per_cpu_s']:.1f} tok per actor CPU-s, "
                      f"bare pipeline {r['bare_marginal_tokens_per_cpu_s']:.1f} -> {r['marginal_cpu_vs_bare']:.1%} "
                      f"(wall: {r['marginal_wall_vs_bare']:.1%})")
                print(f"  vs the in-process bare forward: {r['marginal_tokens_per_s']:.1f} tok/s"
                      + (f" = {r['marginal_tokens_per_s'] / ip['bare_tokens_per_s']:.1%} of bare" if ip else "")
                      + f"; {r['marginal_tokens_per_cpu_s']:.1f} tok per actor CPU-s"
                      + (f" = {r['marginal_tokens_per_cpu_s'] / ip['bare_tokens_per_cpu_s']:.1%} of bare" if ip else ""))
        print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
