"""Offline reasoning traces generated with reasoning-gym, in the s1K-1.1 schema.

Each problem gets a step-by-step thinking trajectory and an answer attempt. A configured
share of traces carries R1-style markers ("Wait,", "Hmm,", "Let me double-check", and
slips that are noticed and corrected) so that the behaviours the paper finds adapter
components firing on exist in the data.

Steps are built from the problem's own expression (chain_sum, basic_arithmetic) or taken
from reasoning-gym's worked solution (gsm_symbolic's `answer_cot`); every intermediate
value is computed here and checked against reasoning-gym's answer.

What the generator plants is recorded as it writes, as exact character spans: the
templates carry inline marks (``⟦hesitation|Wait⟧``) that `plant` strips, returning the
text and its spans. They are stored in the row's ``metadata`` JSON under ``"spans"``, a list
of ``{"concept", "field" ("thinking" | "attempt"), "start", "end"}`` (character offsets into
the trajectory / attempt text, end exclusive), so they survive the s1K-1.1 schema round
trip. Concepts (`PLANTED_CONCEPTS`):

- ``hesitation``: the word "Wait" / "Hmm" opening a hesitation;
- ``verification``: a double-check / verify / re-check clause, through its "Yes.";
- ``correction``: the "that's not right." clause after a slip;
- ``slip_value``: the wrong value of a slipped step (corrected on the next line);
- ``step_result``: the result of a correct step (after "=", or "that gives");
- ``operator``: every arithmetic operator the trace writes (steps and the expression);
- ``final_answer``: the final value ("So the result is X." and the attempt's answer).
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import random
import re
from fractions import Fraction
from typing import Iterable

from rank1_core.config import DataConfig, TaskMix

S1K_COLUMNS = (
    "question", "solution", "cot_type", "source_type", "metadata",
    "gemini_thinking_trajectory", "gemini_attempt", "deepseek_thinking_trajectory", "deepseek_attempt",
)
SUPPORTED_TASKS = ("chain_sum", "basic_arithmetic", "gsm_symbolic")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


PLANTED_CONCEPTS = ("hesitation", "verification", "correction", "slip_value", "step_result", "operator",
                    "final_answer")
_OPEN, _SEP, _CLOSE = "⟦", "|", "⟧"


def plant(marked: str) -> tuple[str, list[tuple[str, int, int]]]:
    """Strip inline marks ``⟦concept|text⟧`` (nestable) from `marked`: the plain text and the
    (concept, start, end) character spans of the marked parts, in order of their start."""
    out: list[str] = []
    spans: list[tuple[str, int, int]] = []
    stack: list[tuple[str, int]] = []
    n = 0
    i = 0
    while i < len(marked):
        ch = marked[i]
        if ch == _OPEN:
            j = marked.index(_SEP, i)
            stack.append((marked[i + 1:j], n))
            i = j + 1
            continue
        if ch == _CLOSE:
            concept, start = stack.pop()
            spans.append((concept, start, n))
            i += 1
            continue
        out.append(ch)
        n += 1
        i += 1
    if stack:
        raise ValueError(f"unclosed mark {stack[-1][0]!r} in {marked!r}")
    spans.sort(key=lambda s: (s[1], -s[2]))
    return "".join(out), spans


def _safe(text: str) -> str:
    """Content inserted into a marked template must not hold the mark characters."""
    if any(c in text for c in (_OPEN, _CLOSE)):
        raise ValueError(f"text {text!r} holds a reserved mark character ({_OPEN} or {_CLOSE})")
    return text


def _m(concept: str, text: str) -> str:
    return f"{_OPEN}{concept}{_SEP}{text}{_CLOSE}"


def _mark_operators(expr: str) -> str:
    """An expression with its binary operators (between spaces) marked as `operator`."""
    return re.sub(r"(?<= )([+\-*/×÷])(?= )", lambda mo: _m("operator", mo.group(1)), _safe(expr))


def question_key(question: str) -> str:
    """Normalised identity of a problem, for disjointness checks between splits."""
    norm = re.sub(r"\s+", " ", question.strip().lower())
    return hashlib.sha256(norm.encode()).hexdigest()[:16]


def _fmt(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    return str(float(x)).rstrip("0").rstrip(".")


def expression_steps(expr: str) -> tuple[list[tuple[str, str, str, Fraction]], Fraction]:
    """Left-to-right evaluation steps of an arithmetic expression, honouring precedence.

    Returns [(left, op, right, result)] in the order a person computes them, and the value.
    """
    tree = ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval").body
    steps: list[tuple[str, str, str, Fraction]] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            r = Fraction(_OPS[type(node.op)](a, b))
            steps.append((_fmt(a), _SYM[type(node.op)], _fmt(b), r))
            return r
        raise ValueError(f"unsupported expression {expr!r}")

    value = ev(tree)
    return steps, value


class TraceWriter:
    """Builds one trace's thinking text, optionally with hesitation and corrected slips."""

    HESITATIONS = ("Wait,", "Hmm,", "Wait, let me re-check that.", "Hmm, let me double-check.")

    def __init__(self, rng: random.Random, hesitate: bool):
        self.rng = rng
        self.hesitate = hesitate
        self.lines: list[str] = []
        self.markers: list[str] = []

    def step(self, left: str, op: str, right: str, result: Fraction) -> None:
        # Lines are written with inline marks (see `plant`); the random draws are the same as
        # before the marks existed, so a seed gives the same traces.
        left, right, o = _safe(left), _safe(right), _m("operator", op)
        line = f"{left} {o} {right} = {_m('step_result', _fmt(result))}."
        if self.hesitate and self.rng.random() < 0.35:
            kind = self.rng.choice(("slip", "wait", "hmm"))
            if kind == "slip":
                wrong = result + self.rng.choice((-2, -1, 1, 2, 10, -10))
                self.lines.append(f"{left} {o} {right} = {_m('slip_value', _fmt(wrong))}.")
                fix = _m("correction", "that's not right.")
                self.lines.append(f"{_m('hesitation', 'Wait')}, {fix} {line}")
                self.markers.append("slip")
                return
            if kind == "wait":
                self.lines.append(line)
                check = _m("verification", f"let me double-check: {left} {o} {right} is {_fmt(result)}. Yes.")
                self.lines.append(f"{_m('hesitation', 'Wait')}, {check}")
                self.markers.append("wait")
                return
            self.lines.append(f"{_m('hesitation', 'Hmm')}, {left} {o} {right}... that gives "
                              f"{_m('step_result', _fmt(result))}.")
            self.markers.append("hmm")
            return
        self.lines.append(line)

    def text(self, intro: str, outro: str) -> str:
        """The thinking text with its inline marks (strip them with `plant`)."""
        body = [intro, *self.lines]
        if self.hesitate and self.rng.random() < 0.5:
            body.append(f"{_m('hesitation', 'Hmm')}, "
                        f"{_m('verification', 'let me double-check the whole computation once more.')}")
            self.markers.append("recheck")
        body.append(outro)
        return "\n".join(body)


