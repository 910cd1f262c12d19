"""Training tokens/s: the Ray Train path (the `train` stage) against a plain single-process peft
loop, on the same model, data and micro-batches, measured in the same run.

    python benchmarks/bench_train.py                                # SmolLM2-135M-Instruct (demo data)
    python benchmarks/bench_train.py --config configs/tiny.yaml --steps 6

The plain loop is what one would write without rank1 or Ray: peft model, AdamW, cosine
schedule, clipping, the same masked loss, one process with the same threads as the Ray worker.
The Ray path is `ray_jobs.train.run` with one worker (its per-step reports, progress bar and
checkpoints included). Throughput is measured between the end of step `--warmup` and the end of
the last step (wall clock), so start-up (Ray, model load) is reported apart. The plain loop
runs before and after the Ray run and its two figures are averaged, because other processes
on the machine change the speed over time. Target: the Ray path keeps >= 80% of the plain one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def plain_loop(cfg, model_dir, num_layers, docs, pad_id, steps: int, warmup: int) -> float:
    """tokens/s of a hand-written single-process peft training loop."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rank1_core.lora import peft_lora_config
    from rank1_core.train import collate, loss_model, lr_lambda, plan_microbatches

    tc = cfg.train
    torch.set_num_threads(tc.cpus_per_worker)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, peft_lora_config(tc.lora, num_layers))
    model.train()
    lm = loss_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, tc.warmup_ratio, tc.lr_schedule))
    mbs = plan_microbatches([d.n for d in docs], tc.batch_tokens, cfg.run.seed, 0)[:steps]
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if tc.precision == "bf16_autocast"
                else torch.autocast("cpu", enabled=False))
    walls, toks = [], []
    for mb in mbs:
        ids, att, labels = collate([docs[i] for i in mb], pad_id)
        with autocast:
            s, n = lm(ids, att, labels)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        walls.append(time.time())
        toks.append(int(att.sum()))
        print(f"  plain step {len(walls)}/{len(mbs)}: {toks[-1]} tokens, loss {float(s.detach()) / int(n):.4f}", flush=True)
    return sum(toks[warmup + 1:]) / (walls[-1] - walls[warmup])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the measurement")
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--precision", default="bf16_autocast")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import os

    import pyarrow.parquet as pq

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from rank1_core.config import load_config
    from rank1_core.lora import validate_for_model
    from rank1_core.models import load_tokenizer, resolve_model_dir
    from rank1_core.rundir import resolve_filesystem
    from rank1_core.train import load_docs
    from ray_jobs import prepare, train

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        cfg = load_config(args.config, [
            f"run.dir={tmp / 'run'}", f"train.max_steps={args.steps}", f"train.batch_tokens={args.batch_tokens}",
            f"train.precision={args.precision}", "train.num_workers=1", "train.cpus_per_worker=2",
            "train.strategy=ddp", "train.checkpoint_every=0", "train.eval_every=0", *args.overrides])
        prepare.run(cfg)
        model_dir = resolve_model_dir(cfg.model)
        num_layers = validate_for_model(cfg.train, cfg.model)
        fs, path = resolve_filesystem(str(tmp / "run" / "prepare" / "tokens"))
        docs = load_docs(fs, path, "train")
        pad_id = load_tokenizer(model_dir).pad_token_id
        print(f"model {cfg.model.name} ({num_layers} layers), {args.steps} steps of <= {args.batch_tokens} tokens, "
              f"{cfg.train.precision}, {cfg.train.cpus_per_worker} threads", flush=True)

        plain1 = plain_loop(cfg, model_dir, num_layers, docs, pad_id, args.steps, args.warmup)
        print(f"plain peft loop (before): {plain1:8.1f} tokens/s", flush=True)
        t0 = time.perf_counter()
        train.run(cfg)
        ray_wall = time.perf_counter() - t0
        rows = [r for r in pq.read_table(tmp / "run" / "train" / "metrics.parquet").to_pylist() if r["step"] > 0]
        w = args.warmup
        ray_tps = sum(r["tokens"] for r in rows[w + 1:]) / (rows[-1]["wall"] - rows[w]["wall"])
        plain2 = plain_loop(cfg, model_dir, num_layers, docs, pad_id, args.steps, args.warmup)
        print(f"plain peft loop (after):  {plain2:8.1f} tokens/s", flush=True)
        plain = (plain1 + plain2) / 2
        ray_total = sum(r["tokens"] for r in rows) / ray_wall
        print("\n| path | tokens/s |\n|---|---|")
        print(f"| plain single-process peft loop (mean of 2) | {plain:.1f} |")
        print(f"| Ray Train (1 worker x {cfg.train.cpus_per_worker} CPUs), steady state | {ray_tps:.1f} |")
        print(f"| Ray Train incl. start-up ({ray_wall:.0f} s for {len(rows)} steps) | {ray_total:.1f} |")
        print(f"\nratio Ray / plain (steady state): {ray_tps / plain:.2f}  (target >= 0.80)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
