"""DuckDB over a run directory: one view per stage output, queries from `queries/`.

Python owns the file paths, SQL owns the logic: `VIEWS` maps a view name to the stage folder
and the path (or glob) of its Parquet inside it; `register_views` creates a view for each one
whose file exists, so a query only names views (`SELECT ... FROM activations JOIN tokens ...`).
Queries live in `queries/<name>.sql`, one statement each, with `$param` placeholders.

    con = connect("runs/demo", memory_limit="4GB")
    con.sql("SELECT count(*) FROM tokens").fetchall()
    run_query(con, "feature_stats", {"threshold": 0.0})

No `ray` here. Local run directories are read with DuckDB's own Parquet reader; other
filesystems (s3://, gs://, ...) go through pyarrow datasets registered in DuckDB, so no
DuckDB extension is needed.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Iterable

import pyarrow.fs as pafs

from rank1_core.rundir import RunDir

QUERIES_DIR = Path(__file__).resolve().parent.parent / "queries"

# view name -> (stage folder, Parquet path or glob inside it). Other stages add theirs here.
VIEWS: dict[str, tuple[str, str]] = {
    # extract
    "activations": ("extract", "activations/*.parquet"),
    "neurons": ("extract", "neurons/*.parquet"),
    "tokens": ("extract", "tokens/*.parquet"),
    "components": ("extract", "components.parquet"),
    "neuron_catalogue": ("extract", "neuron_catalogue.parquet"),
    # topk
    "contexts": ("topk", "contexts.parquet"),
    "stats": ("topk", "stats.parquet"),
    # sae
    "sae_features": ("sae", "features/*.parquet"),
    "sae_latents": ("sae", "latents.parquet"),
    # autointerp
    "explanations": ("autointerp", "explanations.parquet"),
    "llm_calls": ("autointerp", "calls.parquet"),
    "classification_shares": ("autointerp", "classification_shares.parquet"),
    "category_shares": ("autointerp", "category_shares.parquet"),
    "score_summary": ("autointerp", "score_summary.parquet"),
    # evaluate
    "eval_samples": ("evaluate", "samples.parquet"),
    # ablate
    "kl_components": ("ablate", "kl_components.parquet"),
    "kl_layers": ("ablate", "kl_layers.parquet"),
    # transcoder adapters (transcoder, transcoder_extract, transcoder_eval)
    "transcoder_metrics": ("transcoder", "metrics.parquet"),
    "transcoder_layers": ("transcoder", "faithfulness_layers.parquet"),
    "transcoder_features": ("transcoder_extract", "features/*.parquet"),
    "transcoder_tokens": ("transcoder_extract", "tokens/*.parquet"),
    "transcoder_latents": ("transcoder_extract", "latents.parquet"),
    "transcoder_hesitation": ("transcoder_extract", "hesitation_features.parquet"),
    "transcoder_eval_samples": ("transcoder_eval", "samples.parquet"),
    "transcoder_eval_summary": ("transcoder_eval", "summary.parquet"),
    # concepts (ground truth)
    "concept_labels": ("concepts", "labels.parquet"),
    "concept_catalogue": ("concepts", "catalogue.parquet"),
    "concept_scores": ("concepts", "scores.parquet"),
    "concept_features": ("concepts", "features.parquet"),
    "concept_summary": ("concepts", "summary.parquet"),
    "concept_best": ("concepts", "best.parquet"),
    "concept_explanations": ("concepts", "explanations.parquet"),
    # steer
    "steer_results": ("steer", "results.parquet"),
    "steer_samples": ("steer", "samples.parquet"),
    "steer_targets": ("steer", "targets.parquet"),
}

_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


class QueryError(ValueError):
    """A query file is missing, or its parameters do not match what was given."""


# --------------------------------------------------------------------------- files


def matching_files(run: RunDir, stage: str, rel: str) -> list[str]:
    """Files of `run/<stage>/<rel>` (rel may end in a glob such as `*.parquet`), sorted."""
    st = run.stage(stage)
    if not any(ch in rel for ch in "*?["):
        return [st.path(rel)] if st.fs.get_file_info(st.path(rel)).type == pafs.FileType.File else []
    folder, pattern = rel.rsplit("/", 1) if "/" in rel else ("", rel)
    base = st.path(folder) if folder else st.root
    infos = st.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def register_view(con, name: str, run: RunDir, files: list[str]) -> None:
    """A DuckDB view `name` over Parquet `files` of the run's filesystem."""
    if isinstance(run.fs, pafs.LocalFileSystem):
        listed = "[" + ", ".join(_quote(f) for f in files) + "]"
        con.execute(f"CREATE OR REPLACE VIEW {_ident(name)} AS SELECT * FROM read_parquet({listed})")
    else:
        import pyarrow.dataset as ds

        con.register(f"_arrow_{name}", ds.dataset(files, filesystem=run.fs, format="parquet"))
        con.execute(f"CREATE OR REPLACE VIEW {_ident(name)} AS SELECT * FROM {_ident('_arrow_' + name)}")


