"""Autointerp benchmarks.

1. Rate limiter under faults (default): N requests through the real openai SDK to a local
   server on 127.0.0.1, limiter at --rpm; the same run with no faults (baseline) and with
   --fault-rate injected 429s (Retry-After --retry-after s). Prints achieved requests/min
   at the server against the limit (goal >= 95%), successful answers/min, and duplicate
   calls (a prompt answered twice; goal 0), then reruns everything against the cache
   (goal: 0 calls).

       python benchmarks/bench_autointerp.py [--rpm 1200] [--requests 400] [--fault-rate 0.2]

2. Local-server sizing (--local): the autointerp stage with its default local vLLM server
   (SmolLM2 unless --model) on synthetic features with demo-sized prompts; prints the
   seconds per feature of each task, the arithmetic behind configs/demo.yaml.

       python benchmarks/bench_autointerp.py --local --features 12
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def limiter_run(n: int, rpm: float, fault_rate: float, retry_after: str, concurrency: int, cache_dir: str,
                seed: int = 0) -> dict:
    from rank1_core.autointerp.cache import ResponseCache
    from rank1_core.autointerp.clients import Endpoint, LLMRequest, Secret
    from rank1_core.autointerp.gate import Gate, LocalGate
    from rank1_core.autointerp.retry import RetryPolicy
    from rank1_core.autointerp.worker import AsyncRunner, Worker
    from tests.llm_server import FakeLLMServer

    key = "sk-bench-0000000000"
    with FakeLLMServer(api_key=key, rate_429=fault_rate, retry_after=retry_after, seed=seed, delay_s=0.01) as srv:
        ep = Endpoint("m", model="bench", base_url=srv.openai_url, api_key_env="X", timeout_s=10)
        gate = Gate({"m": (rpm, None)}, {}, burst_s=1.0)
        cache = ResponseCache(cache_dir)

        def make():
            return Worker({"m": ep}, {"m": Secret(key)}, LocalGate(gate), cache,
                          RetryPolicy(max_attempts=10, base_s=0.2, max_s=5.0))

        reqs = [LLMRequest("explain", "m", f"benchmark prompt {seed}-{i}", 16, tag=f"b/f{i}/pos") for i in range(n)]
        t0 = time.perf_counter()
        results = AsyncRunner(make, concurrency).run(reqs)
        wall = time.perf_counter() - t0
        sent = sorted(r["time"] for r in srv.requests)
        ok = [r for r in srv.requests if r["status"] == 200]
        dup = sum(c - 1 for c in collections.Counter(r["prompt"] for r in ok).values() if c > 1)
        span = sent[-1] - sent[0]
        cap = max(1.0, rpm / 60)  # the first burst (capacity) is free: count the rate after it
        # steady state: while requests never sent before are still waiting, the limiter is the
        # only brake; after the last first send only retries remain (the drain of a finite job)
        first_seen: dict[str, float] = {}
        for r in sorted(srv.requests, key=lambda r: r["time"]):
            first_seen.setdefault(r["prompt"], r["time"])
        t_last_new = max(first_seen.values())
        steady = [t for t in sent if t <= t_last_new]
        out = {
            "requests": n, "sent": len(sent), "answered": len(ok), "failed": sum(r.status != "ok" for r in results),
            "throttled_429": sum(r["status"] == 429 for r in srv.requests), "wall_s": round(wall, 2),
            "sent_rpm": round(60 * (len(sent) - cap) / span, 1) if span else None,
            "steady_rpm": round(60 * (len(steady) - cap) / (t_last_new - sent[0]), 1),
            "ok_rpm": round(60 * (len(ok) - cap) / span, 1) if span else None, "duplicates": dup,
        }
        n_before = len(srv.requests)
        AsyncRunner(make, concurrency).run(reqs)
        out["rerun_calls"] = len(srv.requests) - n_before
        return out


def bench_limiter(args) -> None:
    print(f"limiter: {args.requests} requests, limit {args.rpm:g} requests/min, {args.concurrency} in flight, "
          f"Retry-After {args.retry_after}s")
    rows = []
    for rate in (0.0, args.fault_rate):
        with tempfile.TemporaryDirectory() as cache:
            r = limiter_run(args.requests, args.rpm, rate, args.retry_after, args.concurrency, cache)
        r["fault_rate"] = rate
        rows.append(r)
        print(f"  429 rate {rate:4.0%}: sent {r['sent']:4d} ({r['throttled_429']} got 429) in {r['wall_s']:.1f}s; "
              f"achieved {r['steady_rpm']:.0f} requests/min while work was queued = "
              f"{r['steady_rpm'] / args.rpm:.1%} of the limit ({r['sent_rpm']:.0f} = "
              f"{r['sent_rpm'] / args.rpm:.1%} over the whole run, retry drain included); "
              f"answers {r['ok_rpm']:.0f}/min; failed {r['failed']}; duplicate calls {r['duplicates']}; "
              f"calls on rerun {r['rerun_calls']}")
    base, faulty = rows
    print(f"  with {args.fault_rate:.0%} 429s: {faulty['steady_rpm'] / args.rpm:.1%} of the limit while queued "
          f"(goal >= 95%), {faulty['steady_rpm'] / base['steady_rpm']:.1%} of the no-fault baseline; "
          f"duplicate calls {faulty['duplicates']} (goal 0)")
    print(json.dumps({"limit_rpm": args.rpm, "runs": rows}))


def _synthetic_topk(run_dir: Path, model_dir: Path, n_per_source: int, k: int, window: int, seed: int) -> None:
    """topk tables for n features per source: reasoning-like text tokenized by the model's
    tokenizer, each feature peaking on one word."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rank1_core.models import load_tokenizer
    from rank1_core.rundir import RunDir

    tok = load_tokenizer(model_dir)
    rng = random.Random(seed)
    words = ["Wait", "so", "total", "answer", "check", "Hmm", "therefore", "sum", "plus", "equals", "first",
             "then", "step", "carry", "digit", "result", "again", "verify", "But", "Let"]
    sentences = [f"{a} {b} the {c} is {x} {op} {y} = {x + y}, {d} we {e} it."
                 for a, b, c, d, e, x, y, op in
                 ((rng.choice(words), rng.choice(words), rng.choice(words), rng.choice(words), rng.choice(words),
                   rng.randint(1, 99), rng.randint(1, 99), rng.choice(["+", "plus"])) for _ in range(400))]
    text_ids = tok(" ".join(sentences))["input_ids"]
    pieces = [tok.decode([i]) for i in text_ids]
    rows, stats = [], []
    for source, prefix in (("adapter", "L"), ("neuron", "N"), ("sae", "F")):
        for f in range(n_per_source):
            feat = f"{prefix}{f:04d}"
            target = words[(f * 7 + len(prefix)) % len(words)]
            hits = [i for i, p in enumerate(pieces) if p.strip() == target and window <= i < len(pieces) - 4]
            rng.shuffle(hits)
            for rank, h in enumerate(sorted(hits[:k], key=lambda i: -i % 97), 1):
                lo = h - window + 4
                toks = pieces[lo:h + 4]
                vals = [round(rng.random() * 0.5, 3) for _ in toks]
                vals[window - 4] = 5.0 - 0.05 * rank
                rows.append({"source": source, "feature": feat, "sign": "pos", "rank": rank, "doc_id": h,
                             "pos": h, "value": vals[window - 4], "context_token_ids": text_ids[lo:h + 4],
                             "context_tokens": toks, "context_values": vals, "hit_index": window - 4})
            stats.append({"source": source, "feature": feat, "n_tokens": len(pieces), "mean": 0.3, "std": 0.5,
                          "min": 0.0, "max": 5.0, "frac_active": 0.05})
    st = RunDir(str(run_dir)).stage("topk")
    st.clear()
    pq.write_table(pa.Table.from_pylist(rows), st.path("contexts.parquet"))
    pq.write_table(pa.Table.from_pylist(stats), st.path("stats.parquet"))
    st.write_json("manifest.json", {"stage": "topk", "config_hash": "bench"})
    st.write_text("_SUCCESS", "bench\n")


