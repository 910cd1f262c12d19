"""Steering cost against plain generation, and the demo's time budget.

    python benchmarks/bench_steer.py                           # SmolLM2-135M, random-B adapter
    python benchmarks/bench_steer.py --adapter runs/demo/train/adapter --new-tokens 96
    python benchmarks/bench_steer.py --model tiny-qwen2 --new-tokens 16

One process, the same left-padded batch of benchmark-style prompts for every method, exactly
`--new-tokens` greedy steps each (min_new_tokens = max_new_tokens), interleaved rounds, best
round reported:
  unsteered   generation with the adapter, no hook
  component   one component scaled (1 lora_A hook + the decoder's position pre-hook)
  gated       the same, steering only tokens after the prompt (a torch.where per hook call)
  sae/random  a direction added to every component (one hook per component: 210 on SmolLM2)
  kl          the teacher-forced KL of one work unit: two forward passes over prompt +
              response, the head only at response positions
ratio = method time / unsteered time (target <= 1.10 for the hooks). Both wall time and the
process's CPU time are reported: on a shared machine the wall time measures the other jobs,
the CPU time (with one torch thread, `--threads 1`, no spinning threads) the work. Then the
cost of one work unit (generation + KL) and, from it, the wall time of a steer configuration
on an otherwise idle machine: units = conditions x ceil(prompts / batch), spread over
`--actors` single-threaded actors on min(actors, cores) cores.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def prompts(model_dir: Path, n: int) -> list[list[int]]:
    import random

    from rank1_core.config import ModelConfig
    from rank1_core.data.format import prompt_text
    from rank1_core.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        q = f"State the final answer to the following arithmetic problem: {a} + {b} - {c} ="
        out.append(tok(prompt_text(tok, q, ModelConfig()), add_special_tokens=False)["input_ids"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=None, help="peft adapter dir (default: a random-B rank-1 adapter)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work)")
    # a steer configuration to size (defaults: the demo values proposed in notes/readme-steer.md)
    p.add_argument("--targets", type=int, default=2, help="components steered")
    p.add_argument("--modes", type=int, default=1)
    p.add_argument("--alphas", type=int, default=7)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--identity-alphas", type=int, default=1, help="alphas whose random control is reused")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--actors", type=int, default=2)
    args = p.parse_args()

    import torch

    from rank1_core.config import ModelConfig
    from rank1_core.models import resolve_model_dir
    from rank1_core.steering import (ComponentStats, SteeringHooks, SteerWorker, WorkerSpec, component_condition,
                                     kl_rows, random_condition, random_direction, unsteered)
    from test_evaluate_fixtures import make_adapter

    model_dir = resolve_model_dir(ModelConfig(name=args.model))
    tmp = Path(tempfile.mkdtemp(prefix="bench-steer-"))
    adapter = Path(args.adapter) if args.adapter else make_adapter(model_dir, tmp / "adapter", seed=0, scale=0.02)
    w = SteerWorker(WorkerSpec(str(model_dir), str(adapter), max_new_tokens=args.new_tokens,
                               batch_size=args.batch, threads=args.threads).to_dict())
    print(f"model {args.model}, adapter {'random-B' if not args.adapter else adapter}, {len(w.components)} "
          f"components, batch {args.batch}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    batch = prompts(model_dir, args.batch)
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), w.gen.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(batch):
        ids[r, width - len(x):] = torch.tensor(x)
        mask[r, width - len(x):] = 1
    stats = ComponentStats(0.0, 1.0)
    comp = w.components[len(w.components) // 2]
    u = random_direction(w.components, 0)
    target = component_condition(comp, "scale", 10.0, stats)
    methods = {
        "unsteered": None,
        "component": target,
        "gated": component_condition(comp, "scale", 10.0, stats, after=0),
        "sae/random": random_condition(u, 0, 1.0, target),
    }
    responses: list[list[int]] = []

    def gen(cond):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=w.gen.pad_id)
        with torch.inference_mode():
            if cond is None:
                return w.model.generate(**kw)
            with SteeringHooks(w.model, cond):
                return w.model.generate(**kw)

    out = gen(None)
    responses = [row[width:].tolist() for row in out]

    def kl_once():
        return kl_rows(w.lm, w.decoder, w.head, batch, responses, w.gen.pad_id,
                       lambda wd: SteeringHooks(w.model, target, prompt_width=wd))

    best: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best[name] = min(best.get(name, math.inf), time.perf_counter() - t)
        cpu[name] = min(cpu.get(name, math.inf), time.process_time() - c)

    for _ in range(args.rounds):
        for name, cond in methods.items():
            timed(name, lambda: gen(cond))
        timed("kl", kl_once)
    steps = args.batch * args.new_tokens
    print(f"\n{'method':<12} {'wall s':>8} {'cpu s':>8} {'tok/cpu-s':>10} {'ratio wall':>11} {'ratio cpu':>10}")
    for name in best:
        tps = f"{steps / cpu[name]:10.1f}" if name != "kl" else f"{'':>10}"
        print(f"{name:<12} {best[name]:8.2f} {cpu[name]:8.2f} {tps} {best[name] / best['unsteered']:11.2f} "
              f"{cpu[name] / cpu['unsteered']:10.2f}")
    unit = max(cpu["component"], cpu["sae/random"]) + cpu["kl"]
    conds = 1 + args.targets * args.modes * args.alphas * (1 + args.seeds)
    reused = args.targets * args.modes * args.identity_alphas * args.seeds
    n_units = (conds - reused) * math.ceil(args.prompts / args.batch)
    cores = os.cpu_count() or 1
    est = n_units * unit / max(1, min(args.actors, cores))
    print(f"\none work unit (batch of {args.batch} prompts, {args.new_tokens} tokens each, generation + KL): "
          f"{unit:.2f} CPU-seconds on {torch.get_num_threads()} thread(s)")
    print(f"configuration: {args.targets} targets x {args.modes} modes x {args.alphas} alphas x (1 + {args.seeds} "
          f"seeds) + unsteered = {conds} conditions ({reused} zero-norm controls reused), {args.prompts} prompts "
          f"-> {n_units} work units")
    print(f"estimated wall time on an idle machine, {args.actors} single-threaded actor(s): {est:.0f} s of work "
          f"(+ ~{15 + 10 * args.actors} s Ray start-up and model loads); an upper bound: every response runs "
          f"the full {args.new_tokens} tokens")
    w.close()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
