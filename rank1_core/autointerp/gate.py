"""The one admission point every caller of a run goes through: rate limits plus budget.

A :class:`Gate` is a plain object. In one process it is used directly (wrapped by
:class:`LocalGate` for the async interface); under Ray one actor holds it and every worker
actor calls that actor, so all actors of a run obey one rate and one budget.

    adm = gate.admit("gpt-5-mini", est_tokens_in=1200, max_tokens_out=300)
    if not adm.ok: stop (budget)
    sleep(adm.wait_s); send; gate.settle(adm, tokens_in, tokens_out)  # or gate.release(adm)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rank1_core.autointerp.limiter import Clock, Limiters
from rank1_core.autointerp.pricing import Budget, Price, Prices


@dataclass(frozen=True)
class Admission:
    ok: bool
    """False: the budget refused the call (and every later one)."""
    model: str
    wait_s: float = 0.0
    """Seconds to wait before sending (rate limits)."""
    est_tokens: float = 0.0
    """Tokens booked with the tokens/min limiter (prompt estimate + max output)."""
    reserved_usd: float = 0.0
    """Worst-case cost booked with the budget."""
    reason: str | None = None


class Gate:
    def __init__(self, limits: dict[str, tuple[float, float | None]], prices: dict[str, Price],
                 budget_usd: float | None = None, spent_usd: float = 0.0, *, burst_s: float = 1.0,
                 clock: Clock = time.monotonic) -> None:
        self.limiters = Limiters(limits, burst_s=burst_s, clock=clock)
        self.prices = Prices(prices)
        self.budget = Budget(budget_usd, spent_usd)

    def admit(self, model: str, est_tokens_in: float, max_tokens_out: float) -> Admission:
        worst = self.prices.cost(model, est_tokens_in, max_tokens_out)
        if not self.budget.reserve(worst):
            # Every refusal after the first repeats the first one's figures: they stopped the stage.
            return Admission(False, model, reason=self.budget.reason)
        tokens = est_tokens_in + max_tokens_out
        wait = self.limiters.reserve(model, tokens)
        return Admission(True, model, wait, tokens, worst)

    def settle(self, adm: Admission, tokens_in: float, tokens_out: float) -> float:
        """The call came back with this usage: book the real cost and tokens; returns the cost."""
        cost = self.prices.cost(adm.model, tokens_in, tokens_out)
        self.budget.settle(adm.reserved_usd, cost)
        self.limiters.settle(adm.model, adm.est_tokens, tokens_in + tokens_out)
        return cost

    def release(self, adm: Admission) -> None:
        """The call failed without usage (5xx, timeout): free the budget booking.
        The request and its tokens stay counted by the rate limiter, as providers count them."""
        self.budget.settle(adm.reserved_usd, 0.0)

    def state(self) -> dict:
        return {"spent_usd": self.budget.spent, "reserved_usd": self.budget.reserved,
                "cap_usd": self.budget.cap, "exhausted": self.budget.exhausted,
                "refused": self.budget.refused, "unpriced_models": sorted(self.prices.unpriced),
                "requests": {m: lim.stats.requests for m, lim in self.limiters.by_model.items()},
                "rate_wait_s": {m: round(lim.stats.waited_s, 3) for m, lim in self.limiters.by_model.items()}}


class LocalGate:
    """Async face of a :class:`Gate` in the same process (the Ray face calls an actor)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def admit(self, model: str, est_tokens_in: float, max_tokens_out: float) -> Admission:
        return self.gate.admit(model, est_tokens_in, max_tokens_out)

    async def settle(self, adm: Admission, tokens_in: float, tokens_out: float) -> float:
        return self.gate.settle(adm, tokens_in, tokens_out)

    async def release(self, adm: Admission) -> None:
        self.gate.release(adm)
