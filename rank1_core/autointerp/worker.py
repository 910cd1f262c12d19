"""Turning one :class:`LLMRequest` into one :class:`CallResult`: cache, gate, client, retries.

    worker = Worker(endpoints, secrets, gate=LocalGate(Gate(...)), cache=ResponseCache(dir))
    result = await worker.process(request)

The same object runs in the driver (``AsyncRunner``, tests, small runs) and inside each Ray
actor (``ray_jobs/autointerp.py``), where ``gate`` is the handle of the run's one gate actor.
Order for each try: ask the gate (budget + rate) -> wait -> send -> settle. A cached answer
skips the gate: it costs nothing and uses no rate. A request identical to one this worker
has in flight waits for that answer instead of paying again (single flight). An answer the
request's parser rejects is returned but never served from the cache, so a rerun asks again.
Every outcome is a result, never an exception, so a failure stays attached to its feature.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from rank1_core.autointerp.cache import ResponseCache, request_key
from rank1_core.autointerp.clients import (Endpoint, LLMClient, LLMRequest, PermanentError, Secret, cache_payload,
                                           estimate_tokens, make_client, redact)
from rank1_core.autointerp.gate import Admission
from rank1_core.autointerp.limiter import SystemClock
from rank1_core.autointerp.retry import Attempt, RetriesExhausted, RetryPolicy, TransientError, with_retries

# CallResult.status values
OK, CACHED, FAILED, BUDGET = "ok", "cached", "error", "budget"


@dataclass
class CallResult:
    """The outcome of one request, and its row in ``calls.parquet``."""

    tag: str
    task: str
    model: str
    status: str
    """'ok' (answered now), 'cached', 'error' (permanent or retries exhausted), 'budget'."""
    text: str | None = None
    cached: bool = False
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    attempts: int = 0
    retries: list[dict] = field(default_factory=list)
    error: str | None = None
    time: float = 0.0
    key: str = ""
    finish_reason: str | None = None
    """The server's stop reason ('length': the answer hit max_tokens and is cut)."""
    timeouts: int = 0
    """Tries abandoned at the client's timeout_s: the server may have finished and billed them."""
    logprobs: list | None = None
    """Token log-probabilities of the answer when the request asked for them (not logged)."""

    def row(self) -> dict:
        d = asdict(self)
        d.pop("text")
        d.pop("logprobs")
        d["retries"] = len(self.retries)
        d["retry_errors"] = "; ".join(r["error"] for r in self.retries) or None
        return d


class GateLike(Protocol):
    async def admit(self, model: str, est_tokens_in: float, max_tokens_out: float) -> Admission: ...
    async def settle(self, adm: Admission, tokens_in: float, tokens_out: float) -> float: ...
    async def release(self, adm: Admission) -> None: ...


class _BudgetStop(Exception):
    pass


