"""Evaluate/ablate benchmarks on SmolLM2-135M-Instruct (or --model), CPU, float32.

1. Generation (default): the same demo-style prompts (reasoning-gym chain_sum questions in
   the s1 prompt format) through the transformers backend (batched, adapter through peft)
   and the vLLM backend (adapter as a LoRARequest), greedy, same token budget. Prints
   generated tokens/s of each, their ratio, engine start-up, and how many responses agree
   token for token.

       python benchmarks/bench_evaluate.py [--prompts 64] [--max-new-tokens 128]

2. KL ablations (--kl): every component, every layer and the attn/mlp groups of a rank-1
   adapter (random B unless --adapter) on --kl-docs traces, with the restart-at-layer
   passes against plain full passes (the baseline), ablation-tokens/s of each and their
   ratio; plus the seconds the demo's held-out set would take.

       python benchmarks/bench_evaluate.py --kl [--kl-docs 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def prompts(model_dir, n: int, think: bool = True, suffix: str = "") -> list[list[int]]:
    from rank1_core.config import BenchmarkConfig, ModelConfig
    from rank1_core.data.format import prompt_text
    from rank1_core.data.io import Skipped
    from rank1_core.data.sources import load_benchmark
    from rank1_core.models import load_tokenizer

    b = BenchmarkConfig(name="bench", task="chain_sum", size=n,
                        task_config={"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1})
    rows = load_benchmark(b, 0, Skipped())
    tok = load_tokenizer(model_dir)
    mc = ModelConfig()
    return [tok(prompt_text(tok, r["question"] + suffix, mc, think=think), add_special_tokens=False)["input_ids"]
            for r in rows]


def adapter_for(model_dir, path: str | None, tmp: str, b_scale: float) -> str:
    if path:
        return path
    from test_evaluate_fixtures import make_adapter

    return str(make_adapter(model_dir, Path(tmp) / "adapter", scale=b_scale))


def bench_generation(args) -> None:
    from rank1_core.config import ModelConfig
    from rank1_core.generation import SamplingSettings, make_generator, vllm_available
    from rank1_core.models import resolve_model_dir

    model_dir = resolve_model_dir(ModelConfig(name=args.model))
    # Plain chat prompts asking for the steps: an untrained (near-zero) adapter then writes
    # long answers (decode-bound, like the trained LoRA's ~70-token traces), whereas after the
    # think marker the base SmolLM2 stops at once.
    ids = prompts(model_dir, args.prompts, think=False,
                  suffix=" Explain every step in detail, then check your work twice.")
    s = SamplingSettings(max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = adapter_for(model_dir, args.adapter, tmp, args.b_scale)
        backends = ["transformers"] + (["vllm"] if vllm_available() else [])
        gens, res = {}, {}
        try:
            for backend in backends:
                t0 = time.perf_counter()
                vopts = {"kv_cache_memory_bytes": 1 << 30, "max_model_len": 1024, "max_num_seqs": args.batch_size}
                gens[backend] = make_generator(backend, model_dir, {"lora": adapter}, "auto", s, vllm=vopts,
                                               batch_size=args.batch_size, threads=args.threads)
                gens[backend].generate(ids[:2], "lora")  # warm-up
                res[backend] = dict(start=time.perf_counter() - t0, secs=0.0, cpu=0.0, tokens=0, ids=[])
            # Backends alternate chunk by chunk, so both see the same machine load.
            for i in range(0, len(ids), args.batch_size):
                for backend in backends:
                    t0, c0 = time.perf_counter(), time.process_time()
                    outs = gens[backend].generate(ids[i:i + args.batch_size], "lora")
                    res[backend]["secs"] += time.perf_counter() - t0
                    res[backend]["cpu"] += time.process_time() - c0
                    res[backend]["tokens"] += sum(o[0].n_tokens for o in outs)
                    res[backend]["ids"] += [o[0].token_ids for o in outs]
        finally:
            for g in gens.values():
                g.close()
        for backend, r in res.items():
            r["tps"] = r["tokens"] / r["secs"]
            r["tpc"] = r["tokens"] / r["cpu"]
            print(f"{backend:>12} ({gens[backend].lora_mode_name}): start-up {r['start']:6.1f} s, {len(ids)} prompts, "
                  f"{r['tokens']} tokens in {r['secs']:6.1f} s = {r['tps']:7.1f} generated tokens/s "
                  f"({r['cpu']:6.1f} CPU-s = {r['tpc']:7.1f} tokens per CPU-second)", flush=True)
    if "vllm" in res:
        same = sum(a == b for a, b in zip(res["vllm"]["ids"], res["transformers"]["ids"]))
        print(f"responses of {res['vllm']['tokens'] / len(ids):.0f} tokens on average (budget {args.max_new_tokens})")
        print(f"vLLM / transformers per CPU-second: {res['vllm']['tpc'] / res['transformers']['tpc']:.2f}x "
              "(robust to other load on the machine)")
        print(f"vLLM / transformers generated tokens/s: {res['vllm']['tps'] / res['transformers']['tps']:.2f}x; "
              f"identical greedy responses: {same}/{len(ids)}")


def bench_kl(args) -> None:
    import torch

    from rank1_core.ablation import ATTN_MODULES, MLP_MODULES, KLAblator, lora_components, plan_ablations
    from rank1_core.config import ModelConfig
    from rank1_core.generation import set_threads
    from rank1_core.models import load_model, load_tokenizer, resolve_model_dir

    set_threads(args.threads)
    model_dir = resolve_model_dir(ModelConfig(name=args.model))
    tok = load_tokenizer(model_dir)
    ids = prompts(model_dir, args.kl_docs)
    # Teacher-forced traces: the prompt plus a ~70-token assistant part, as in the demo's traces.
    body = tok(" Let me add the numbers step by step. First, 3 + 4 = 7. Then 7 + 5 = 12. Wait, let me "
               "double-check: 3 + 4 is 7, and 7 + 5 is 12. Yes.\n<|im_start|>answer\nThe answer is 12.<|im_end|>",
               add_special_tokens=False)["input_ids"]
    docs = [p + body for p in ids]
    masks = [[0] * len(p) + [1] * len(body) for p in ids]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = adapter_for(model_dir, args.adapter, tmp, args.b_scale)
        model = load_model(model_dir, "float32", adapter=adapter)
        plan = plan_ablations(list(lora_components(model)),
                              groups=[("attn", ATTN_MODULES, ()), ("mlp", MLP_MODULES, ())])
        # The two methods alternate batch by batch, so both see the same machine load.
        abl = {True: KLAblator(model, plan, args.per_pass, restart=True),
               False: KLAblator(model, plan, args.per_pass, restart=False)}
        # (Each ablator's hooks act only during its own calls, so both can stay attached.)
        res, cpu, n_tok = {True: 0.0, False: 0.0}, {True: 0.0, False: 0.0}, 0
        for i in range(0, len(docs), args.batch_docs):
            batch = (list(range(i, i + args.batch_docs)), docs[i:i + args.batch_docs], masks[i:i + args.batch_docs])
            for restart in (True, False):
                t0, c0 = time.perf_counter(), time.process_time()
                r = abl[restart](*batch)
                res[restart] += time.perf_counter() - t0
                cpu[restart] += time.process_time() - c0
            n_tok += sum(x["n_tokens"] for x in r.rows if x["ablation"] == plan[0].name)
            print(f"  batch {i // args.batch_docs}: restart {res[True]:.1f} s, full {res[False]:.1f} s (cumulative)",
                  flush=True)
        for restart in (True, False):
            label = "restart at layer" if restart else "full passes (baseline)"
            print(f"{label:>24}: {len(plan)} ablations x {n_tok} scored tokens ({sum(map(len, docs))} tokens) "
                  f"in {res[restart]:6.1f} s = {len(plan) * n_tok / res[restart]:8.1f} ablation-tokens/s "
                  f"({cpu[restart]:6.1f} CPU-s)", flush=True)
        print(f"restart / full passes speed-up: {res[False] / res[True]:.2f}x wall, {cpu[False] / cpu[True]:.2f}x CPU; "
              f"threads {torch.get_num_threads()}")
        idle = cpu[True] / torch.get_num_threads() / len(docs)
        print(f"on an idle machine (CPU-s / threads): ~{idle:.1f} s per trace -> 8 traces ~{8 * idle / 60:.1f} min, "
              f"16 ~{16 * idle / 60:.1f} min, 32 ~{32 * idle / 60:.1f} min")
        per_doc = res[True] / len(docs)
        print(f"per trace ({sum(map(len, docs)) / len(docs):.0f} tokens): {per_doc:.1f} s -> 32 held-out traces "
              f"~{32 * per_doc / 60:.1f} min, 16 ~{16 * per_doc / 60:.1f} min")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=None, help="peft adapter dir (default: random-B rank-1 adapter)")
    p.add_argument("--b-scale", type=float, default=0.002,
                   help="std of the random lora_B (small: the model still writes long answers)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--kl", action="store_true", help="benchmark the KL ablations instead")
    p.add_argument("--kl-docs", type=int, default=8)
    p.add_argument("--batch-docs", type=int, default=4)
    p.add_argument("--per-pass", type=int, default=8)
    args = p.parse_args()
    bench_kl(args) if args.kl else bench_generation(args)


if __name__ == "__main__":
    main()
