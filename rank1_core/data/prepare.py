"""The prepare stage's work: traces and benchmarks in, Parquet out.

Writes into the stage folder:

- ``traces.parquet``: doc_id, split (train | heldout), question, thinking, attempt, answer,
  source_type, metadata (JSON string).
- ``tokens/part-NNNNN.parquet``: doc_id (int64), split, input_ids (list<int32>),
  loss_mask (list<int8>, 1 on the assistant turn), num_tokens, prompt_len, truncated.
- ``benchmarks/<name>.parquet``: problem_id, question, answer, kind (math | mc), choices, source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from rank1_core.config import Config
from rank1_core.data.format import tokenize_trace
from rank1_core.data.io import DataError, Skipped
from rank1_core.data.sources import load_benchmark, load_s1k
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
DOCS_PER_PART = 512


@dataclass
class PrepareResult:
    rows: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def write_table(stage: StageDir, rel: str, table: pa.Table) -> None:
    path = stage.path(rel)
    stage.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=stage.fs, compression="zstd")


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
        traces = load_s1k(cfg.data, skipped)
        traces = [t for t in traces if question_key(t["question"]) not in bench_keys]
        random.Random(cfg.run.seed).shuffle(traces)

    traj, att = f"{cfg.data.trajectory}_thinking_trajectory", f"{cfg.data.trajectory}_attempt"
    n_heldout = min(cfg.data.heldout_traces, max(len(traces) - 1, 0))
    trace_rows, token_rows = [], []
    truncated = dropped = 0
    part = 0
    for i, t in enumerate(traces):
        tok = tokenize_trace(tokenizer, t["question"], t[traj], t[att], cfg.model,
                             cfg.data.max_seq_len, cfg.data.overlong)
        if tok is None:
            dropped += 1
            continue
        doc_id = len(trace_rows)
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
    res.rows["traces"] = n_docs
    res.rows["heldout_traces"] = sum(r["split"] == "heldout" for r in trace_rows)
    res.extra = {"truncated": truncated, "dropped_overlong": dropped, "skipped_rows": skipped.counts,
                 "skipped_examples": skipped.examples, "tokenizer": getattr(tokenizer, "name_or_path", "")}
    return res
