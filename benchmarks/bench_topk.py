"""Top-64 per component over a synthetic activation table: DuckDB (the topk stage) vs NumPy.

    python benchmarks/bench_topk.py --tokens 10000000            # the paper's scale (~18 GB disk)
    python benchmarks/bench_topk.py --tokens 2000000 --numpy     # plus the in-memory baseline

Generates (once, cached in --dir) a table in the extract stage's layout: `activations/`
(doc_id, pos, token_id, one float32 column per component; --components 448 as
Qwen2.5-32B's adapter), `tokens/` and `components.parquet`, documents of --doc-len tokens.
Then, each in a fresh process so that peak RSS is its own:

  duckdb  `rank1_core.topk.run_topk`, the whole stage: k hits per component and sign with at
          most --max-per-doc per document, their context windows (token text and values) and
          per-component statistics, under --memory-limit.
  numpy   the whole table loaded into one float32 array in memory, then np.argpartition per
          column for the top and bottom k (no per-document cap, no contexts, no statistics).

Prints wall time, CPU time (all threads) and peak RSS of each. Values are float32 (the stage's storage type).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rank1_core.activations import cpu_seconds, max_rss_mb  # noqa: E402  (VmHWM; CPU time, all threads)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS_PER_FILE = 250_000


def columns(n: int) -> list[str]:
    return [f"L{i // 7:02d}_{MODULES[i % 7]}" for i in range(n)]


def generate(root: Path, tokens: int, n_comp: int, doc_len: int, seed: int = 0) -> Path:
    """run/extract/{activations,tokens}/part-*.parquet + components.parquet (skipped if present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = root / f"t{tokens}-c{n_comp}-d{doc_len}" / "run"
    ex = run / "extract"
    done = ex / "_generated"
    if done.exists():
        return run
    if ex.exists():
        shutil.rmtree(ex)
    (ex / "activations").mkdir(parents=True)
    (ex / "tokens").mkdir()
    cols = columns(n_comp)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for f, start in enumerate(range(0, tokens, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, tokens - start)
        idx = np.arange(start, start + n)
        doc = (idx // doc_len).astype(np.int64)
        pos = (idx % doc_len).astype(np.int32)
        tok = rng.integers(0, 50_000, n).astype(np.int32)
        # heavy-tailed values (Student t, 3 dof) so that top-k is about a few strong tokens
        X = rng.standard_t(3, size=(n_comp, n)).astype(np.float32)
        t = pa.table({"doc_id": doc, "pos": pos, "token_id": tok, **{c: X[i] for i, c in enumerate(cols)}})
        pq.write_table(t, ex / "activations" / f"part-{f:05d}.parquet", compression="none", use_dictionary=False)
        text = pa.array(np.char.add("t", tok.astype(str)).astype(object), pa.string())
        pq.write_table(pa.table({"doc_id": doc, "pos": pos, "token_id": tok, "token": text,
                                 "split": pa.array(["train"] * n, pa.string())}),
                       ex / "tokens" / f"part-{f:05d}.parquet", compression="zstd")
        print(f"  generated {start + n:,}/{tokens:,} tokens ({time.perf_counter() - t0:.0f}s)", flush=True)
    pq.write_table(pa.table({
        "component_id": pa.array(range(n_comp), pa.int32()), "column": cols,
        "layer": pa.array([i // 7 for i in range(n_comp)], pa.int32()),
        "module": [MODULES[i % 7] for i in range(n_comp)],
        "kind": ["mlp" if MODULES[i % 7] in ("gate_proj", "up_proj", "down_proj") else "attn" for i in range(n_comp)],
        "a_norm": [1.0] * n_comp, "b_norm": [1.0] * n_comp}), ex / "components.parquet")
    done.write_text("ok\n")
    return run


def run_duckdb(args, run: Path) -> dict:
    from rank1_core.config import TopkConfig
    from rank1_core.rundir import RunDir
    from rank1_core.topk import run_topk

    cfg = TopkConfig(k=args.k, max_per_doc=args.max_per_doc, window_before=24, window_after=8,
                     memory_limit=args.memory_limit, threads=args.threads, temp_dir=args.temp_dir)
    rd = RunDir(str(run))
    st = rd.stage("topk-bench")
    if st.exists():
        st.fs.delete_dir(st.root)
    st.fs.create_dir(st.root, recursive=True)
    t0 = time.perf_counter()
    res = run_topk(rd, st, cfg, log=lambda m: print("   ", m, flush=True))
    wall = time.perf_counter() - t0
    return {"method": "duckdb", "wall_s": round(wall, 2), "cpu_s": round(cpu_seconds(), 1),
            "timings": res.timings, "rows": res.rows,
            "peak_rss_mb": round(max_rss_mb(), 1)}


def run_numpy(args, run: Path) -> dict:
    import pyarrow.parquet as pq

    files = sorted((run / "extract" / "activations").glob("*.parquet"))
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    cols = columns(args.components)
    t0 = time.perf_counter()
    X = np.empty((len(cols), n), dtype=np.float32)  # one row per component: contiguous columns
    at = 0
    for f in files:
        t = pq.read_table(f, columns=cols)
        for i, c in enumerate(cols):
            X[i, at:at + t.num_rows] = t.column(c).to_numpy()
        at += t.num_rows
        del t
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    top, bottom = {}, {}
    k = args.k
    for i, c in enumerate(cols):
        x = X[i]
        hi = np.argpartition(x, -k)[-k:]
        top[c] = hi[np.argsort(-x[hi])]
        lo = np.argpartition(x, k)[:k]
        bottom[c] = lo[np.argsort(x[lo])]
    compute = time.perf_counter() - t1
    return {"method": "numpy", "wall_s": round(load + compute, 2), "cpu_s": round(cpu_seconds(), 1),
            "load_s": round(load, 2),
            "argpartition_s": round(compute, 2), "array_gb": round(X.nbytes / 1e9, 2),
            "peak_rss_mb": round(max_rss_mb(), 1)}


def child(args, method: str, run: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--child-run", str(run), "--tokens", str(args.tokens),
           "--components", str(args.components), "--k", str(args.k), "--max-per-doc", str(args.max_per_doc),
           "--memory-limit", args.memory_limit, "--threads", str(args.threads)]
    if args.temp_dir:
        cmd += ["--temp-dir", args.temp_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines() if not line.startswith("RESULT ")))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{method} failed")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--components", type=int, default=448)
    p.add_argument("--doc-len", type=int, default=10_000, help="tokens per synthetic document (s1K: ~10k)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--max-per-doc", type=int, default=4)
    p.add_argument("--memory-limit", default="4GB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temp-dir", default=None)
    p.add_argument("--dir", default="/tmp/rank1-bench-topk", help="where the synthetic table is cached")
    p.add_argument("--numpy", action="store_true", help="also run the in-memory NumPy baseline")
    p.add_argument("--no-duckdb", action="store_true")
    p.add_argument("--delete", action="store_true", help="delete the synthetic table afterwards")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = run_duckdb if args.child == "duckdb" else run_numpy
        print("RESULT " + json.dumps(fn(args, Path(args.child_run))), flush=True)
        return

    gb = args.tokens * args.components * 4 / 1e9
    print(f"synthetic table: {args.tokens:,} tokens x {args.components} components float32 "
          f"({gb:.1f} GB of values), documents of {args.doc_len:,} tokens", flush=True)
    t0 = time.perf_counter()
    run = generate(Path(args.dir), args.tokens, args.components, args.doc_len)
    disk = sum(f.stat().st_size for f in (run / "extract").rglob("*.parquet"))
    print(f"  ready in {time.perf_counter() - t0:.0f}s, {disk / 1e9:.1f} GB on disk", flush=True)
    results = []
    if not args.no_duckdb:
        print(f"duckdb (topk stage, k={args.k}, max {args.max_per_doc}/doc, memory_limit {args.memory_limit}, "
              f"{args.threads} threads):", flush=True)
        r = child(args, "duckdb", run)
        results.append(r)
        print(f"  wall {r['wall_s']:.1f}s (ranking {r['timings']['adapter_rank']:.1f}s, contexts+stats "
              f"{r['timings']['adapter_write']:.1f}s), CPU {r['cpu_s']:.0f}s, peak RSS {r['peak_rss_mb']:.0f} MB",
              flush=True)
    if args.numpy:
        print("numpy (whole table in memory, argpartition top and bottom k per component):", flush=True)
        r = child(args, "numpy", run)
        results.append(r)
        print(f"  wall {r['wall_s']:.1f}s (load {r['load_s']:.1f}s, argpartition {r['argpartition_s']:.1f}s), "
              f"CPU {r['cpu_s']:.0f}s, array {r['array_gb']:.1f} GB, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print("JSON " + json.dumps({"tokens": args.tokens, "components": args.components, "disk_gb": round(disk / 1e9, 2),
                                "results": results}))
    if args.delete:
        shutil.rmtree(run.parent)


if __name__ == "__main__":
    main()
