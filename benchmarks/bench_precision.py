"""bf16 against float32 on this CPU, and what `precision: auto` picks here.

    python benchmarks/bench_precision.py                    # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/bench_precision.py                # the same CPU restricted to AVX2
    python benchmarks/bench_precision.py --model smollm2-135m-instruct --tokens 2048

Prints, measured in the same run: a 512x512 matmul (one thread) in float32 and bfloat16, and
a model's forward pass (all threads) in float32 weights, bf16 autocast and bf16 weights, each
as a ratio to float32. The last lines say what `auto` resolves to on this machine and why
(rank1_core/device.py), so one run shows whether the choice matches the measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def forward_tokens_per_s(model_dir: str, mode: str, tokens: int, seconds: float) -> float:
    import torch

    from rank1_core.models import load_model

    model = load_model(model_dir, "bfloat16" if mode == "bf16" else "float32")
    ids = torch.randint(100, 1000, (max(1, tokens // 256), 256))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16_autocast" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        model(input_ids=ids[:1, :32])  # warm-up
        done, t0 = 0, time.perf_counter()
        while True:
            model(input_ids=ids)
            done += ids.numel()
            if time.perf_counter() - t0 >= seconds:
                break
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local HF dir")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per forward pass")
    p.add_argument("--seconds", type=float, default=4.0, help="time per forward measurement")
    args = p.parse_args()

    import torch

    from rank1_core.config import ModelConfig, config_from_dict
    from rank1_core.device import _matmul_gflops, describe
    from rank1_core.models import resolve_model_dir

    env = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, env {env or '{}'}")
    f32, b16 = _matmul_gflops("float32", 512, 1.0), _matmul_gflops("bfloat16", 512, 1.0)
    print(f"matmul 512x512, 1 thread: float32 {f32:.1f} GFLOP/s, bfloat16 {b16:.1f} GFLOP/s "
          f"(bf16 / float32 = {b16 / f32:.3f})")
    model_dir = str(resolve_model_dir(ModelConfig(name=args.model)))
    base = None
    for mode in ("float32", "bf16_autocast", "bf16"):
        tps = forward_tokens_per_s(model_dir, mode, args.tokens, args.seconds)
        base = base or tps
        print(f"forward {args.model} {mode:<14s} {tps:8.0f} tokens/s  ({tps / base:.2f}x float32)")
    for line in describe(config_from_dict({}).precision):
        print(line)


if __name__ == "__main__":
    main()