class Worker:
    def __init__(self, endpoints: dict[str, Endpoint], secrets: dict[str, Secret | None], gate: GateLike,
                 cache: ResponseCache | None, policy: RetryPolicy | None = None, clock=None,
                 client_factory: Callable[[Endpoint, Secret | None], LLMClient] = make_client) -> None:
        self.endpoints = endpoints
        self.secrets = secrets
        self.gate = gate
        self.cache = cache
        self.policy = policy or RetryPolicy()
        self.clock = clock or SystemClock()
        self.client_factory = client_factory
        self.clients: dict[str, LLMClient] = {}

    def client(self, name: str) -> LLMClient:
        loop = asyncio.get_running_loop()
        if getattr(self, "_loop", None) is not loop:  # SDK clients are bound to their event loop
            self.clients, self._loop = {}, loop
        if name not in self.clients:
            self.clients[name] = self.client_factory(self.endpoints[name], self.secrets.get(name))
        return self.clients[name]

    def key_of(self, req: LLMRequest) -> str:
        return request_key(cache_payload(self.endpoints[req.model], req))

    def _inflight(self) -> dict[str, asyncio.Future]:
        """Requests being paid for now, by key (futures are bound to the running loop)."""
        loop = asyncio.get_running_loop()
        if getattr(self, "_flight_loop", None) is not loop:
            self._flights, self._flight_loop = {}, loop
        return self._flights

    @staticmethod
    def _usable(hit: dict | None, req: LLMRequest) -> bool:
        """A stored answer that may be served: text, not marked unparsable, and accepted by the
        request's parser (entries stored before parsing was checked may hold bad answers)."""
        if hit is None or not isinstance(hit.get("text"), str) or hit.get("unparsable"):
            return False
        if req.check is not None:
            try:
                req.check(hit["text"])
            except Exception:
                return False
        return True

    async def process(self, req: LLMRequest) -> CallResult:
        """Cache, else the same request already in flight (single flight: wait for its
        answer), else pay for it through the gate."""
        started = time.time()
        t0 = self.clock()
        res = CallResult(tag=req.tag, task=req.task, model=req.model, status=FAILED, time=started)
        try:
            ep = self.endpoints[req.model]
        except KeyError:
            res.error = f"no endpoint configured for model {req.model!r}"
            return res
        res.key = key = request_key(cache_payload(ep, req))
        if self.cache is not None:
            hit = self.cache.get(key)
            if self._usable(hit, req):
                res.status, res.cached, res.text = CACHED, True, hit["text"]
                res.tokens_in, res.tokens_out = int(hit.get("tokens_in", 0)), int(hit.get("tokens_out", 0))
                res.finish_reason, res.logprobs = hit.get("finish_reason"), hit.get("logprobs")
                res.latency_s = self.clock() - t0
                return res
        flights = self._inflight()
        if key in flights:  # the same request is being paid for: share its answer
            first: CallResult = await asyncio.shield(flights[key])
            if first.text is not None:
                res.status, res.cached, res.text, res.logprobs = CACHED, True, first.text, first.logprobs
                res.tokens_in, res.tokens_out = first.tokens_in, first.tokens_out
                res.finish_reason = first.finish_reason
            else:
                res.status = first.status
            res.error = first.error
            res.latency_s = round(self.clock() - t0, 4)
            return res
        flights[key] = flight = asyncio.get_running_loop().create_future()
        try:
            await self._pay(req, ep, key, res)
        except BaseException:
            flight.cancel()
            raise
        else:
            flight.set_result(res)
        finally:
            del flights[key]
        res.latency_s = round(self.clock() - t0, 4)
        return res

    async def _pay(self, req: LLMRequest, ep: Endpoint, key: str, res: CallResult) -> None:
        est_in = estimate_tokens((req.system or "") + req.prompt)
        max_out = req.max_tokens + ep.extra_output_tokens
        client = self.client(req.model)

        async def attempt():
            adm = await self.gate.admit(req.model, est_in, max_out)
            if not adm.ok:
                raise _BudgetStop(adm.reason)
            await self.clock.sleep(adm.wait_s)
            res.attempts += 1
            try:
                resp = await client.complete(req)
            except BaseException as e:
                if isinstance(e, TransientError) and e.timed_out:
                    res.timeouts += 1  # abandoned: the server may still finish and bill it
                await self.gate.release(adm)
                raise
            res.cost_usd = await self.gate.settle(adm, resp.tokens_in, resp.tokens_out)
            return resp

        def on_retry(a: Attempt) -> None:
            res.retries.append({"error": a.error, "status": a.status, "waited_s": round(a.waited_s, 3)})

        try:
            resp = await with_retries(attempt, self.policy, self.clock.sleep, on_retry)
        except _BudgetStop as e:
            res.status, res.error = BUDGET, str(e)
        except RetriesExhausted as e:
            res.error = str(e)
        except PermanentError as e:
            res.error = str(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an unexpected library error: recorded, not fatal
            res.error = redact(f"{type(e).__name__}: {e}", *self.secrets.values())
        else:
            res.status, res.text, res.finish_reason, res.logprobs = OK, resp.text, resp.finish_reason, resp.logprobs
            res.tokens_in, res.tokens_out = resp.tokens_in, resp.tokens_out
            unparsable = None
            if req.check is not None:
                try:
                    req.check(resp.text)
                except Exception as e:
                    unparsable = str(e) or type(e).__name__
                    res.error = f"unparsable answer (paid, never served from the cache): {unparsable}"
            if self.cache is not None:
                # Stored even when unparsable, marked so: never served, but the entry is the
                # cost record a resumed stage recovers if the call log lost this row.
                self.cache.put(key, {"request": cache_payload(ep, req), "text": resp.text,
                                     "tokens_in": resp.tokens_in, "tokens_out": resp.tokens_out,
                                     "cost_usd": res.cost_usd, "finish_reason": resp.finish_reason,
                                     "served_by": resp.model, "paid_by": req.origin or None,
                                     "unparsable": unparsable,
                                     **({"logprobs": resp.logprobs} if resp.logprobs else {})})

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()
        self.clients.clear()


class AsyncRunner:
    """Runs requests through one in-process :class:`Worker`, ``concurrency`` at a time.

    ``run`` is synchronous (it owns an event loop) and reports each result as it lands
    through ``on_result`` (the call log), then returns the results in request order.
    """

    def __init__(self, make_worker: Callable[[], Worker], concurrency: int = 16) -> None:
        self.make_worker = make_worker
        self.concurrency = concurrency

    def run(self, requests: list[LLMRequest], on_result: Callable[[CallResult], Any] | None = None) -> list[CallResult]:
        if not requests:
            return []
        return asyncio.run(self._run(requests, on_result))

    async def _run(self, requests, on_result):
        worker = self.make_worker()
        sem = asyncio.Semaphore(self.concurrency)

        async def one(req):
            async with sem:
                r = await worker.process(req)
            if on_result is not None:
                on_result(r)
            return r

        try:
            return await asyncio.gather(*[one(r) for r in requests])
        finally:
            await worker.close()