def _arith_trace(item: dict, rng: random.Random, hesitate: bool) -> tuple[str, list[str]]:
    expr = item["metadata"]["expression"]
    steps, value = expression_steps(expr)
    if _fmt(value) != str(item["answer"]).strip():
        raise ValueError(f"computed {_fmt(value)} for {expr!r} but reasoning-gym says {item['answer']!r}")
    w = TraceWriter(rng, hesitate)
    for s in steps:
        w.step(*s)
    intro = f"I need to compute {_mark_operators(expr)}. Let me go step by step."
    return w.text(intro, f"So the result is {_m('final_answer', _fmt(value))}."), w.markers


def _gsm_trace(item: dict, rng: random.Random, hesitate: bool) -> tuple[str, list[str]]:
    cot = item["metadata"]["answer_cot"]
    cot = re.sub(r"\n#### .*$", "", cot.strip())
    lines = [ln for ln in cot.splitlines() if ln.strip()]
    step = re.compile(r"(\d+) ([+\-×*]) (\d+) = (\d+)")

    def marked(ln: str) -> str:
        return step.sub(lambda mo: f"{mo.group(1)} {_m('operator', mo.group(2))} {mo.group(3)} = "
                                   f"{_m('step_result', mo.group(4))}", _safe(ln))

    markers: list[str] = []
    if hesitate:
        out = []
        for ln in lines:
            out.append(marked(ln))
            m = step.search(ln)
            if m and rng.random() < 0.4:
                check = _m("verification", f"let me verify: {m.group(1)} {_m('operator', m.group(2))} {m.group(3)} = "
                                           f"{m.group(4)}. Yes.")
                out.append(f"{_m('hesitation', 'Wait')}, {check}")
                markers.append("wait")
        if rng.random() < 0.5:
            out.append(f"{_m('hesitation', 'Hmm')}, {_m('verification', 'let me double-check the final total once more.')}")
            markers.append("recheck")
        return "\n".join(out), markers
    return "\n".join(marked(ln) for ln in lines), markers


