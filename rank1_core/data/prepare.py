"""The prepare stage's work: traces and benchmarks in, Parquet out.

Writes into the stage folder:

- ``traces.parquet``: doc_id, split (train | heldout), question, thinking, attempt, answer,
  source_type, metadata (JSON string).
- ``tokens/part-NNNNN.parquet``: doc_id (int64), split, input_ids (list<int32>),
  loss_mask (list<int8>, 1 on the assistant turn), num_tokens, prompt_len, truncated.
- ``benchmarks/<name>.parquet``: problem_id, question, answer, kind (math | mc), choices, source.
- ``spans.parquet`` (SPANS_SCHEMA): the token positions of labelled character spans, one row
  per span: doc_id, concept, field (thinking | attempt), char_start, char_end (characters of
  the raw field, end exclusive), start, end (token positions in the document, end exclusive;
  the tokens whose offsets overlap the characters). Every document gets its sections
  ``think`` (the thinking text) and ``answer`` (the attempt); traces whose ``metadata`` JSON
  holds ``"spans"`` (the synthetic generator's planted concepts, see
  `rank1_core.data.synthetic`) add theirs. Needs a fast tokenizer (offset mapping); spans cut
  off by truncation are dropped and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pyarrow as pa

from rank1_core.config import Config
from rank1_core.data.format import char_span_to_tokens, field_offsets, tokenize_chat, tokenize_trace
from rank1_core.data.io import DataError, Skipped
from rank1_core.data.sources import load_benchmark, load_chat, load_s1k
from rank1_core.data.synthetic import question_key, synthetic_traces
from rank1_core.rundir import StageDir

TOKENS_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("split", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())), ("num_tokens", pa.int32()), ("prompt_len", pa.int32()),
    ("truncated", pa.bool_()),
])
BENCH_SCHEMA = pa.schema([
    ("problem_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("kind", pa.string()), ("choices", pa.list_(pa.string())), ("source", pa.string()),
])
SPANS_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("concept", pa.string()), ("field", pa.string()), ("char_start", pa.int32()),
    ("char_end", pa.int32()), ("start", pa.int32()), ("end", pa.int32()),
])
SECTIONS = {"thinking": "think", "attempt": "answer"}
"""Section concepts every document gets: the field's whole text."""
DOCS_PER_PART = 512


def trace_spans(metadata, texts: dict[str, str], where: str) -> list[tuple[str, str, int, int]]:
    """(concept, field, start, end) of the labelled spans in a trace's `metadata` (a JSON string
    or dict; its "spans" list), checked against the field texts; none when it has no spans."""
    import json

    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            return []
    if not isinstance(metadata, dict) or metadata.get("spans") is None:
        return []
    spans = metadata["spans"]
    if not isinstance(spans, list):
        raise DataError(f"{where}: metadata 'spans' should be a list, got {type(spans).__name__}")
    out = []
    for j, sp in enumerate(spans):
        concept = sp.get("concept") if isinstance(sp, dict) else None
        fld = sp.get("field") if isinstance(sp, dict) else None
        if not isinstance(concept, str) or not concept or fld not in texts:
            raise DataError(f"{where}: metadata spans[{j}] needs a concept name and field in {sorted(texts)}, "
                            f"got {sp!r}")
        a, b = sp.get("start"), sp.get("end")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= len(texts[fld])):
            raise DataError(f"{where}: span of concept {concept!r} ({fld} characters {a}..{b}) lies outside its "
                            f"trace's {fld} text ({len(texts[fld])} characters)")
        out.append((concept, fld, a, b))
    return out


def token_spans(tok, spans, texts: dict[str, str], model) -> tuple[list[dict], int]:
    """Rows of SPANS_SCHEMA (doc_id left out) for the sections and `spans` of one tokenized
    trace, and how many spans truncation cut off."""
    layout = field_offsets(texts["thinking"], texts["attempt"], model)
    rows, lost = [], 0
    whole = [(SECTIONS[f], f, 0, len(texts[f])) for f in ("thinking", "attempt")]
    for concept, fld, a, b in whole + list(spans):
        shift, lo, hi = layout[fld]
        ca, cb = max(a + shift, lo), min(b + shift, hi)
        hit = char_span_to_tokens(tok.offsets, ca, cb) if ca < cb else None
        if hit is None:
            lost += 1
            continue
        rows.append({"concept": concept, "field": fld, "char_start": a, "char_end": b,
                     "start": tok.prompt_len + hit[0], "end": tok.prompt_len + hit[1]})
    return rows, lost


@dataclass
class PrepareResult:
    rows: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def write_table(stage: StageDir, rel: str, table: pa.Table) -> None:
    stage.write_parquet(rel, table, compression="zstd")


