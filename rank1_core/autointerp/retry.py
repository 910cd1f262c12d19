"""Retry policy: exponential backoff with jitter on transient errors, honouring Retry-After.

Transient errors (HTTP 429, 5xx, timeouts, dropped connections) are raised by the clients as
:class:`TransientError`, carrying the server's Retry-After when it sent one. Anything else is
permanent for that request: it propagates at once and the pipeline records it on the feature.

Pure: the policy takes a random generator, and :func:`with_retries` takes the sleep function,
so tests run it on a :class:`~rank1_core.autointerp.limiter.ManualClock`.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, TypeVar

T = TypeVar("T")


class TransientError(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection). ``status`` None = no HTTP reply.
    ``timed_out``: the client gave up waiting; the server may still finish (and bill) the call."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.timed_out = timed_out


class RetriesExhausted(Exception):
    """The last transient error after ``max_attempts`` tries."""

    def __init__(self, last: TransientError, attempts: int) -> None:
        super().__init__(f"gave up after {attempts} attempts: {last}")
        self.last = last
        self.attempts = attempts


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), else None."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    """Tries per request, the first included."""
    base_s: float = 1.0
    """Backoff before the second try; doubles (``multiplier``) each time."""
    multiplier: float = 2.0
    """Growth of the backoff per try."""
    max_s: float = 60.0
    """Longest backoff (and longest Retry-After honoured)."""
    jitter: float = 0.5
    """Fraction of the backoff drawn at random: delay in [(1-jitter)*b, b]."""
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based).

        With a Retry-After the wait is at least that long (capped at ``max_s``), plus a
        little jitter so that many waiting callers do not return in the same instant.
        """
        backoff = min(self.max_s, self.base_s * self.multiplier ** (attempt - 1))
        spread = backoff * self.jitter
        if retry_after is not None:
            return min(self.max_s, retry_after) + self.rng.uniform(0.0, min(spread, 0.1 * backoff + 0.05))
        return backoff - spread + self.rng.uniform(0.0, spread)


@dataclass
class Attempt:
    """One failed try: its error text, HTTP status and the wait that followed."""

    error: str
    status: int | None
    waited_s: float


async def with_retries(fn: Callable[[], Awaitable[T]], policy: RetryPolicy,
                       sleep: Callable[[float], Awaitable[None]],
                       on_retry: Callable[[Attempt], None] | None = None) -> T:
    """Await ``fn()``; on :class:`TransientError` wait per ``policy`` and try again.

    Raises :class:`RetriesExhausted` after ``policy.max_attempts`` transient failures; any
    other exception propagates on the first occurrence.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except TransientError as e:
            if attempt >= policy.max_attempts:
                raise RetriesExhausted(e, attempt) from e
            wait = policy.delay(attempt, e.retry_after)
            if on_retry is not None:
                on_retry(Attempt(error=str(e), status=e.status, waited_s=wait))
            await sleep(wait)