def register_views(con, run: RunDir | str, names: Iterable[str] | None = None) -> dict[str, int]:
    """Create a view for every entry of VIEWS (or of `names`) whose files exist.

    Returns {view: number of files}. A glob with no file yet (stage not run) registers nothing.
    """
    run = run if isinstance(run, RunDir) else RunDir(str(run))
    out = {}
    for name in (names if names is not None else VIEWS):
        if name not in VIEWS:
            raise QueryError(f"unknown view {name!r} (known: {', '.join(VIEWS)})")
        stage, rel = VIEWS[name]
        files = matching_files(run, stage, rel)
        if files:
            register_view(con, name, run, files)
            out[name] = len(files)
    return out


def connect(run: RunDir | str | None = None, *, memory_limit: str | None = None, threads: int | None = None,
            temp_directory: str | None = None, database: str = ":memory:"):
    """A DuckDB connection with the given limits and views over `run` (when given)."""
    import duckdb

    config: dict[str, Any] = {}
    if memory_limit:
        config["memory_limit"] = memory_limit
    if threads:
        config["threads"] = int(threads)
    if temp_directory:
        config["temp_directory"] = str(temp_directory)
    con = duckdb.connect(database, config=config)
    if run is not None:
        register_views(con, run)
    return con


# --------------------------------------------------------------------------- queries


def query_path(name: str) -> Path:
    p = QUERIES_DIR / f"{name}.sql"
    if not p.exists():
        known = sorted(q.stem for q in QUERIES_DIR.glob("*.sql"))
        raise QueryError(f"no query {name!r} in {QUERIES_DIR} (known: {', '.join(known)})")
    return p


def load_query(name: str) -> str:
    """The text of `queries/<name>.sql` (a single statement, trailing `;` removed)."""
    return query_path(name).read_text().strip().rstrip(";")


def _strip_comments(sql: str) -> str:
    out, i, n = [], 0, len(sql)
    while i < n:
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif sql[i] == "'":
            j = i + 1
            while j < n and not (sql[j] == "'" and not sql.startswith("''", j)):
                j += 2 if sql.startswith("''", j) else 1
            out.append(" ")
            i = j + 1
        else:
            out.append(sql[i])
            i += 1
    return "".join(out)


def query_params(sql: str) -> list[str]:
    """Names of the `$params` a statement uses (comments and string literals ignored)."""
    seen: list[str] = []
    for m in _PARAM.finditer(_strip_comments(sql)):
        if m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def bind(sql: str, params: dict[str, Any] | None, name: str = "query") -> dict[str, Any]:
    """Exactly the parameters `sql` uses, taken from `params`; a missing one is an error."""
    params = params or {}
    wanted = query_params(sql)
    missing = [p for p in wanted if p not in params]
    if missing:
        raise QueryError(f"{name}: missing parameter(s) {', '.join('$' + m for m in missing)}")
    return {p: params[p] for p in wanted}


def execute(con, sql: str, params: dict[str, Any] | None = None, name: str = "query"):
    """Run a statement with the parameters it uses; returns the connection's result."""
    return con.execute(sql, bind(sql, params, name))


def relation(con, sql: str, params: dict[str, Any] | None = None, name: str = "query"):
    """A DuckDB relation for a SELECT statement (`.fetchall()`, `.to_arrow_reader(n)`, `.show()`)."""
    return con.sql(sql, params=bind(sql, params, name))


def run_query(con, name: str, params: dict[str, Any] | None = None):
    """Run `queries/<name>.sql`; returns a DuckDB relation."""
    return relation(con, load_query(name), params, name)


def insert_query(con, table: str, name: str, params: dict[str, Any] | None = None, *, create: bool = False) -> None:
    """Append the rows of `queries/<name>.sql` to `table` (created from the first result if `create`)."""
    sql = load_query(name)
    head = f"CREATE OR REPLACE TABLE {_ident(table)} AS " if create else f"INSERT INTO {_ident(table)} "
    con.execute(head + sql, bind(sql, params, name))