def bench_local(args) -> None:
    import pyarrow.parquet as pq

    from rank1_core.config import load_config
    from rank1_core.models import resolve_model_dir
    from ray_jobs import autointerp

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        overrides = [f"run.dir={run}", f"model.name={args.model}", "autointerp.use_local_server=true",
                     "autointerp.local_server.model=null", f"autointerp.cache_dir={Path(tmp) / 'cache'}",
                     f"autointerp.max_features={{}}", f"autointerp.explain_contexts={args.contexts}",
                     f"autointerp.listed_tokens={args.listed}", f"autointerp.max_prompt_tokens={args.max_prompt}",
                     "autointerp.categorize_contexts=3", "autointerp.score_positives=4",
                     "autointerp.score_negatives=4", "autointerp.category_max_features=60",
                     f"autointerp.concurrency={args.concurrency}", "autointerp.actors=0",
                     f"autointerp.local_server.dtype={args.dtype}", "autointerp.local_server.max_tokens=1024",
                     "autointerp.local_server.max_num_seqs=16"]
        cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
        _synthetic_topk(run, resolve_model_dir(cfg.model), args.features, args.contexts + 4, args.window, 0)
        t0 = time.perf_counter()
        m = autointerp.run(cfg)
        wall = time.perf_counter() - t0
        calls = pq.read_table(run / "autointerp" / "calls.parquet").to_pylist()
        ex = m["extra"]
        n = ex["features"]["features_selected"]
        tm = ex["timings"]
        by_task = collections.defaultdict(lambda: [0, 0, 0])
        for c in calls:
            b = by_task[c["task"]]
            b[0] += 1
            b[1] += c["tokens_in"]
            b[2] += c["tokens_out"]
        print(f"local server: {args.model} ({args.dtype}), {n} features, {args.contexts} contexts of "
              f"{args.window} tokens shown, concurrency {args.concurrency}")
        for task, (k, tin, tout) in sorted(by_task.items()):
            print(f"  {task:10s}: {k:3d} calls, {tin / k:6.0f} tokens in, {tout / k:5.0f} out per call")
        setup = wall - ex["seconds"]
        print(f"  server start + setup {setup:.0f}s; explain {tm['explain']:.0f}s "
              f"({tm['explain'] / n:.2f} s/feature); categories+score {tm['categories+score']:.0f}s; "
              f"categorize {tm['categorize']:.0f}s ({tm['categorize'] / n:.2f} s/feature)")
        per = (tm["explain"] + tm["categories+score"] + tm["categorize"]) / n
        print(f"  all tasks: {per:.2f} s/feature -> features in 8 min after start-up: {int((480 - setup) / per)}")
        print(f"  explained {ex['features']['explained']}/{n}, categorized {ex['features']['categorized']}, "
              f"scored {ex['features']['scored']}; mean detection score {ex['mean_detection_score']}")
        expl = pq.read_table(run / "autointerp" / "explanations.parquet").to_pylist()
        for r in expl[:: max(1, len(expl) // 5)][:5]:
            print(f"  e.g. {r['source']}/{r['feature']}: {r['explanation']!r} (class {r['classification']}, "
                  f"category {r['category']}, score {r['score']})")
        cats = json.loads((run / "autointerp" / "categories.json").read_text())["groups"]
        for g, v in cats.items():
            print(f"  categories[{g}]: {[c['string_id'] for c in v['categories']] or v['error']}")
        print(json.dumps({"wall_s": round(wall, 1), "setup_s": round(setup, 1), "features": n,
                          "timings": tm, "s_per_feature": round(per, 3)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rpm", type=float, default=1200)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--fault-rate", type=float, default=0.2)
    p.add_argument("--retry-after", default="1")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--local", action="store_true", help="size the local vLLM server instead")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--features", type=int, default=12, help="--local: features per source")
    p.add_argument("--contexts", type=int, default=10)
    p.add_argument("--window", type=int, default=24)
    p.add_argument("--listed", type=int, default=4)
    p.add_argument("--max-prompt", type=int, default=1800)
    args = p.parse_args(argv)
    if args.local:
        if args.concurrency == 32:
            args.concurrency = 16
        bench_local(args)
    else:
        bench_limiter(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
