"""Transcoder-adapter training tokens/s against the full fine-tune's step (the baseline), on the
same model, data and micro-batches, in the same run; plus the sparse decode against a dense one.

    python benchmarks/bench_transcoder.py                         # SmolLM2-135M-Instruct, demo data
    python benchmarks/bench_transcoder.py --config configs/tiny.yaml --steps 4
    python benchmarks/bench_transcoder.py transcoder.expansion=2 transcoder.k=16 transcoder.precision=bf16_autocast

Single process, no Ray (the stage adds Ray Train's start-up, ~20 s, and per-step reports).
The baseline is one full fine-tune step (forward, backward, AdamW on every weight) with the
train stage's loss and `train.precision`; the transcoder step runs the frozen target's forward,
the base + adapters' forward and backward (adapters only), Adam on the adapters, with
`transcoder.precision`. The target is the base with perturbed MLP weights: the same cost as a
real fine-tune. Both loops run twice, interleaved (other processes on the machine change the
speed over time), and each figure is the mean of its two runs; CPU seconds are printed beside
wall seconds. Then: how many steps and epochs of the demo data fit a time budget
(`--budget-s`, default 300 s), the number to put in the config.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def microbatches(docs, batch_tokens: int, seed: int, steps: int):
    from rank1_core.train import plan_microbatches

    mbs = plan_microbatches([d.n for d in docs], batch_tokens, seed, 0)
    return (mbs * (steps // max(len(mbs), 1) + 1))[:steps]


def full_step_loop(cfg, model_dir, docs, pad_id, steps: int, warmup: int) -> tuple[float, float]:
    """(tokens/s, CPU s per 1k tokens) of the full fine-tune's step."""
    import torch
    from transformers import AutoModelForCausalLM

    from rank1_core.train import collate, loss_model

    tc = cfg.train
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    lm = loss_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if tc.precision == "bf16_autocast" else torch.autocast("cpu", enabled=False)
    toks = 0
    for i, mb in enumerate(microbatches(docs, cfg.transcoder.batch_tokens, cfg.run.seed, steps + warmup)):
        if i == warmup:
            t0, c0, toks = time.perf_counter(), cpu_s(), 0
        ids, att, labels = collate([docs[j] for j in mb], pad_id)
        with ac:
            s, n = lm(ids, att, labels)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        toks += int(att.sum())
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    return toks / dt, 1000 * dc / toks


def transcoder_loop(cfg, base_dir, target, docs, pad_id, steps: int, warmup: int) -> tuple[float, float, dict]:
    """(tokens/s, CPU s per 1k tokens, last step's stats) of the transcoder step."""
    import torch

    from rank1_core.models import load_model
    from rank1_core.train import collate
    from rank1_core.transcoder import (STAT_NAMES, TranscoderAdapter, TranscoderObjective, TranscoderTrainer,
                                       fit_layer_stats)

    tc = cfg.transcoder
    base = load_model(base_dir)
    a = TranscoderAdapter.for_model(base, tc, seed=cfg.run.seed)
    obj = TranscoderObjective(base, target, a, tc)
    a.set_layer_stats(fit_layer_stats(base, obj.inst, docs, pad_id, tc.init_tokens, tc.batch_tokens, target=target))
    tr = TranscoderTrainer(obj, tc, total=steps + warmup)
    toks, stats = 0, None
    for i, mb in enumerate(microbatches(docs, tc.batch_tokens, cfg.run.seed, steps + warmup)):
        if i == warmup:
            t0, c0, toks = time.perf_counter(), cpu_s(), 0
        batch = collate([docs[j] for j in mb], pad_id)
        stats = tr.micro_step(batch, last=True)
        tr.step()
        toks += int(batch[1].sum())
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    n_params = sum(p.numel() for p in a.parameters())
    return toks / dt, 1000 * dc / toks, {**dict(zip(STAT_NAMES, stats.tolist())), "adapter_params": n_params}