def prepare(cfg: Config, stage: StageDir, tokenizer) -> PrepareResult:
    res = PrepareResult()
    skipped = Skipped()

    # Benchmarks first: the training traces must exclude every benchmark question.
    bench_keys: set[str] = set()
    for b in cfg.data.benchmarks:
        rows = load_benchmark(b, cfg.run.seed, skipped, cfg.data.bad_rows)
        bench_keys.update(question_key(r["question"]) for r in rows)
        write_table(stage, f"benchmarks/{b.name}.parquet", pa.Table.from_pylist(rows, schema=BENCH_SCHEMA))
        res.rows[f"benchmark:{b.name}"] = len(rows)

    if cfg.data.source == "synthetic":
        traces = synthetic_traces(cfg.data, cfg.run.seed, exclude=bench_keys)
    else:
        traces = load_s1k(cfg.data, skipped) if cfg.data.source == "s1k" else load_chat(cfg.data, skipped)
        traces = [t for t in traces if question_key(t["question"]) not in bench_keys]
        random.Random(cfg.run.seed).shuffle(traces)

    traj, att = f"{cfg.data.trajectory}_thinking_trajectory", f"{cfg.data.trajectory}_attempt"
    n_heldout = min(cfg.data.heldout_traces, max(len(traces) - 1, 0))
    trace_rows, token_rows, span_rows = [], [], []
    truncated = dropped = spans_lost = 0
    part = 0
    with_offsets = bool(getattr(tokenizer, "is_fast", False))
    source = "synthetic traces" if cfg.data.source == "synthetic" else cfg.data.path
    for i, t in enumerate(traces):
        texts = {"thinking": t[traj], "attempt": t[att]}
        spans = trace_spans(t.get("metadata"), texts, f"{source}: trace {i + 1}")
        if "messages" in t:  # a chat row: loss on every assistant turn, no think/answer sections
            tok = tokenize_chat(tokenizer, t["messages"], cfg.model, cfg.data.max_seq_len, cfg.data.overlong)
        else:
            tok = tokenize_trace(tokenizer, t["question"], t[traj], t[att], cfg.model,
                                 cfg.data.max_seq_len, cfg.data.overlong, offsets=with_offsets)
        if tok is None:
            dropped += 1
            continue
        doc_id = len(trace_rows)
        if with_offsets and "messages" not in t:
            rows, lost = token_spans(tok, spans, texts, cfg.model)
            span_rows.extend({"doc_id": doc_id, **r} for r in rows)
            spans_lost += lost
        # The last n_heldout traces of the (shuffled) order are held out, decided before
        # tokenizing so that the split does not depend on which traces were dropped.
        split = "heldout" if i >= len(traces) - n_heldout else "train"
        truncated += tok.truncated
        trace_rows.append({
            "doc_id": doc_id, "split": split, "question": t["question"], "thinking": t[traj],
            "attempt": t[att], "answer": str(t.get("solution", "")), "source_type": str(t.get("source_type", "")),
            "metadata": t["metadata"] if isinstance(t.get("metadata"), str) else str(t.get("metadata")),
        })
        token_rows.append({"doc_id": doc_id, "split": split, "input_ids": tok.input_ids,
                           "loss_mask": tok.loss_mask, "num_tokens": len(tok.input_ids),
                           "prompt_len": tok.prompt_len, "truncated": tok.truncated})
        if len(token_rows) == DOCS_PER_PART:
            write_table(stage, f"tokens/part-{part:05d}.parquet", pa.Table.from_pylist(token_rows, schema=TOKENS_SCHEMA))
            res.rows["tokens"] = res.rows.get("tokens", 0) + sum(r["num_tokens"] for r in token_rows)
            part, token_rows = part + 1, []
    n_docs = len(trace_rows)
    if n_docs == 0:
        raise DataError(f"no traces left to tokenize ({dropped} dropped as longer than data.max_seq_len)")
    if token_rows:
        write_table(stage, f"tokens/part-{part:05d}.parquet", pa.Table.from_pylist(token_rows, schema=TOKENS_SCHEMA))
        res.rows["tokens"] = res.rows.get("tokens", 0) + sum(r["num_tokens"] for r in token_rows)
    write_table(stage, "traces.parquet", pa.Table.from_pylist(trace_rows))
    if with_offsets:
        write_table(stage, "spans.parquet", pa.Table.from_pylist(span_rows, schema=SPANS_SCHEMA))
        res.rows["spans"] = len(span_rows)
        res.extra["spans_cut_by_truncation"] = spans_lost
    else:
        res.extra["spans"] = "not written: the tokenizer is not a fast tokenizer (no offset mapping)"
    res.rows["traces"] = n_docs
    res.rows["heldout_traces"] = sum(r["split"] == "heldout" for r in trace_rows)
    res.extra.update({"truncated": truncated, "dropped_overlong": dropped, "skipped_rows": skipped.counts,
                      "skipped_examples": skipped.examples, "tokenizer": getattr(tokenizer, "name_or_path", "")})
    return res
