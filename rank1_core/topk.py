"""Top-k activating contexts and per-feature statistics with DuckDB over the run's Parquet.

Three feature sources, all turned into one long relation before the SQL sees them:

- ``adapter``: `extract/activations` (wide: one float column per adapter component),
- ``neuron``: `extract/neurons` (wide: one float column per baseline MLP neuron),
- ``sae``: `sae/features` (sparse: doc_id, pos, feature, value for non-zero values only).

For each source, Python names the columns of a pass in a view
`feature_values(feature, doc_id, pos, value)` (one column of a wide table, or a few at once
when the table is small, or the whole sparse table) and runs the SQL of `queries/`:

    doc_summary.sql   -> per (feature, document) sums, extremes, active counts
    topk_hits.sql     -> k hits per feature and sign, capped per document, with window values
    topk_contexts.sql -> the hits joined with their token windows   -> topk/contexts.parquet
    feature_stats.sql -> per-feature statistics                      -> topk/stats.parquet

DuckDB runs with a memory limit in an on-disk database in a local temp directory, so no step
holds a whole table in memory: a pass reads one column (plus doc_id and pos) of a wide table.
No `ray` here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from rank1_core import sql as S
from rank1_core.config import TopkConfig
from rank1_core.rundir import RunDir, StageDir, atomic_output

SOURCES = ("adapter", "neuron", "sae", "transcoder")

CONTEXTS_SCHEMA = pa.schema([
    ("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()), ("rank", pa.int32()),
    ("doc_id", pa.int64()), ("pos", pa.int32()), ("value", pa.float32()),
    ("context_token_ids", pa.list_(pa.int32())), ("context_tokens", pa.list_(pa.string())),
    ("context_values", pa.list_(pa.float32())), ("hit_index", pa.int32()),
])
STATS_SCHEMA = pa.schema([
    ("source", pa.string()), ("feature", pa.string()), ("n_tokens", pa.int64()), ("mean", pa.float64()),
    ("std", pa.float64()), ("min", pa.float64()), ("max", pa.float64()), ("frac_active", pa.float64()),
])
# A pass over a wide table unpivots this many (token, feature) values at most: one column per
# pass at the paper's scale (10M tokens), many columns per pass for small runs.
PASS_VALUES = 4_000_000


class TopkError(RuntimeError):
    """The top-k stage cannot run on this input (missing source, empty table); says which."""


@dataclass
class Source:
    """A feature source: a registered view and how its features are laid out."""

    name: str
    view: str
    layout: str  # "wide" | "sparse"
    features: list[str] = field(default_factory=list)  # wide: the value columns


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def feature_values_sql(source: Source, features: list[str] | None = None) -> str:
    """The `feature_values(feature, doc_id, pos, value)` view of a pass (names only, no logic)."""
    if source.layout == "sparse":
        return (f"SELECT printf('F%05d', feature) AS feature, doc_id::BIGINT AS doc_id, pos::INTEGER AS pos, "
                f"value::FLOAT AS value FROM {_ident(source.view)}")
    features = features or source.features
    if len(features) == 1:
        c = features[0]
        return (f"SELECT {_lit(c)} AS feature, doc_id::BIGINT AS doc_id, pos::INTEGER AS pos, "
                f"{_ident(c)}::FLOAT AS value FROM {_ident(source.view)}")
    cols = ", ".join(_ident(c) for c in features)
    return (f"SELECT feature, doc_id::BIGINT AS doc_id, pos::INTEGER AS pos, value::FLOAT AS value FROM "
            f"(UNPIVOT (SELECT doc_id, pos, {cols} FROM {_ident(source.view)}) ON {cols} "
            f"INTO NAME feature VALUE value)")


def _read_column(run: RunDir, stage: str, rel: str, column: str) -> list:
    st = run.stage(stage)
    if not st.exists(rel):
        return []
    return pq.read_table(st.path(rel), columns=[column], filesystem=st.fs).column(column).to_pylist()


def available_sources(run: RunDir, views: dict[str, int], cfg: TopkConfig, sae_done: bool,
                      transcoder_done: bool = False) -> list[Source]:
    """The sources to rank: every available one, or exactly `cfg.sources` (each must exist)."""
    found: dict[str, Source] = {}
    reasons: dict[str, str] = {}
    comps = _read_column(run, "extract", "components.parquet", "column")
    if "activations" in views and comps:
        found["adapter"] = Source("adapter", "activations", "wide", comps)
    else:
        reasons["adapter"] = "extract/activations or extract/components.parquet is missing"
    neurons = _read_column(run, "extract", "neuron_catalogue.parquet", "column")
    if "neurons" in views and neurons:
        found["neuron"] = Source("neuron", "neurons", "wide", neurons)
    else:
        reasons["neuron"] = "no extract/neurons (extract.mlp_neurons was 0?)"
    if sae_done and "sae_features" in views:
        found["sae"] = Source("sae", "sae_features", "sparse")
    else:
        reasons["sae"] = "the sae stage has not finished (no sae/_SUCCESS or no sae/features/*.parquet)"
    if transcoder_done and "transcoder_features" in views:
        found["transcoder"] = Source("transcoder", "transcoder_features", "sparse")
    else:
        reasons["transcoder"] = ("the transcoder_extract stage has not finished (no transcoder_extract/_SUCCESS or no "
                                 "transcoder_extract/features/*.parquet)")
    if cfg.sources is None:
        return [found[s] for s in SOURCES if s in found]
    missing = [s for s in cfg.sources if s not in found]
    if missing:
        raise TopkError("; ".join(f"topk.sources lists {s!r} but {reasons[s]}" for s in missing))
    return [found[s] for s in cfg.sources]


@dataclass
class TopkResult:
    rows: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _cast_batches(reader, schema: pa.Schema):
    for batch in reader:
        yield pa.Table.from_batches([batch]).select(schema.names).cast(schema)


def _wide_passes(con, source: Source) -> list[list[str]]:
    n_tokens = con.execute(f"SELECT count(*) FROM {_ident(source.view)}").fetchone()[0]
    per_pass = max(1, PASS_VALUES // max(n_tokens, 1))
    f = source.features
    return [f[i:i + per_pass] for i in range(0, len(f), per_pass)]


def rank_source(con, source: Source, cfg: TopkConfig, log: Callable[[str], None] = print) -> None:
    """Fill tables `acc_summary` and `acc_hits` with this source's per-document sums and hits."""
    params = {"threshold": cfg.active_threshold, "k": cfg.k, "max_per_doc": cfg.max_per_doc,
              "before": cfg.window_before, "after": cfg.window_after}
    passes = [None] if source.layout == "sparse" else _wide_passes(con, source)
    t0 = time.perf_counter()
    for i, feats in enumerate(passes):
        con.execute(f"CREATE OR REPLACE TEMP VIEW feature_values AS {feature_values_sql(source, feats)}")
        con.execute("DROP VIEW IF EXISTS doc_summary")
        S.insert_query(con, "doc_summary", "doc_summary", params, create=True)
        con.execute("INSERT INTO acc_summary SELECT * FROM doc_summary")
        S.insert_query(con, "acc_hits", "topk_hits", params)
        con.execute("DROP TABLE doc_summary")
        if len(passes) > 1 and (i + 1) % max(1, len(passes) // 10) == 0:
            dt = time.perf_counter() - t0
            log(f"[topk] {source.name}: {i + 1}/{len(passes)} passes, {dt:.1f}s")


CONTEXT_CHUNK_HITS = 100_000
"""Hits per pass of the contexts query (each hit becomes window_before + window_after + 1 rows)."""


def _sql_str(v: str) -> str:
    return "'" + str(v).replace("'", "''") + "'"


def _feature_ranges(con, per_chunk: int) -> list[tuple[str, str]]:
    """Consecutive (first, last) feature names of acc_hits, in sort order, each range holding
    about `per_chunk` hits (a feature is never split)."""
    rows = con.execute("SELECT feature, count(*) FROM acc_hits GROUP BY feature ORDER BY feature").fetchall()
    out, start, n = [], None, 0
    for feature, c in rows:
        if start is None:
            start = feature
        n += c
        if n >= per_chunk:
            out.append((start, feature))
            start, n = None, 0
    if start is not None:
        out.append((start, rows[-1][0]))
    return out


def run_topk(run: RunDir | str, stage: StageDir, cfg: TopkConfig, sae_done: bool = False, transcoder_done: bool = False,
             log: Callable[[str], None] = print) -> TopkResult:
    """Rank every available source; write `contexts.parquet` and `stats.parquet` into `stage`."""
    run = run if isinstance(run, RunDir) else RunDir(str(run))
    res = TopkResult()
    tmp = Path(tempfile.mkdtemp(prefix="rank1-topk-", dir=cfg.temp_dir))
    try:
        con = S.connect(None, memory_limit=cfg.memory_limit, threads=cfg.threads,
                        temp_directory=str(tmp / "spill"), database=str(tmp / "topk.duckdb"))
        views = S.register_views(con, run, ["activations", "neurons", "tokens", "components",
                                            "neuron_catalogue", "sae_features", "sae_latents",
                                            "transcoder_features"])
        if "tokens" not in views:
            raise TopkError(f"no token table in {run.stage('extract').uri}/tokens: run the extract stage first")
        n_tokens = con.execute("SELECT count(*) FROM tokens").fetchone()[0]
        if n_tokens == 0:
            raise TopkError(f"the token table {run.stage('extract').uri}/tokens is empty: nothing to rank")
        sources = available_sources(run, views, cfg, sae_done, transcoder_done)
        if not sources:
            raise TopkError("no feature source to rank (no adapter activations, neurons or SAE features)")
        res.sources = [s.name for s in sources]
        params = {"before": cfg.window_before, "after": cfg.window_after}
        # both files are streamed to temporary names and renamed when complete (atomic_output)
        with atomic_output(stage.fs, stage.path("contexts.parquet")) as ctx_out, \
                atomic_output(stage.fs, stage.path("stats.parquet")) as stats_out, \
                pq.ParquetWriter(ctx_out, CONTEXTS_SCHEMA, compression="zstd") as ctx_writer, \
                pq.ParquetWriter(stats_out, STATS_SCHEMA, compression="zstd") as stats_writer:
            for src in sources:
                t0 = time.perf_counter()
                con.execute("CREATE OR REPLACE TABLE acc_summary (feature VARCHAR, doc_id BIGINT, n BIGINT, "
                            "sum DOUBLE, sumsq DOUBLE, hi FLOAT, lo FLOAT, n_active BIGINT)")
                con.execute("CREATE OR REPLACE TABLE acc_hits (feature VARCHAR, sign VARCHAR, rank INTEGER, "
                            "doc_id BIGINT, pos INTEGER, value FLOAT, window_pos INTEGER[], window_values FLOAT[])")
                rank_source(con, src, cfg, log)
                res.timings[f"{src.name}_rank"] = round(time.perf_counter() - t0, 3)
                t1 = time.perf_counter()
                con.execute("CREATE OR REPLACE TEMP VIEW doc_summary AS SELECT * FROM acc_summary")
                n_ctx = 0
                # Contexts in feature ranges of about CONTEXT_CHUNK_HITS hits each, in feature
                # order (so the file stays sorted): the windows' ordered list aggregates do not
                # spill, and all of a 35k-feature source at once ran DuckDB out of memory.
                for lo, hi in _feature_ranges(con, CONTEXT_CHUNK_HITS):
                    con.execute(f"CREATE OR REPLACE TEMP VIEW hits AS SELECT * FROM acc_hits "
                                f"WHERE feature >= {_sql_str(lo)} AND feature <= {_sql_str(hi)}")
                    reader = S.run_query(con, "topk_contexts", {**params, "source": src.name}).to_arrow_reader(65536)
                    for t in _cast_batches(reader, CONTEXTS_SCHEMA):
                        ctx_writer.write_table(t)
                        n_ctx += t.num_rows
                    con.execute("DROP VIEW hits")
                con.execute("CREATE OR REPLACE TEMP VIEW hits AS SELECT * FROM acc_hits")
                n_stats = 0
                reader = S.run_query(con, "feature_stats", {"source": src.name}).to_arrow_reader(65536)
                for t in _cast_batches(reader, STATS_SCHEMA):
                    stats_writer.write_table(t)
                    n_stats += t.num_rows
                con.execute("DROP VIEW hits")
                con.execute("DROP VIEW doc_summary")
                res.timings[f"{src.name}_write"] = round(time.perf_counter() - t1, 3)
                res.rows[f"contexts:{src.name}"] = n_ctx
                res.rows[f"features:{src.name}"] = n_stats
                log(f"[topk] {src.name}: {n_stats} features, {n_ctx} contexts "
                    f"({time.perf_counter() - t0:.1f}s)")
        res.rows["tokens"] = int(n_tokens)
        con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res