def decode_ratio(d_model: int, d_latent: int, k: int, tokens: int = 2048, reps: int = 20) -> tuple[float, float]:
    """(sparse ms, dense ms) of one layer's decode, forward + backward, [tokens, k] active latents."""
    import torch
    import torch.nn.functional as F

    W = torch.randn(d_latent, d_model, requires_grad=True)
    vals = torch.rand(tokens, k, requires_grad=True)
    idx = torch.stack([torch.randperm(d_latent)[:k] for _ in range(tokens)])

    def sparse():
        F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum").sum().backward()

    def dense():
        z = torch.zeros(tokens, d_latent).scatter(1, idx, vals)
        (z @ W).sum().backward()

    out = []
    for fn in (sparse, dense):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append(1000 * (time.perf_counter() - t0) / reps)
    return out[0], out[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=6, help="timed steps per loop and run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=300.0, help="training time budget to size the config for")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch

    from rank1_core.config import load_config
    from rank1_core.models import load_model, load_tokenizer, resolve_model_dir
    from rank1_core.rundir import resolve_filesystem
    from rank1_core.train import load_docs
    from rank1_core.transcoder import decoder_layers
    from ray_jobs import prepare

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-tc-") as tmp:
        cfg = load_config(args.config, [*args.overrides, f"run.dir={tmp}/run"])
        tc = cfg.transcoder
        prepare.run(cfg)
        fs, path = resolve_filesystem(f"{tmp}/run/prepare/tokens")
        docs = load_docs(fs, path, "train")
        base_dir = resolve_model_dir(cfg.model)
        pad = load_tokenizer(base_dir).pad_token_id
        target = load_model(base_dir)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in decoder_layers(target):
                w = layer.mlp.down_proj.weight
                w.add_(torch.randn(w.shape, generator=g) * 0.1 * w.std())
        hidden = int(target.config.hidden_size)
        n_layers = len(tc.layers) if tc.layers is not None else int(target.config.num_hidden_layers)
        print(f"model {cfg.model.name}: {n_layers} adapted layers x {tc.expansion * hidden} latents, k={tc.k}, "
              f"micro-batches of {tc.batch_tokens} tokens, transcoder precision {tc.precision}, full fine-tune "
              f"precision {cfg.train.precision}, {args.threads} threads; {len(docs)} training traces, "
              f"{sum(d.n for d in docs)} tokens", flush=True)
        full, trans, stats = [], [], None
        for rnd in range(2):
            full.append(full_step_loop(cfg, base_dir, docs, pad, args.steps, args.warmup))
            print(f"  run {rnd + 1}: full fine-tune step {full[-1][0]:7.1f} tokens/s ({full[-1][1]:.2f} CPU s / 1k tokens)",
                  flush=True)
            r = transcoder_loop(cfg, base_dir, target, docs, pad, args.steps, args.warmup)
            trans.append(r[:2])
            stats = r[2]
            print(f"  run {rnd + 1}: transcoder step    {trans[-1][0]:7.1f} tokens/s ({trans[-1][1]:.2f} CPU s / 1k tokens)",
                  flush=True)
        f_tps = sum(x[0] for x in full) / 2
        t_tps = sum(x[0] for x in trans) / 2
        f_cpu = sum(x[1] for x in full) / 2
        t_cpu = sum(x[1] for x in trans) / 2
        sp, de = decode_ratio(hidden, tc.expansion * hidden, tc.k)
        tokens = sum(d.n for d in docs)
        # On a shared machine wall time understates the speed; CPU time per token does not.
        idle_tps = 1000.0 * args.threads / t_cpu
        budget_tokens = max(t_tps, idle_tps) * args.budget_s
        per_step = tc.batch_tokens * 0.8  # micro-batches are ~80% full after length grouping
        print()
        print(f"full fine-tune step : {f_tps:8.1f} tokens/s   {f_cpu:6.2f} CPU s / 1k tokens   (baseline)")
        print(f"transcoder step     : {t_tps:8.1f} tokens/s   {t_cpu:6.2f} CPU s / 1k tokens   "
              f"ratio {t_tps / f_tps:.2f}x wall, {f_cpu / t_cpu:.2f}x CPU")
        print(f"adapter parameters  : {stats['adapter_params']:,}; last step kl {stats['kl']:.4f}, fve {stats['fve']:.3f}, "
              f"l0 {stats['l0']:.1f}")
        print(f"decode of one layer, forward + backward, 2048 tokens: sparse (embedding_bag) {sp:.2f} ms, "
              f"dense {de:.2f} ms: {de / sp:.1f}x")
        print(f"from CPU time, {args.threads} busy threads would train ~{idle_tps:.0f} tokens/s")
        print(f"budget {args.budget_s:.0f} s -> ~{budget_tokens:,.0f} tokens = {budget_tokens / tokens:.2f} epochs of "
              f"{tokens:,} training tokens = ~{budget_tokens / per_step:.0f} steps of {tc.batch_tokens}-token "
              f"micro-batches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
