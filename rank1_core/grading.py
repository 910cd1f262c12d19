"""Grading and the paper's tables: strip the thinking, check the answer, pass@1, % recovery.

A response is what the model wrote after the prompt. A 'think' prompt (s1 format: it ends
with the think marker) asks for

    {thinking} <answer_marker> {answer}

and only the part after the last answer marker is graded. A think response that never
writes the marker (cut off mid-thought, or a model that never learnt the format) did not
answer: by default it is graded wrong, as s1's own evaluation does (`missing_marker`
'wrong'); 'grade_tail' grades its last `tail_chars` characters instead (then a number inside
unfinished thinking can count). Either way the row says so (`marker_found` False). A 'plain'
prompt (the model's own chat format, no marker expected) is graded on the whole response.

- math: math-verify parses the answer (boxed first, then any LaTeX or plain expression)
  and checks it against the reference (`verify(gold, pred)`: fractions, decimals, sets...).
- multiple choice: the chosen letter ("Answer: (B)", "\\boxed{C}", a bare "D") against the
  reference letter.

pass@1 of a benchmark is the mean over problems of the per-problem share of correct
samples; its standard error is the sample standard deviation of those shares over the
square root of the number of problems (problems are the unit of sampling).

Table 1: base, LoRA, full and % recovery = (LoRA - base) / (full - base), undefined when the
full fine-tune does not beat the base. Table 2: each ablation's score x with
(x - base) / (LoRA - base), undefined when the LoRA does not beat the base.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

import pandas as pd

LETTERS = "ABCDEFGHIJ"
MAX_ANSWER_CHARS = 2000
"""Longest answer part graded (its end): bounds math-verify's work on a runaway answer."""
UNDEFINED = "undefined"
MISSING_MARKER = ("wrong", "grade_tail")
"""What a think-format response without the answer marker is graded as (see the module doc)."""
PROMPTS = ("think", "plain")


# --------------------------------------------------------------------------- benchmark files

BENCHMARK_COLUMNS = ("problem_id", "question", "answer", "kind", "choices")


class BenchmarkError(ValueError):
    """A benchmark file is malformed; the message names the file, row and column."""


