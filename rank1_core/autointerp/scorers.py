"""Two more explanation scores beside detection: fuzzing (EleutherAI's delphi) and simulation
(OpenAI's "Language models can explain neurons in language models", 2023).

Both run on the held-out activating contexts detection uses (ranked after the explanation's
contexts), one LLM call per feature and scorer, through the stage's rate-limited, cached, budgeted runner.

**Fuzzing.** Each held-out activating context is shown with some tokens marked
``<<like this>>``: either the tokens where the feature fires most (its strongest token and
any within half of its value, at most ``MAX_MARKS``), or, for a seeded half of the contexts,
as many tokens chosen at random among the weak ones. The LLM says, per context, whether the
marked tokens are what the explanation describes (1) or not (0). Score: balanced accuracy
(0.5 = chance), like detection's.

**Simulation.** The LLM reads the explanation and, for every token of each context (a window
of ``simulation_tokens`` around the context's hit), predicts the activation on a 0-10 scale.
The score is the Pearson correlation between predictions and true activations (in the
feature's sign, floored at 0) over all tokens of all held-out activating contexts at once:
OpenAI's correlation score on top-activating contexts ("top" rather than "top and random":
the top-k tables store a feature's per-token values only for its own contexts). Where the server
returns token log-probabilities (OpenAI-compatible servers, vLLM included, when asked with
``logprobs``), each prediction is the expected value over the digit tokens offered at that
position, normalised over those digits, as OpenAI's simulator computes it; a number the
model wrote as more than one token (``10`` for tokenizers that split digits) and answers
without log-probabilities use the written value (``simulation_method`` says which was used).

Cost per feature: one call each; fuzzing's prompt is about detection's size, simulation's
grows with contexts x tokens and its answer has one number per token.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from functools import partial

from rank1_core.autointerp.prompts import (Context, ParseError, _one_line, detection_scores, extract_json,
                                           parse_labels, score_schema, signed)

SCORERS = ("detection", "fuzzing", "simulation")
MAX_MARKS = 3
"""Tokens marked per fuzzing context at most."""
TOP_LOGPROBS = 20
"""Alternatives asked per generated token for simulation (OpenAI's API allows up to 20)."""


# --------------------------------------------------------------------------- fuzzing


def _marked(tokens: Sequence[str], marks: set[int]) -> str:
    out = []
    for i, t in enumerate(tokens):
        out.append(f"<<{t}>>" if i in marks else t)
    return _one_line("".join(out))


def fuzz_items(contexts: Sequence[Context], sign: str, rng: random.Random) -> list[tuple[str, int]]:
    """(text with marked tokens, 1 if the marks are the feature's strongest tokens else 0) per
    context: a seeded half correctly marked, the other half marked on weak tokens at random."""
    n = len(contexts)
    wrong = set(rng.sample(range(n), n // 2))
    items = []
    for j, c in enumerate(contexts):
        vals = signed(c.values, sign)
        top = max(vals) if vals else 0.0
        order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
        right = {i for i in order[:MAX_MARKS] if top > 0 and vals[i] >= 0.5 * top} or {order[0]}
        if j in wrong:
            weak = [i for i in range(len(vals)) if i not in right and not (top > 0 and vals[i] >= 0.5 * top)]
            if len(weak) >= len(right):
                items.append((_marked(c.tokens, set(rng.sample(weak, len(right)))), 0))
                continue
        items.append((_marked(c.tokens, right), 1))
    return items


FUZZ_TEMPLATE = """\
We're studying neurons in a neural network. Each neuron looks for some particular \
thing in a short document. A neuron has been explained as:

"{explanation}"

Below are {n} text excerpts. In each, some tokens are marked <<like this>>. In some \
excerpts the marked tokens are exactly where the neuron fires most; in the others they \
were chosen at random. Using only the explanation, decide for each excerpt whether its \
marked tokens are ones the explanation describes.

{excerpts}

Respond with JSON in exactly this format, with one label per excerpt in order \
(1 = the marks match the explanation, 0 = they do not):
{{"labels": [{example_labels}]}}
"""


def fuzz_prompt(explanation: str, texts: Sequence[str]) -> str:
    body = "\n".join(f"Excerpt {i}: {t}" for i, t in enumerate(texts, 1))
    example = ", ".join("0 or 1" for _ in texts[:3]) + (", ..." if len(texts) > 3 else "")
    return FUZZ_TEMPLATE.format(explanation=_one_line(explanation), n=len(texts), excerpts=body,
                                example_labels=example)


# --------------------------------------------------------------------------- simulation


def sim_window(c: Context, n_tokens: int) -> tuple[list[str], list[float]]:
    """About two thirds of ``n_tokens`` before the context's hit, the rest after it."""
    if len(c.tokens) <= n_tokens:
        return list(c.tokens), list(c.values)
    lo = max(0, min(c.hit_index - (2 * n_tokens) // 3, len(c.tokens) - n_tokens))
    return list(c.tokens[lo:lo + n_tokens]), list(c.values[lo:lo + n_tokens])


SIM_TEMPLATE = """\
We're studying neurons in a neural network. Each neuron looks for some particular \
thing in a short document. A neuron has been explained as:

"{explanation}"

Below are {n} text excerpts, each given as its list of tokens. For every token, predict \
how strongly the neuron fires on it, as an integer from 0 (not at all) to 10 (as strongly \
as it ever fires), using only the explanation. Most tokens are 0.

{excerpts}

Respond with JSON in exactly this format: one list per excerpt, in order, with one \
integer per token ({counts} integers):
{{"activations": [[0, 0, ...], ...]}}
"""


def simulation_prompt(explanation: str, excerpts: Sequence[Sequence[str]]) -> str:
    body = "\n".join(f"Excerpt {i} ({len(t)} tokens): {json.dumps(list(t), ensure_ascii=False)}"
                     for i, t in enumerate(excerpts, 1))
    counts = ", ".join(str(len(t)) for t in excerpts)
    return SIM_TEMPLATE.format(explanation=_one_line(explanation), n=len(excerpts), excerpts=body, counts=counts)


def simulation_schema(n: int, limits: bool = False) -> dict:
    outer: dict[str, Any] = {"type": "array",
                             "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}}}
    if limits:
        outer.update(minItems=n, maxItems=n)
    return {"type": "object", "additionalProperties": False, "required": ["activations"],
            "properties": {"activations": outer}}


def simulation_max_tokens(excerpts: Sequence[Sequence[str]]) -> int:
    """Output budget: ~3 tokens per predicted number (', 0') plus the JSON around them."""
    return 3 * sum(len(t) for t in excerpts) + 8 * len(excerpts) + 32


def parse_simulation(text: str, lengths: Sequence[int]) -> list[list[float]]:
    """The predicted 0-10 values per excerpt; wrong counts or values raise ParseError."""
    obj = extract_json(text)
    if isinstance(obj, dict):
        obj = obj.get("activations", obj.get("predictions"))
    if not isinstance(obj, list) or len(obj) != len(lengths):
        raise ParseError(f"expected {len(lengths)} lists of predictions, got {str(obj)[:120]!r}")
    out = []
    for i, (pred, n) in enumerate(zip(obj, lengths), 1):
        if not isinstance(pred, list) or len(pred) != n:
            got = len(pred) if isinstance(pred, list) else type(pred).__name__
            raise ParseError(f"excerpt {i}: {got} predictions for {n} tokens")
        vals = []
        for v in pred:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:
                raise ParseError(f"excerpt {i}: prediction {v!r} is not a number from 0 to 10")
            vals.append(float(v))
        out.append(vals)
    return out


_DIGITS = re.compile(r"\d+")


def _digit_value(tok: str) -> int | None:
    s = tok.strip()
    return int(s) if s.isdigit() and int(s) <= 10 and len(s) <= 2 else None


def expected_values(text: str, logprobs: Sequence[dict] | None, parsed: list[list[float]]) -> tuple[list[list[float]], str]:
    """OpenAI's simulator read-out: at each predicted number the model wrote as one token, the
    expected value sum_d d * p(d) over the digit tokens 0-10 among that position's top
    alternatives, normalised over them. ``logprobs``: [{"token": str, "top": [[token,
    logprob], ...]}] per generated token, as the client returns it. Falls back to ``parsed``
    where a number spans several tokens; returns (values, 'logprobs' | 'parsed')."""
    if not logprobs:
        return parsed, "parsed"
    flat = [v for p in parsed for v in p]
    m = re.search(r'"activations"\s*:', text)
    start = m.end() if m else 0
    spans = [(g.start(), g.end()) for g in _DIGITS.finditer(text, start)]
    if len(spans) < len(flat):
        return parsed, "parsed"
    spans = spans[:len(flat)]
    # character offset of each generated token
    offsets, pos = [], 0
    for t in logprobs:
        offsets.append(pos)
        pos += len(t["token"])
    if pos != len(text):  # the tokens do not spell the text (whitespace trimmed etc.): no alignment
        return parsed, "parsed"
    by_start = {}
    for k, (off, t) in enumerate(zip(offsets, logprobs)):
        lead = len(t["token"]) - len(t["token"].lstrip())
        by_start[off + lead] = k
    out_flat, used = [], 0
    for (a, b), v in zip(spans, flat):
        k = by_start.get(a)
        tok = logprobs[k] if k is not None else None
        if tok is None or tok["token"].strip() != text[a:b]:
            out_flat.append(v)
            continue
        probs: dict[int, float] = {}
        for cand, lp in tok.get("top") or [[tok["token"], 0.0]]:
            d = _digit_value(cand)
            if d is not None and lp is not None:
                probs[d] = probs.get(d, 0.0) + math.exp(lp)
        total = sum(probs.values())
        if total <= 0:
            out_flat.append(v)
            continue
        out_flat.append(sum(d * p for d, p in probs.items()) / total)
        used += 1
    res, i = [], 0
    for p in parsed:
        res.append(out_flat[i:i + len(p)])
        i += len(p)
    return res, ("logprobs" if used else "parsed")


def correlation(pred: Sequence[float], true: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant (the score is undefined)."""
    n = len(pred)
    if n != len(true) or n < 2:
        return None
    mp, mt = sum(pred) / n, sum(true) / n
    sp = sum((p - mp) ** 2 for p in pred)
    st = sum((t - mt) ** 2 for t in true)
    if sp <= 0 or st <= 0:
        return None
    return sum((p - mp) * (t - mt) for p, t in zip(pred, true)) / math.sqrt(sp * st)


@dataclass
class SimulationCase:
    """What a simulation answer is scored against."""

    lengths: list[int]
    true: list[float]
    """True activations (feature's sign, floored at 0), all excerpts flattened."""


def simulation_case(contexts: Sequence[Context], sign: str, n_tokens: int) -> tuple[list[list[str]], SimulationCase]:
    excerpts, true = [], []
    for c in contexts:
        toks, vals = sim_window(c, n_tokens)
        excerpts.append(toks)
        true.extend(max(0.0, v) for v in signed(vals, sign))
    return excerpts, SimulationCase([len(t) for t in excerpts], true)


def simulation_score(text: str, logprobs, case: SimulationCase) -> tuple[float | None, str, int]:
    """(correlation or None, 'logprobs' | 'parsed', tokens scored); ParseError on a bad answer."""
    parsed = parse_simulation(text, case.lengths)
    values, method = expected_values(text, logprobs, parsed)
    flat = [v for p in values for v in p]
    return correlation(flat, case.true), method, len(flat)


# --------------------------------------------------------------------------- summaries


def weighted_mean(values: Sequence[float | None], weights: Sequence[float | None]) -> float | None:
    """Mean of the non-null values weighted by firing rate (null or 0 weights drop out)."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and w]
    tw = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / tw if tw > 0 else None


# --------------------------------------------------------------------------- the stage's use

TASKS = {"fuzzing": "fuzz", "simulation": "simulate"}
"""Scorer -> its task name in the call log (detection's is 'score')."""


def build_requests(scorers: Sequence[str], explained: Sequence[Any], held_out: Any, sign_of: Any,
                   simulation_tokens: int, seed_rng: Any, make: Any) -> dict[str, Any]:
    """Requests of the fuzzing and simulation scorers for every explained feature row.

    ``held_out(row) -> (activating, non_activating)`` contexts (detection's); ``seed_rng(name,
    tag)`` a seeded ``random.Random``; ``make(task, prompt, schema(n, limits), tag, check,
    max_tokens or None for the task's default, logprobs wanted, n items)`` an ``LLMRequest``. Returns {"requests": [...], "cases": {(task, tag): truth},
    "skipped": {(scorer, tag): reason}}."""
    out: dict[str, Any] = {"requests": [], "cases": {}, "skipped": {}}
    for row in explained:
        tag = f"{row.source}/{row.feature}/{row.sign}"
        pos, neg = held_out(row)
        if "fuzzing" in scorers:
            if len(pos) < 2:
                out["skipped"][("fuzzing", tag)] = f"not scored: {len(pos)} held-out activating contexts (needs 2)"
            else:
                items = fuzz_items(pos, row.sign, seed_rng("fuzz", tag))
                order = list(range(len(items)))
                seed_rng("fuzz-order", tag).shuffle(order)
                items = [items[i] for i in order]
                out["cases"][("fuzz", tag)] = [t for _, t in items]
                texts = [t for t, _ in items]
                out["requests"].append(make("fuzz", fuzz_prompt(row.explanation, texts), score_schema,
                                            tag, partial(parse_labels, n=len(texts)), None, False, len(texts)))
        if "simulation" in scorers:
            ctxs = list(pos)  # true per-token values are stored for a feature's own contexts only
            if not pos:
                out["skipped"][("simulation", tag)] = "not scored: no held-out activating context"
                continue
            excerpts, case = simulation_case(ctxs, row.sign, simulation_tokens)
            out["cases"][("simulate", tag)] = case
            out["requests"].append(make("simulate", simulation_prompt(row.explanation, excerpts), simulation_schema,
                                        tag, lambda text, n=case.lengths: parse_simulation(text, n),
                                        simulation_max_tokens(excerpts), True, len(excerpts)))
    return out


def apply_result(res: Any, row: Any, cases: dict, unparsable: Any) -> None:
    """Store one fuzz / simulate answer's score on its feature row (or the reason it has none)."""
    if res.text is None:
        row.fail(res.task, res.error or res.status)
        return
    case = cases[(res.task, res.tag)]
    try:
        if res.task == "fuzz":
            labels = parse_labels(res.text, len(case))
            row.fuzz_accuracy, row.fuzz_score = detection_scores(labels, case)
            row.fuzz_n = len(labels)
        else:
            score, method, n = simulation_score(res.text, res.logprobs, case)
            row.simulation_method, row.simulation_n = method, n
            row.simulation_score = score
            if score is None:
                row.fail("simulate", "correlation undefined: the predictions or the true activations are constant")
    except ParseError as err:
        row.fail(res.task, unparsable(res, err))
