"""Loaders: s1K-1.1 traces and the benchmarks, in their published schemas, plus offline sets.

Published schemas handled:
- s1K-1.1: question, solution, cot_type, source_type, metadata, gemini_thinking_trajectory,
  gemini_attempt, deepseek_thinking_trajectory, deepseek_attempt.
- chat (TRL's conversational format, most hub SFT sets): messages, a list of {role, content}
  with roles system (first only) / user / assistant, multi-turn allowed.
- MATH-500: problem, solution, answer, subject, level, unique_id.
- AIME 2024 (no figures, as s1 uses it): id, problem, solution, answer, url.
- GPQA-Diamond: Question, Correct Answer, Incorrect Answer 1-3, Record ID (the four
  choices are shuffled with a fixed seed per question).

Benchmark rows are normalised to: problem_id, question, answer, kind ('math' | 'mc'),
choices (list, empty for math), source.
"""

from __future__ import annotations

import hashlib
import json
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


CHAT_ROLES = ("system", "user", "assistant")


def check_chat_row(row: dict, where: str) -> dict:
    """A chat row: `messages`, a list of {role: system|user|assistant, content: non-empty text}
    with at least one assistant turn (a system message only first). Returns the row with
    `question` (its first user turn, for de-duplication against the benchmarks)."""
    msgs = row.get("messages")
    if msgs is None:
        raise DataError(f"{where}: missing field 'messages'", reason="missing field 'messages'")
    if hasattr(msgs, "tolist"):  # a NumPy array from some Parquet readers
        msgs = msgs.tolist()
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' should be a non-empty list of {{role, content}}",
                        reason="messages is not a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{j}] should be an object with 'role' and 'content', got {m!r:.80}",
                            reason="message without role/content")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{j}]: unknown role {m['role']!r} (known: {', '.join(CHAT_ROLES)})",
                            reason="unknown role")
        if m["role"] == "system" and j > 0:
            raise DataError(f"{where}: messages[{j}]: a system message may only come first",
                            reason="system message not first")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"{where}: messages[{j}] ({m['role']}): empty content", reason="empty content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn (nothing to train on)", reason="no assistant turn")
    user = next((m["content"] for m in msgs if m["role"] == "user"), "")
    meta = row.get("metadata")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs], "question": user,
            "metadata": meta if isinstance(meta, str) else json.dumps(meta) if meta is not None else "",
            "source_type": str(row.get("source", "chat"))}


def load_chat(cfg: DataConfig, skipped: Skipped) -> list[dict]:
    """Chat rows (JSONL, Parquet, ... or a hub dataset with a `messages` column), checked; each
    also carries the s1K trace fields prepare's trace table shows (thinking empty, attempt the
    assistant turns joined by a blank line)."""
    rows = load_checked(cfg.path, check_chat_row, cfg.bad_rows, skipped)
    for r in rows:
        r[f"{cfg.trajectory}_thinking_trajectory"] = ""
        r[f"{cfg.trajectory}_attempt"] = "\n\n".join(m["content"] for m in r["messages"] if m["role"] == "assistant")
    return rows[: cfg.num_traces] if cfg.num_traces else rows


def synthetic_chat_rows(cfg: DataConfig, model, seed: int, num_traces: int, turns: int = 2) -> list[dict]:
    """The offline synthetic traces as chat rows: `turns` problems per conversation (user
    question, assistant answer with s1's think / answer sentinels as text), `num_traces`
    traces in all (the multi-turn chat data configs/byo.yaml trains on)."""
    import dataclasses

    from rank1_core.data.format import assistant_text
    from rank1_core.data.synthetic import synthetic_traces

    gen = dataclasses.replace(cfg, source="synthetic", path=None, num_traces=num_traces, heldout_traces=0)
    traj, att = f"{gen.trajectory}_thinking_trajectory", f"{gen.trajectory}_attempt"
    traces = synthetic_traces(gen, seed)
    rows = []
    for i in range(0, len(traces) - turns + 1, turns):
        msgs = []
        for t in traces[i:i + turns]:
            msgs += [{"role": "user", "content": t["question"]},
                     {"role": "assistant", "content": assistant_text(t[traj], t[att], model, "")}]
        rows.append({"messages": msgs, "source": "synthetic-chat"})
    return rows
