"""Rate limits as pure objects: token buckets for requests/min and tokens/min per model.

A bucket holds up to ``capacity`` units and refills at ``rate_per_min / 60`` units per second.
``reserve(n)`` takes ``n`` units *now* and returns how long the caller must wait before using
them (the level may go negative: the debt is the queue). So in any window of length W the
units handed out never exceed ``capacity + rate * W`` — the limiter's whole contract — and a
request larger than the capacity still passes, after the bucket has refilled enough.

Nothing here sleeps or reads the wall clock by itself: every object takes a ``clock`` (a
callable returning seconds), so tests drive it with :class:`ManualClock` in milliseconds.

    lim = ModelLimiter(rpm=60, tpm=10_000)
    wait = lim.reserve(tokens=800)      # seconds to wait before sending
    lim.settle(estimated=800, actual=650)  # give back the unused estimate
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

Clock = Callable[[], float]


class ManualClock:
    """A clock that moves only when told: ``sleep`` advances it at once (for tests and sims)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = float(start)
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)


class SystemClock:
    """Monotonic time and asyncio sleep."""

    def __call__(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)


class TokenBucket:
    """``capacity`` units, refilled at ``rate_per_min / 60`` per second; reservations may go
    into debt, and the debt is the caller's wait."""

    def __init__(self, rate_per_min: float, capacity: float, clock: Clock) -> None:
        if rate_per_min <= 0:
            raise ValueError(f"rate_per_min must be > 0, got {rate_per_min!r}")
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity!r}")
        self.rate = rate_per_min / 60.0
        self.capacity = float(capacity)
        self.clock = clock
        self.level = float(capacity)
        self.t = clock()

    def _refill(self) -> None:
        now = self.clock()
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def reserve(self, n: float) -> float:
        """Take ``n`` units; return the seconds until they are covered (0 = go now)."""
        self._refill()
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def give_back(self, n: float) -> None:
        """Return unused units (negative ``n`` takes more), never above capacity."""
        self._refill()
        self.level = min(self.capacity, self.level + n)


@dataclass
class LimitStats:
    requests: int = 0
    tokens: float = 0.0
    waited_s: float = 0.0


class ModelLimiter:
    """Requests/min and tokens/min for one model. ``burst_s`` seconds of rate may go at once."""

    def __init__(self, rpm: float, tpm: float | None = None, *, burst_s: float = 1.0,
                 clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.requests = TokenBucket(rpm, max(1.0, rpm / 60.0 * burst_s), clock)
        self.tokens = TokenBucket(tpm, max(1.0, tpm / 60.0 * burst_s), clock) if tpm else None
        self.stats = LimitStats()

    def reserve(self, tokens: float = 0.0) -> float:
        """Book one request of ``tokens`` (an estimate); return the seconds to wait before it."""
        wait = self.requests.reserve(1)
        if self.tokens is not None:
            wait = max(wait, self.tokens.reserve(tokens))
        self.stats.requests += 1
        self.stats.tokens += tokens
        self.stats.waited_s += wait
        return wait

    def settle(self, estimated: float, actual: float) -> None:
        """Correct the token booking once the real usage is known."""
        if self.tokens is not None and actual != estimated:
            self.tokens.give_back(estimated - actual)
            self.stats.tokens += actual - estimated


class Limiters:
    """One :class:`ModelLimiter` per model name, created from ``{name: (rpm, tpm)}``."""

    def __init__(self, limits: dict[str, tuple[float, float | None]], *, burst_s: float = 1.0,
                 clock: Clock = time.monotonic) -> None:
        self.by_model = {m: ModelLimiter(rpm, tpm, burst_s=burst_s, clock=clock)
                         for m, (rpm, tpm) in limits.items()}

    def reserve(self, model: str, tokens: float) -> float:
        if model not in self.by_model:
            raise KeyError(f"no rate limit configured for model {model!r} (have {sorted(self.by_model)})")
        return self.by_model[model].reserve(tokens)

    def settle(self, model: str, estimated: float, actual: float) -> None:
        self.by_model[model].settle(estimated, actual)
