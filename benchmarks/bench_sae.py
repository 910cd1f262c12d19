"""SAE training throughput and peak memory on CPU, and how they grow with the number of tokens.

    python benchmarks/bench_sae.py                                  # 100k, 400k, 1.6M tokens x 448
    python benchmarks/bench_sae.py --max-steps 50                   # same data, training capped
    python benchmarks/bench_sae.py --sizes 50000 --width 210 --batch 2048 --epochs 6 \\
        --extra sae.lr=1e-3                                          # the demo's shape
    python benchmarks/bench_sae.py --sizes 100000 --ray              # + Ray Data loader, per epoch

For every size it writes synthetic activations in the extract stage's schema (doc_id, pos,
token_id, one float32 column per component, files of <= 50k rows, plus the component
catalogue), then runs the stage's library path (`rank1_core.sae`: pyarrow streaming with a
shuffle buffer, normalisation fit, training, encoding every token to sparse Parquet) in a
fresh process, so each size's peak RSS is its own. Printed per size: tokens/s of training
and of encoding, the loader alone (a streaming pass with the same shuffle buffer), peak RSS,
and ratios against the smallest size measured in the same run (flat = streaming works).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_data(root: Path, tokens: int, width: int, seed: int = 0, rows_per_file: int = 50_000) -> None:
    """Synthetic sparse-structured activations (each token mixes a few of 4*width directions)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    layers = -(-width // 7)
    columns = [f"L{layer:02d}_{m}" for layer in range(layers) for m in MODULES][:width]
    (root / "activations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_true = 4 * width
    dirs = rng.normal(size=(n_true, width)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    scale = np.exp(rng.normal(0, 1, size=width)).astype(np.float32)
    done, part = 0, 0
    while done < tokens:
        n = min(rows_per_file, tokens - done)
        x = 0.05 * rng.standard_normal(size=(n, width), dtype=np.float32)
        for _ in range(8):
            pick = rng.integers(0, n_true, size=n)
            x += rng.exponential(1.0, size=(n, 1)).astype(np.float32) * dirs[pick]
        x *= scale
        idx = np.arange(done, done + n)
        cols = {"doc_id": pa.array(idx // 1000, pa.int64()), "pos": pa.array(idx % 1000, pa.int32()),
                "token_id": pa.array(idx % 50000, pa.int32())}
        cols.update({c: pa.array(x[:, j]) for j, c in enumerate(columns)})
        pq.write_table(pa.table(cols), root / "activations" / f"part-{part:05d}.parquet")
        done, part = done + n, part + 1
    pq.write_table(pa.table({
        "component_id": pa.array(range(width), pa.int32()), "column": columns,
        "layer": pa.array([int(c[1:3]) for c in columns], pa.int32()), "module": [c[4:] for c in columns],
        "kind": ["mlp" if c.endswith(("gate_proj", "up_proj", "down_proj")) else "attn" for c in columns],
        "a_norm": pa.array([1.0] * width, pa.float32()), "b_norm": pa.array([1.0] * width, pa.float32())}),
        root / "components.parquet")


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: loader pass, then the whole stage (train + encode)."""
    import torch

    from rank1_core.config import config_from_dict
    from rank1_core.sae import StageInputs, train_local

    torch.set_num_threads(args.threads)
    sae_cfg = {"batch_size": args.batch, "k": args.k, "expansion": args.expansion, "epochs": args.epochs,
               "shuffle_buffer": args.shuffle, "norm_tokens": 200_000, "checkpoint_every": 10**9}
    overrides = [f"sae.{k}={v}" for k, v in sae_cfg.items()] + [e for e in args.extra]
    cfg = config_from_dict({}, overrides).sae
    inputs = StageInputs.from_extract(None, args.data)
    t0 = time.perf_counter()
    n = sum(len(b["x"]) for b in inputs.batches(cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer, drop_last=True))
    loader_s = time.perf_counter() - t0
    marks = {}

    def on_step(m, state, checkpoint):
        if state.step == 1:
            marks["first"] = (time.perf_counter(), state.tokens)
        marks["last"] = (time.perf_counter(), state.tokens)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = train_local(cfg, inputs, out, seed=0, report=on_step)
        total_s = time.perf_counter() - t0
    (t1, tok1), (t2, tok2) = marks["first"], marks["last"]
    train_tps = (tok2 - tok1) / (t2 - t1) if t2 > t1 else float("nan")
    # encode time: everything after the last step minus the output writing (small)
    encode_s = total_s - (t2 - t0)
    print(json.dumps({
        "tokens": inputs.tokens, "width": len(inputs.columns), "latents": summary["latents"],
        "steps": summary["train_steps"], "train_tokens_per_s": train_tps,
        "encode_tokens_per_s": inputs.tokens / encode_s, "loader_tokens_per_s": n / loader_s,
        "stage_seconds": total_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fvu": summary["fvu"], "l0": summary["l0"], "live": summary["live_features"],
    }))


def ray_loader(data: str, batch: int, shuffle: int, epochs: int) -> list[float]:
    """Seconds per epoch of the Ray Data loader the stage uses (read_parquet -> streaming_split
    -> iter_torch_batches with the same collate and local shuffle), without training."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rank1_core.sae import ColumnCollate, StageInputs

    inputs = StageInputs.from_extract(None, data)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ds = ray.data.read_parquet(inputs.files, columns=["doc_id", "pos", *inputs.columns])
        it = ds.streaming_split(1, equal=True)[0]
        col = ColumnCollate(inputs.columns)
        times = []
        for ep in range(epochs):
            t0 = time.perf_counter()
            for _ in it.iter_torch_batches(batch_size=batch, collate_fn=col, drop_last=True,
                                           local_shuffle_buffer_size=max(shuffle, batch) if shuffle else None,
                                           local_shuffle_seed=ep):
                pass
            times.append(time.perf_counter() - t0)
        return times
    finally:
        ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,400000,1600000", help="token counts, comma-separated")
    p.add_argument("--width", type=int, default=448, help="components per token (448 = Qwen2.5-32B)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap training steps (the encode pass still covers every token)")
    p.add_argument("--shuffle", type=int, default=65_536, help="shuffle buffer (tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", action="append", default=[], help="more sae.key=value overrides")
    p.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir)")
    p.add_argument("--ray", action="store_true", help="also time the Ray Data loader per epoch")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sae-"))
    print(f"SAE benchmark: width {args.width} -> {args.width * args.expansion} latents, k {args.k}, batch "
          f"{args.batch}, {args.epochs} epoch(s){f' (at most {args.max_steps} steps)' if args.max_steps else ''}, shuffle buffer {args.shuffle}, {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    for n in sizes:
        data = work / f"w{args.width}-n{n}"
        if not (data / "components.parquet").exists():
            t0 = time.perf_counter()
            write_data(data, n, args.width)
            print(f"  wrote {n} tokens in {time.perf_counter() - t0:.1f}s to {data}", flush=True)
        cmd = [sys.executable, __file__, "--child", "--data", str(data), "--batch", str(args.batch),
               "--k", str(args.k), "--expansion", str(args.expansion), "--epochs", str(args.epochs),
               "--shuffle", str(args.shuffle), "--threads", str(args.threads)]
        if args.max_steps:
            cmd += ["--extra", f"sae.max_steps={args.max_steps}"]
        for e in args.extra:
            cmd += ["--extra", e]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        if args.ray:
            r["ray_epoch_s"] = ray_loader(str(data), args.batch, args.shuffle, 2)
        rows.append(r)
        print(f"  {n} tokens: {json.dumps(r)}", flush=True)

    base = rows[0]
    print()
    print(f"{'tokens':>10} {'steps':>6} {'train tok/s':>12} {'x base':>7} {'encode tok/s':>13} "
          f"{'loader tok/s':>13} {'peak RSS MB':>12} {'x base':>7} {'stage s':>8} {'FVU':>6} {'L0':>6} {'live':>6}")
    for r in rows:
        print(f"{r['tokens']:>10} {r['steps']:>6} {r['train_tokens_per_s']:>12.0f} "
              f"{r['train_tokens_per_s'] / base['train_tokens_per_s']:>7.2f} {r['encode_tokens_per_s']:>13.0f} "
              f"{r['loader_tokens_per_s']:>13.0f} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:>7.2f} "
              f"{r['stage_seconds']:>8.1f} {r['fvu']:>6.3f} {r['l0']:>6.1f} {r['live']:>6}")
    if args.ray:
        print()
        for r in rows:
            py_epoch = r["tokens"] / r["loader_tokens_per_s"]
            print(f"{r['tokens']:>10} tokens: Ray Data loader epochs {', '.join(f'{t:.1f}s' for t in r['ray_epoch_s'])}"
                  f" vs pyarrow loader {py_epoch:.1f}s (x{min(r['ray_epoch_s']) / py_epoch:.1f})")
    print(f"\nload average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
