"""Loaders: s1K-1.1 traces and the benchmarks, in their published schemas, plus offline sets.

Published schemas handled:
- s1K-1.1: question, solution, cot_type, source_type, metadata, gemini_thinking_trajectory,
  gemini_attempt, deepseek_thinking_trajectory, deepseek_attempt.
- MATH-500: problem, solution, answer, subject, level, unique_id.
- AIME 2024 (no figures, as s1 uses it): id, problem, solution, answer, url.
- GPQA-Diamond: Question, Correct Answer, Incorrect Answer 1-3, Record ID (the four
  choices are shuffled with a fixed seed per question).

Benchmark rows are normalised to: problem_id, question, answer, kind ('math' | 'mc'),
choices (list, empty for math), source.
"""

from __future__ import annotations

import hashlib
import random

from rank1_core.config import BenchmarkConfig, DataConfig
from rank1_core.data.io import DataError, Skipped, check_row, load_checked
from rank1_core.data.synthetic import S1K_COLUMNS, generate_problems, question_key

LETTERS = "ABCD"


def load_s1k(cfg: DataConfig, skipped: Skipped) -> list[dict]:
    """s1K-1.1 rows with the configured trajectory present and non-empty."""
    traj, att = f"{cfg.trajectory}_thinking_trajectory", f"{cfg.trajectory}_attempt"

    def check(row: dict, where: str) -> dict:
        missing = [c for c in S1K_COLUMNS if c not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing} of the s1K-1.1 schema")
        check_row(row, where, {"question": str, traj: str, att: str}, nonempty=("question", traj, att))
        return row

    rows = load_checked(cfg.path, check, cfg.bad_rows, skipped)
    return rows[: cfg.num_traces] if cfg.num_traces else rows


def _stable_seed(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def load_benchmark(b: BenchmarkConfig, seed: int, skipped: Skipped, bad_rows: str = "error") -> list[dict]:
    if b.source == "synthetic":
        # Seeds far from the training traces' seed space; disjointness is also enforced by
        # question keys in prepare (training excludes every benchmark question).
        # Oversampled: duplicates are dropped and exactly `size` distinct problems kept.
        items = generate_problems(b.task, b.task_config, size=b.size * 2 + 10,
                                  seed=_stable_seed("bench", b.name, seed))
        rows, seen = [], set()
        for i, it in enumerate(items):
            k = question_key(it["question"])
            if k in seen:
                continue
            if len(rows) == b.size:
                break
            seen.add(k)
            rows.append({"problem_id": f"{b.name}-{i}", "question": it["question"], "answer": str(it["answer"]),
                         "kind": "math", "choices": [], "source": f"reasoning_gym/{b.task}"})
        if len(rows) < b.size:
            raise DataError(f"benchmark {b.name!r}: reasoning-gym task {b.task!r} has only {len(rows)} "
                            f"distinct problems with these options, {b.size} requested")
        return rows

    if b.source == "math500":
        def check(r, where):
            check_row(r, where, {"problem": str, "answer": str}, nonempty=("problem", "answer"))
            return {"problem_id": str(r.get("unique_id") or where), "question": r["problem"],
                    "answer": r["answer"], "kind": "math", "choices": [], "source": "math500"}
    elif b.source == "aime24":
        def check(r, where):
            check_row(r, where, {"problem": str}, nonempty=("problem",))
            if r.get("answer") is None or str(r["answer"]).strip() == "":
                raise DataError(f"{where}: missing field 'answer'")
            return {"problem_id": str(r.get("id", where)), "question": r["problem"],
                    "answer": str(r["answer"]).strip(), "kind": "math", "choices": [], "source": "aime24"}
    elif b.source == "gpqa_diamond":
        def check(r, where):
            fields = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
            check_row(r, where, {f: str for f in fields}, nonempty=fields)
            pid = str(r.get("Record ID") or where)
            choices = [r["Correct Answer"].strip()] + [r[f"Incorrect Answer {i}"].strip() for i in (1, 2, 3)]
            order = list(range(4))
            random.Random(_stable_seed("gpqa", pid, seed)).shuffle(order)
            shuffled = [choices[i] for i in order]
            letter = LETTERS[order.index(0)]
            q = r["Question"].strip() + "\n\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(shuffled))
            return {"problem_id": pid, "question": q, "answer": letter, "kind": "mc", "choices": shuffled,
                    "source": "gpqa_diamond"}
    else:  # pragma: no cover - the config rejects other sources
        raise DataError(f"unknown benchmark source {b.source!r}")
    rows = load_checked(b.path, check, bad_rows, skipped)
    return rows[: b.size] if b.size else rows