def read_benchmark(path: str, filesystem=None, limit: int = 0) -> pd.DataFrame:
    """A prepared benchmark (problem_id, question, answer, kind, choices, ...), checked.

    Every row needs a problem id, a question, a non-empty answer and a kind ('math' | 'mc');
    a multiple-choice answer must be one of the letters of its choices. `limit`: first N rows.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, filesystem=filesystem)
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"benchmark file {path} cannot be read: {e}") from None
    missing = [c for c in BENCHMARK_COLUMNS if c not in table.column_names]
    if missing:
        raise BenchmarkError(f"benchmark file {path} has no column {missing[0]!r} "
                             f"(columns: {', '.join(table.column_names)}; needed: {', '.join(BENCHMARK_COLUMNS)})")
    df = table.to_pandas()
    if limit:
        df = df.iloc[:limit].reset_index(drop=True)
    seen = set()
    for i, r in enumerate(df.itertuples(index=False)):
        where = f"benchmark file {path}, row {i} (problem_id {r.problem_id!r})"
        for col in ("problem_id", "question", "answer"):
            v = getattr(r, col)
            if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip():
                raise BenchmarkError(f"{where}: column {col!r} is empty")
        if r.problem_id in seen:
            raise BenchmarkError(f"{where}: duplicate problem_id")
        seen.add(r.problem_id)
        if r.kind not in ("math", "mc"):
            raise BenchmarkError(f"{where}: column 'kind' is {r.kind!r}, expected 'math' or 'mc'")
        if r.kind == "mc":
            n = len(r.choices) if r.choices is not None else 0
            if n < 2 or str(r.answer).strip().upper() not in LETTERS[:n]:
                raise BenchmarkError(f"{where}: multiple-choice answer {r.answer!r} is not one of the "
                                     f"letters of its {n} choices")
    df["n_choices"] = [len(c) if c is not None else 0 for c in df["choices"]]
    return df


# --------------------------------------------------------------------------- one response


@dataclass
class Graded:
    extracted: str | None
    """The answer as parsed (math: math-verify's string form; mc: the letter); None if none."""
    correct: bool
    marker_found: bool
    """Whether the response wrote the answer marker."""


def split_answer(response: str, answer_marker: str, tail_chars: int = 300) -> tuple[str, bool]:
    """(the graded part of a response, whether the answer marker was found).

    The text after the last answer marker; without a marker, the last `tail_chars` characters.
    """
    i = response.rfind(answer_marker) if answer_marker else -1
    if i >= 0:
        return response[i + len(answer_marker):].strip()[-MAX_ANSWER_CHARS:], True
    return response[-tail_chars:].strip(), False


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may use (Ray Data can run
    # a batch in another thread): there, parse without a timeout.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _mv_parse(text: str):
    from math_verify import parse

    return parse(text, parsing_timeout=_timeout())


def parse_reference(answer: str):
    """math-verify's parse of a reference answer ('7', '\\frac{14}{3}', '$(3, \\pi)$')."""
    a = answer.strip()
    if not a:
        return []
    if "$" in a or "\\boxed" in a:
        return _mv_parse(a)
    return _mv_parse(f"${a}$") or _mv_parse(a)


def grade_math(answer_text: str, reference: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) of a math answer against the reference answer."""
    from math_verify import verify

    pred = _mv_parse(answer_text)
    if not pred:
        return None, False
    extracted = str(pred[1]) if len(pred) > 1 else str(pred[0])
    gold = parse_reference(reference)
    if not gold:
        # An unparseable reference (free text): exact match of the normalised strings.
        return extracted, _norm(extracted) == _norm(reference)
    return extracted, bool(verify(gold, pred, timeout_seconds=_timeout()))


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip("$").strip()).lower()


def extract_choice(answer_text: str, n_choices: int = 4) -> str | None:
    """The chosen letter of a multiple-choice answer, or None.

    In order: \\boxed{X}; "answer is X" / "Answer: (X)"; an answer that is only a letter;
    the last "(X)" or "X)"; the last standalone capital letter that is not an article-like
    word start (not followed by a lower-case word). The last match of the first kind found wins.
    """
    letters = LETTERS[:max(1, min(n_choices, len(LETTERS)))]
    L = f"[{letters}]"
    patterns = [
        rf"\\boxed\{{\s*(?:\\text(?:bf)?\{{)?\s*\(?({L})\)?",
        rf"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*(?:\*\*)?\s*(?:option\s*)?\(?({L})(?![A-Za-z])",
        rf"^\s*\(?({L})\)?[\.\):]?\s*$",
        rf"\(({L})\)|(?<![A-Za-z])({L})\)",
        rf"(?<![A-Za-z\\])({L})(?![A-Za-z])(?!\s+[a-z])",
    ]
    for pat in patterns:
        matches = list(re.finditer(pat, answer_text, flags=re.MULTILINE))
        if matches:
            m = matches[-1]
            return next(g for g in m.groups() if g)
    return None


def grade(response: str, reference: str, kind: str, answer_marker: str, tail_chars: int = 300,
          n_choices: int = 4, missing_marker: str = "wrong", prompt: str = "think") -> Graded:
    """Grade one response (`kind` 'math' or 'mc') to a `prompt` 'think' (s1 format: graded after
    the answer marker; without it per `missing_marker`) or 'plain' (the whole response)."""
    if kind not in ("math", "mc"):
        raise ValueError(f"unknown benchmark kind {kind!r} (expected 'math' or 'mc')")
    if missing_marker not in MISSING_MARKER:
        raise ValueError(f"missing_marker must be one of {', '.join(MISSING_MARKER)}, got {missing_marker!r}")
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    text, found = split_answer(response, answer_marker, tail_chars)
    if prompt == "plain":
        text = response.strip()[-MAX_ANSWER_CHARS:]
    elif not found and missing_marker == "wrong":
        return Graded(extracted=None, correct=False, marker_found=False)
    if kind == "math":
        extracted, ok = grade_math(text, reference)
    elif kind == "mc":
        extracted = extract_choice(text, n_choices)
        ok = extracted is not None and extracted == reference.strip().upper()
    return Graded(extracted=extracted, correct=bool(ok), marker_found=found)


SAMPLE_COLUMNS = ["variant", "benchmark", "problem_id", "sample", "response", "extracted", "correct",
                  "marker_found", "n_tokens", "finished", "backend", "lora_mode", "answer"]


def grade_samples(generated: pd.DataFrame, answer_marker: str, tail_chars: int = 300,
                  missing_marker: str = "wrong") -> pd.DataFrame:
    """Grade generated rows (response, answer, kind, n_choices, [prompt], ...) -> SAMPLE_COLUMNS.

    `prompt` ('think' | 'plain') says how each row was prompted (see `grade`); without the
    column every row is 'think'. Call it from the main thread: math-verify's parse/verify
    timeouts use SIGALRM.
    """
    prompts = generated["prompt"] if "prompt" in generated.columns else ["think"] * len(generated)
    graded = [grade(r.response, r.answer, r.kind, answer_marker, tail_chars, int(r.n_choices) or 4,
                    missing_marker, p)
              for r, p in zip(generated.itertuples(index=False), prompts)]
    out = generated.copy()
    out["extracted"] = [g.extracted for g in graded]
    out["correct"] = [g.correct for g in graded]
    out["marker_found"] = [g.marker_found for g in graded]
    return out[SAMPLE_COLUMNS]


# --------------------------------------------------------------------------- pass@1


def pass_at_1(per_problem: list[list[bool]]) -> tuple[float, float]:
    """(pass@1, standard error) from each problem's sample outcomes.

    pass@1 = mean over problems of (correct samples / samples); the standard error is the
    sample standard deviation (ddof 1) of those per-problem shares over sqrt(problems),
    NaN with fewer than two problems.
    """
    if not per_problem:
        return float("nan"), float("nan")
    shares = [sum(map(bool, s)) / len(s) for s in per_problem if len(s)]
    if len(shares) != len(per_problem):
        raise ValueError("every problem needs at least one sample")
    n = len(shares)
    mean = sum(shares) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in shares) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """samples (variant, benchmark, problem_id, sample, correct, ...) -> one row per
    (variant, benchmark): n_problems, n_samples, pass1, stderr."""
    rows = []
    for (variant, bench), g in samples.groupby(["variant", "benchmark"], sort=True):
        per = [list(x) for _, x in g.groupby("problem_id", sort=True)["correct"]]
        p, se = pass_at_1(per)
        rows.append({"variant": variant, "benchmark": bench, "n_problems": len(per),
                     "n_samples": int(len(g)), "pass1": p, "stderr": se})
    return pd.DataFrame(rows, columns=["variant", "benchmark", "n_problems", "n_samples", "pass1", "stderr"])


# --------------------------------------------------------------------------- tables


def recovery(base: float, lora: float, full: float) -> float | None:
    """(lora - base) / (full - base); None (undefined) unless full beats base."""
    if any(x is None or math.isnan(x) for x in (base, lora, full)) or not full > base:
        return None
    return (lora - base) / (full - base)


def relative_gain(x: float, base: float, lora: float) -> float | None:
    """Table 2's (x - base) / (lora - base); None (undefined) unless the LoRA beats base."""
    if any(v is None or math.isnan(v) for v in (x, base, lora)) or not lora > base:
        return None
    return (x - base) / (lora - base)


def _pct(x: float | None) -> str:
    return UNDEFINED if x is None else f"{100 * x:.2f}%"


def _score(p: float, se: float | None = None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    if se is None or math.isnan(se):
        return f"{p:.4f}"
    return f"{p:.4f} ± {se:.4f}"


def _lookup(summary: pd.DataFrame) -> dict[tuple[str, str], tuple[float, float]]:
    return {(r.variant, r.benchmark): (float(r.pass1), float(r.stderr)) for r in summary.itertuples()}


def marker_rates(summary: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(variant, benchmark) -> share of responses that reached the answer marker, from a
    summary's `marker_rate`; left out for a 'plain' prompt (`prompt` column: no marker is
    expected there) and when the summary has no `marker_rate`."""
    if "marker_rate" not in summary.columns:
        return {}
    plain = summary["prompt"].astype(str) == "plain" if "prompt" in summary.columns else [False] * len(summary)
    return {(str(v), str(b)): float(m) for v, b, m, p in zip(summary["variant"], summary["benchmark"],
                                                            summary["marker_rate"], plain)
            if not p and m == m and m is not None}


def marker_cell(rates: list[float | None]) -> str:
    """Table 1's marker column: each variant's rate as a percentage, ' / ' between, '—' if none."""
    return " / ".join("—" if r is None or r != r else f"{100 * r:.1f}%" for r in rates)


def table1(summary: pd.DataFrame, benchmarks: list[str] | None = None) -> pd.DataFrame:
    """Table 1 for any set of benchmarks: base, lora, full (pass@1 and stderr) and recovery.

    `recovery` is a float (NaN when undefined) and `recovery_text` the printed form
    ('86.36%' or 'undefined'). A variant that was not evaluated shows as NaN. With a
    `marker_rate` in the summary: `<variant>_marker_rate`, the share of its responses that
    reached the answer marker (NaN for a plain-prompted variant: no marker expected).
    """
    get = _lookup(summary)
    marks = marker_rates(summary)
    benches = benchmarks or sorted(summary["benchmark"].unique())
    rows = []
    nan = (float("nan"), float("nan"))
    for b in benches:
        (pb, sb), (pl, sl), (pf, sf) = (get.get((v, b), nan) for v in ("base", "lora", "full"))
        rec = recovery(pb, pl, pf)
        rows.append({"benchmark": b, "base": pb, "base_stderr": sb, "lora": pl, "lora_stderr": sl,
                     "full": pf, "full_stderr": sf, "recovery": float("nan") if rec is None else rec,
                     "recovery_text": _pct(rec)})
        if marks:
            rows[-1].update({f"{v}_marker_rate": marks.get((v, b), float("nan")) for v in ("base", "lora", "full")})
    return pd.DataFrame(rows)


VARIANT_LABELS = {"base": "base", "lora": "LoRA", "full": "full"}


def table1_markdown(t: pd.DataFrame) -> str:
    """Table 1 in Markdown; with `<variant>_marker_rate` columns, a last column giving the share
    of each variant's responses that reached the answer marker (plain-prompted ones left out)."""
    from rank1_core.report.tables import md_escape

    marked = [v for v in ("base", "lora", "full")
              if f"{v}_marker_rate" in t.columns and t[f"{v}_marker_rate"].notna().any()]
    head = "| Benchmark | Base | Rank-1 LoRA | Full fine-tune | % Recovery |"
    if marked:
        head += f" Answer marker reached ({' / '.join(VARIANT_LABELS[v] for v in marked)}) |"
    lines = [head, "|---" * (5 + bool(marked)) + "|"]
    for r in t.to_dict("records"):
        line = (f"| {md_escape(r['benchmark'])} | {_score(r['base'], r['base_stderr'])} | {_score(r['lora'], r['lora_stderr'])} | "
                f"{_score(r['full'], r['full_stderr'])} | {r['recovery_text']} |")
        if marked:
            line += f" {marker_cell([r[f'{v}_marker_rate'] for v in marked])} |"
        lines.append(line)
    lines.append("")
    lines.append("pass@1 ± standard error over problems. % Recovery = (LoRA - base) / (full - base); "
                 "undefined when the full fine-tune does not beat the base.")
    if marked:
        lines.append("Answer marker reached: share of the responses to the s1-format prompt that wrote the answer "
                     "marker; the others are graded per evaluate.missing_marker (default: wrong).")
    return "\n".join(lines) + "\n"


def table2(summary: pd.DataFrame, groups: list[str], benchmarks: list[str] | None = None) -> pd.DataFrame:
    """Table 2: per benchmark the LoRA and each `<group>_ablated` variant, with (x - b)/(l - b).

    Columns: benchmark, base, lora, and per group `<group>` (score), `<group>_stderr`,
    `<group>_relative` (float, NaN when undefined), `<group>_text` ('0.9000 (86.84%)').
    """
    get = _lookup(summary)
    benches = benchmarks or sorted(summary["benchmark"].unique())
    nan = (float("nan"), float("nan"))
    rows = []
    for b in benches:
        pb, _ = get.get(("base", b), nan)
        pl, sl = get.get(("lora", b), nan)
        row = {"benchmark": b, "base": pb, "lora": pl, "lora_stderr": sl,
               "lora_text": f"{_score(pl)} ({_pct(relative_gain(pl, pb, pl))})"}
        for g in groups:
            px, sx = get.get((f"{g}_ablated", b), nan)
            rel = relative_gain(px, pb, pl)
            row.update({g: px, f"{g}_stderr": sx, f"{g}_relative": float("nan") if rel is None else rel,
                        f"{g}_text": f"{_score(px)} ({_pct(rel)})"})
        rows.append(row)
    return pd.DataFrame(rows)


def table2_markdown(t: pd.DataFrame, groups: list[str]) -> str:
    from rank1_core.report.tables import md_escape

    head = ["Benchmark", "Base", "Full LoRA"] + [f"LoRA ({md_escape(g)}-ablated)" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t.to_dict("records"):
        cells = [md_escape(r["benchmark"]), _score(r["base"]), r["lora_text"]] + [r[f"{g}_text"] for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("pass@1 with (x - base) / (LoRA - base) in parentheses (Full LoRA = 100%); "
                 "undefined when the LoRA does not beat the base.")
    return "\n".join(lines) + "\n"