def _make_trace(task: str, item: dict, rng: random.Random, hesitate: bool) -> tuple[str, list[str]]:
    """The thinking text *with inline marks* and the trace's marker kinds."""
    if task in ("chain_sum", "basic_arithmetic"):
        return _arith_trace(item, rng, hesitate)
    if task == "gsm_symbolic":
        return _gsm_trace(item, rng, hesitate)
    raise ValueError(f"task {task!r} has no trace builder (supported: {', '.join(SUPPORTED_TASKS)})")


def generate_problems(task: str, config: dict, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    if task not in SUPPORTED_TASKS:
        raise ValueError(f"reasoning-gym task {task!r} is not supported (supported: {', '.join(SUPPORTED_TASKS)})")
    ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    return [ds[i] for i in range(size)]


def _split_counts(mix: list[TaskMix], total: int) -> list[int]:
    w = [max(m.weight, 0.0) for m in mix]
    if sum(w) <= 0:
        raise ValueError("data.tasks: weights must not all be zero")
    counts = [int(total * x / sum(w)) for x in w]
    counts[0] += total - sum(counts)
    return counts


def synthetic_traces(cfg: DataConfig, seed: int, exclude: Iterable[str] = ()) -> list[dict]:
    """`cfg.num_traces` traces in the s1K-1.1 schema, none of whose questions is in `exclude`
    (question keys, see `question_key`)."""
    rng = random.Random(seed)
    excluded = set(exclude)
    rows: list[dict] = []
    seen: set[str] = set()
    for mix, n in zip(cfg.tasks, _split_counts(cfg.tasks, cfg.num_traces)):
        if n == 0:
            continue
        # Oversample: duplicates and excluded problems are dropped.
        problems = generate_problems(mix.task, mix.config, size=n * 3 + 20, seed=seed * 7919 + 17)
        kept = 0
        for item in problems:
            key = question_key(item["question"])
            if key in excluded or key in seen:
                continue
            seen.add(key)
            hesitate = rng.random() < cfg.hesitation_share
            thinking, markers = _make_trace(mix.task, item, rng, hesitate)
            thinking, t_spans = plant(thinking)
            attempt, a_spans = plant(f"The answer is {_m('final_answer', _safe(str(item['answer'])))}.")
            spans = [{"concept": c, "field": f, "start": a, "end": b}
                     for f, sp in (("thinking", t_spans), ("attempt", a_spans)) for c, a, b in sp]
            rows.append({
                "question": item["question"],
                "solution": str(item["answer"]),
                "cot_type": "math",
                "source_type": f"reasoning_gym/{mix.task}",
                "metadata": json.dumps({"task": mix.task, "markers": markers,
                                        "source_index": item["metadata"].get("source_index"), "spans": spans}),
                "gemini_thinking_trajectory": thinking,
                "gemini_attempt": attempt,
                "deepseek_thinking_trajectory": thinking,
                "deepseek_attempt": attempt,
            })
            kept += 1
            if kept == n:
                break
        if kept < n:
            raise ValueError(f"reasoning-gym task {mix.task!r} gave only {kept} distinct problems, {n} wanted")
    rng.shuffle(rows)
    return rows
