"""The concepts stage's metric pass (AUROC + top-k precision per feature x concept, random
directions, shuffled labels, bootstrap) against one plain read of the same Parquet.

    python benchmarks/bench_concepts.py --tokens 2000000 10000000    # the issue's two sizes
    python benchmarks/bench_concepts.py --tokens 200000               # a quick look

Generates (once, cached in --dir, shared with bench_topk.py) an activation table in the
extract stage's layout: --features float32 columns (448: Qwen2.5-32B's adapter), heavy-tailed
values, documents of --doc-len tokens. --concepts synthetic concepts of various frequencies
(0.1% to 60% of tokens, in runs of 1-8 tokens) are labelled directly (the metric pass is
measured, not label building). Then, each in a fresh process so that peak RSS is its own:

  read    every column of every file read once with pyarrow and dropped (the baseline);
  score   `rank1_core.concepts.score_wide` with the stage's defaults (--bootstrap replicates,
          --random directions), the same files.

Prints wall time, CPU time and peak RSS of each, and score / read (goal: <= 3, < 2 GB). The read
runs before and after the pass (the first may find the files out of the page cache); the faster
is the baseline. The score's times leave out building the synthetic labels (printed apart).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_topk import generate  # noqa: E402  (the same cached table)

from rank1_core.activations import cpu_seconds, max_rss_mb  # noqa: E402


def synthetic_labels(n_tokens: int, doc_len: int, n_concepts: int, seed: int = 0):
    from rank1_core import concepts as K

    rng = np.random.default_rng(seed)
    n_docs = -(-n_tokens // doc_len)
    starts = np.minimum(np.arange(n_docs + 1) * doc_len, n_tokens).astype(np.int64)
    ix = K.TokenIndex(np.arange(n_docs, dtype=np.int64), starts)
    shares = np.geomspace(0.001, 0.6, n_concepts)
    concepts = []
    for j, share in enumerate(shares):
        run = int(rng.integers(1, 9))
        n_runs = max(1, int(share * n_tokens / run))
        first = rng.integers(0, n_tokens - run, n_runs)
        toks = np.unique((first[:, None] + np.arange(run)).ravel())
        concepts.append(K.Concept(f"c{j:02d}", "lexical", f"synthetic {share:.3%}", toks))
    return K.Labels(ix, concepts)


def run_read(run: Path) -> dict:
    import pyarrow.parquet as pq

    files = sorted((run / "extract" / "activations").glob("*.parquet"))
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    rows = 0
    for f in files:
        t = pq.read_table(f)
        rows += t.num_rows
        del t
    return {"phase": "read", "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu_seconds() - c0, 1),
            "rows": rows, "peak_rss_mb": round(max_rss_mb(), 1)}


def run_score(args, run: Path) -> dict:
    from rank1_core import concepts as K
    from rank1_core.config import ConceptsConfig
    from rank1_core.rundir import RunDir

    from bench_topk import columns

    cfg = ConceptsConfig(bootstrap=args.bootstrap, random_directions=args.random, memory_mb=args.memory_mb)
    tl = time.perf_counter()
    labels = synthetic_labels(args.tokens, args.doc_len, args.concepts)  # the bench's stand-in for build_labels
    labels_s = time.perf_counter() - tl
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    scorer = K.Scorer(labels, cfg, log=lambda m: None)
    setup = time.perf_counter() - t0
    rd = RunDir(str(run))
    files = sorted(str(p) for p in (run / "extract" / "activations").glob("*.parquet"))
    src = K.Source("adapter", "wide", files, columns(args.features), signed=True)
    out: list = []
    t1 = time.perf_counter()
    dirs = K.random_directions(args.features, args.random, 0) if args.random else None
    proj = K.score_wide(rd, scorer, src, cfg, out, dirs, log=lambda m: print("   ", m, flush=True))
    adapter = time.perf_counter() - t1
    t2 = time.perf_counter()
    if proj is not None:
        out.extend(K.score_columns(scorer, "random", [f"R{j:03d}" for j in range(len(proj))], proj, True))
    feats = K.features_table(out, scorer.names, cfg)
    K.summary_table(out, feats, ["adapter", "random"], cfg)
    rest = time.perf_counter() - t2
    bound = float(np.nanmax(feats.column("auroc_bound").to_numpy(zero_copy_only=False)))
    return {"phase": "score", "wall_s": round(time.perf_counter() - t0, 2), "labels_s": round(labels_s, 2),
            "setup_s": round(setup, 2),
            "adapter_s": round(adapter, 2), "random_and_tables_s": round(rest, 2), "cpu_s": round(cpu_seconds() - c0, 1),
            "features": len(out), "concepts": scorer.C, "max_auroc_bound": round(bound, 5),
            "peak_rss_mb": round(max_rss_mb(), 1)}


def child(args, phase: str, run: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, "--child-run", str(run), "--tokens", str(args.tokens[0]),
           "--features", str(args.features), "--concepts", str(args.concepts), "--doc-len", str(args.doc_len),
           "--bootstrap", str(args.bootstrap), "--random", str(args.random), "--memory-mb", str(args.memory_mb)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, nargs="+", default=[2e6, 1e7])
    p.add_argument("--features", type=int, default=448)
    p.add_argument("--concepts", type=int, default=12)
    p.add_argument("--doc-len", type=int, default=10_000)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--random", type=int, default=16)
    p.add_argument("--memory-mb", type=int, default=512)
    p.add_argument("--dir", default="/tmp/rank1-bench-topk")
    p.add_argument("--child", default=None)
    p.add_argument("--child-run", default=None)
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens]
    if args.child:
        args.tokens = args.tokens[0]
        res = run_read(Path(args.child_run)) if args.child == "read" else run_score(args, Path(args.child_run))
        print(json.dumps(res))
        return
    for tokens in args.tokens:
        run = generate(Path(args.dir), tokens, args.features, args.doc_len)
        sub = argparse.Namespace(**{**vars(args), "tokens": [tokens]})
        # a read before and after the pass (the first may find the files out of the page cache):
        # the faster one is the baseline
        reads = [child(sub, "read", run)]
        score = child(sub, "score", run)
        reads.append(child(sub, "read", run))
        read = min(reads, key=lambda r: r["wall_s"])
        print(json.dumps({"tokens": tokens, "reads": reads, "score": score}))
        print(f"{tokens:,} tokens x {args.features} features x {args.concepts} concepts: read "
              f"{' / '.join(str(r['wall_s']) for r in reads)}s ({read['cpu_s']} CPU-s, {read['peak_rss_mb']:.0f} MB), "
              f"score {score['wall_s']}s ({score['cpu_s']} CPU-s, {score['peak_rss_mb']:.0f} MB peak), "
              f"score / read = {score['wall_s'] / read['wall_s']:.2f}x wall, {score['cpu_s'] / read['cpu_s']:.2f}x CPU; "
              f"max AUROC error bound {score['max_auroc_bound']}", flush=True)


if __name__ == "__main__":
    main()
