"""Cost of a call from a configured price table, and a spending cap that stops before it is hit.

Prices are US dollars per million tokens, input and output, per model. A model missing from
the table (a local server) costs nothing.

The :class:`Budget` books the *worst case* of a call before it is sent (estimated prompt
tokens, the full ``max_tokens`` of output) and settles the real cost when usage comes back.
A call whose worst case would take spent + in-flight past the cap is refused, and from then
on every call is refused: the stage stops cleanly, keeping what is done, never over the cap
(as long as the prompt estimate is not below the real prompt size).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0

    def cost(self, tokens_in: float, tokens_out: float) -> float:
        return (tokens_in * self.input_usd_per_mtok + tokens_out * self.output_usd_per_mtok) / 1e6


class Prices:
    """``{model: Price}``; unknown models are free (and listed in ``unpriced``)."""

    def __init__(self, table: dict[str, Price]) -> None:
        self.table = dict(table)
        self.unpriced: set[str] = set()

    def cost(self, model: str, tokens_in: float, tokens_out: float) -> float:
        price = self.table.get(model)
        if price is None:
            self.unpriced.add(model)
            return 0.0
        return price.cost(tokens_in, tokens_out)


class Budget:
    """A cap in dollars over settled plus in-flight (reserved) spending."""

    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0) -> None:
        self.cap = cap_usd
        self.spent = float(spent_usd)
        self.reserved = 0.0
        self.exhausted = False
        self.refused = 0
        self.reason: str | None = None
        """Why the budget stopped: the figures of the refusal that exhausted it."""

    def reserve(self, worst_case_usd: float) -> bool:
        """Book a call's worst case; False (and exhausted from now on) if it could pass the cap."""
        if self.exhausted:
            self.refused += 1
            return False
        if self.cap is not None and self.spent + self.reserved + worst_case_usd > self.cap + 1e-12:
            self.exhausted = True
            self.refused += 1
            self.reason = refusal_reason(self.spent, self.reserved, worst_case_usd, self.cap)
            return False
        self.reserved += worst_case_usd
        return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """Replace a booking by the real cost (0 when the call failed unbilled)."""
        self.reserved = max(0.0, self.reserved - reserved_usd)
        self.spent += actual_usd

    @property
    def remaining(self) -> float | None:
        return None if self.cap is None else self.cap - self.spent - self.reserved


def refusal_reason(spent: float, reserved: float, worst: float, cap: float) -> str:
    """The figures that made the budget refuse a call, printed with enough digits that the
    sum shown is over the cap shown (4 decimals, more when they would round it away)."""
    total = spent + reserved + worst
    digits = 4
    while digits < 10 and round(total, digits) <= round(cap, digits):
        digits += 1

    def usd(x: float) -> str:
        return f"${x:.{digits}f}"

    return (f"budget cap reached: {usd(spent)} spent + {usd(reserved)} in flight + {usd(worst)} for the next "
            f"call at most = {usd(total)}, over the cap of {usd(cap)}")
