"""autointerp: explain, classify, categorize and score every feature with rate-limited LLM actors.

    python -m ray_jobs.autointerp --config configs/demo.yaml

Reads topk/contexts.parquet and topk/stats.parquet; writes autointerp/explanations.parquet,
categories.json, calls.parquet and summary tables (see rank1_core/autointerp/pipeline.py).

With ``autointerp.actors`` >= 1, requests go to that many async Ray actors (each with
``concurrency`` requests in flight); all of them ask one gate actor, which holds the run's
rate limiters (requests/min and tokens/min per model) and its budget, so every actor of the
run obeys one rate and one cap. ``actors: 0`` runs the same worker in the driver without Ray.

No API key and no base_url configured: a local vLLM server with the run's instruct model
answers every task (the manifest's extra.explanations_by says which model wrote them). The
stage is resumable: every answer is cached as it lands, so a crashed run, started again,
pays for nothing twice.
"""

from __future__ import annotations

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli
from ray_jobs.progress import Progress

STAGE = "autointerp"


class _RayGate:
    """The async gate interface of rank1_core.autointerp.worker over the gate actor."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def admit(self, model, est_tokens_in, max_tokens_out):
        return await self.handle.admit.remote(model, est_tokens_in, max_tokens_out)

    async def settle(self, adm, tokens_in, tokens_out):
        return await self.handle.settle.remote(adm, tokens_in, tokens_out)

    async def release(self, adm):
        return await self.handle.release.remote(adm)


class GateActor:
    """Holds the run's one Gate (rate limiters + budget); methods are quick and serialised."""

    def __init__(self, limits, prices, budget_usd, spent_usd, burst_s) -> None:
        from rank1_core.autointerp.gate import Gate

        self.gate = Gate(limits, prices, budget_usd, spent_usd, burst_s=burst_s)

    def admit(self, model, est_tokens_in, max_tokens_out):
        return self.gate.admit(model, est_tokens_in, max_tokens_out)

    def settle(self, adm, tokens_in, tokens_out):
        return self.gate.settle(adm, tokens_in, tokens_out)

    def release(self, adm):
        self.gate.release(adm)

    def state(self):
        return self.gate.state()


class WorkerActor:
    """An async actor: up to max_concurrency requests in flight, all through the gate actor."""

    def __init__(self, endpoints, secrets, gate_handle, cache_dir, retry) -> None:
        from rank1_core.autointerp.cache import ResponseCache
        from rank1_core.autointerp.retry import RetryPolicy
        from rank1_core.autointerp.worker import Worker

        self.worker = Worker(endpoints, secrets, _RayGate(gate_handle), ResponseCache(cache_dir), RetryPolicy(**retry))

    async def process(self, request):
        return await self.worker.process(request)

    async def close(self):
        await self.worker.close()


class RayRunner:
    """Spreads requests over the worker actors; reports results as they land."""

    def __init__(self, cfg: Config, routing, gate_args: dict, cache_dir: str, retry: dict) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        a = cfg.autointerp
        opts = {}
        if routing.local:  # the local server listens on this node's 127.0.0.1 only
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)
        self.gate = ray.remote(num_cpus=0)(GateActor).options(**opts).remote(**gate_args)
        secrets = routing.secrets()
        self.actors = [ray.remote(num_cpus=0)(WorkerActor).options(max_concurrency=a.concurrency, **opts)
                       .remote(routing.endpoints, secrets, self.gate, cache_dir, retry) for _ in range(a.actors)]
        self.endpoints = routing.endpoints
        self.ray = ray

    def _actor_for(self, i: int, req):
        """Identical requests go to the same actor, whose worker sends them once (single flight)."""
        from rank1_core.autointerp.cache import request_key
        from rank1_core.autointerp.clients import cache_payload

        ep = self.endpoints.get(req.model)
        h = int(request_key(cache_payload(ep, req))[:8], 16) if ep is not None else i
        return self.actors[h % len(self.actors)]

    def __call__(self, requests, on_result):
        ray = self.ray
        refs = [self._actor_for(i, r).process.remote(r) for i, r in enumerate(requests)]
        index = {ref: i for i, ref in enumerate(refs)}
        out = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=min(len(pending), 32), timeout=0.5)
            for ref in done:
                res = ray.get(ref)
                out[index[ref]] = res
                on_result(res)
        return out

    def state(self) -> dict:
        return self.ray.get(self.gate.state.remote())

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.get(actor.close.remote(), timeout=30)
            except Exception:
                pass
            self.ray.kill(actor)
        self.ray.kill(self.gate)


class LocalRunner:
    """The same worker in the driver process (autointerp.actors = 0): no Ray."""

    def __init__(self, cfg: Config, routing, gate_args: dict, cache_dir: str, retry: dict) -> None:
        from rank1_core.autointerp.cache import ResponseCache
        from rank1_core.autointerp.gate import Gate, LocalGate
        from rank1_core.autointerp.retry import RetryPolicy
        from rank1_core.autointerp.worker import AsyncRunner, Worker

        self.gate = Gate(**gate_args)
        cache = ResponseCache(cache_dir)
        secrets = routing.secrets()
        self.runner = AsyncRunner(lambda: Worker(routing.endpoints, secrets, LocalGate(self.gate), cache,
                                                 RetryPolicy(**retry)), cfg.autointerp.concurrency)

    def __call__(self, requests, on_result):
        return self.runner.run(requests, on_result)

    def state(self) -> dict:
        return self.gate.state()

    def close(self) -> None:
        pass


def _counter(progress):
    """Each call result -> the stage's counters (terminal line, Ray dashboard metrics)."""

    def on_call(r) -> None:
        fresh = not r.cached
        progress.update(1, llm_cached=int(r.cached), llm_errors=int(r.status in ("error", "budget")),
                        llm_tokens_in=r.tokens_in if fresh else 0, llm_tokens_out=r.tokens_out if fresh else 0,
                        spend_usd=r.cost_usd, features_explained=int(r.task == "explain" and r.text is not None))

    return on_call


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.autointerp.pipeline import (answerers, default_cache_dir, previous_spend, resolved,
                                                run_autointerp)

    cfg = resolved(cfg)
    a = cfg.autointerp

    def body(sr):
        topk = sr.stage.run.stage("topk")
        with sr.timed("autointerp"), answerers(cfg, sr.stage, a.use_local_server) as routing:
            from rank1_core.autointerp.cache import ResponseCache

            # Earlier attempts' spend, with what a killed one paid for but never logged.
            spent = previous_spend(sr.stage, ResponseCache(default_cache_dir(a)), log=lambda m: print(m, flush=True))
            gate_args = {"limits": routing.limits, "prices": routing.prices, "budget_usd": a.budget_usd,
                         "spent_usd": spent, "burst_s": a.burst_s}
            retry = {"max_attempts": a.retry_max_attempts, "base_s": a.retry_base_s, "max_s": a.retry_max_s}
            if a.actors > 0:
                from ray_jobs.common import ensure_ray

                ensure_ray(cfg)
                runner = RayRunner(cfg, routing, gate_args, default_cache_dir(a), retry)
            else:
                runner = LocalRunner(cfg, routing, gate_args, default_cache_dir(a), retry)
            try:
                with Progress(STAGE, main="llm_calls", unit="call") as progress:
                    res = run_autointerp(cfg, sr.stage, topk, routing, runner, on_call=_counter(progress))
                sr.extra["gate"] = runner.state()
            finally:
                runner.close()
        sr.rows.update(res.rows)
        sr.extra.update(res.extra)

    return execute(cfg, STAGE, body, force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
