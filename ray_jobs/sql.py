"""`rank1 sql`: ask your own questions of a run with DuckDB SQL over its Parquet tables.

    rank1 sql "SELECT module, avg(b_norm) FROM components GROUP BY module" --run runs/demo
    rank1 sql --list --run runs/demo                      # the views and their columns
    rank1 sql -f my_query.sql --run runs/demo --format csv --out result.csv

Views (registered when the stage that writes them has run): activations, neurons, tokens,
components, neuron_catalogue, contexts, stats, sae_features, sae_latents, explanations,
llm_calls, eval_samples, kl_components, kl_layers (see `rank1_core/sql.py`). No Ray needed.
"""

from __future__ import annotations

import argparse
import json
import sys

from rank1_core import sql as S
from rank1_core.rundir import RunDir, atomic_output, resolve_filesystem


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rank1 sql", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("query", nargs="?", help="a SQL statement (or use -f)")
    p.add_argument("-f", "--file", help="read the statement from this file")
    p.add_argument("--run", help="run directory (default: run.dir of --config)")
    p.add_argument("--config", "-c", help="config whose run.dir to use when --run is not given")
    p.add_argument("--list", action="store_true", help="list the views of the run and their columns")
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                   help="output format (parquet needs --out)")
    p.add_argument("--out", help="write the result to this file instead of stdout")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown in table format (default 40)")
    p.add_argument("--memory-limit", default="4GB", help="DuckDB memory_limit (default 4GB)")
    p.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    return p


def _run_dir(args) -> str:
    if args.run:
        return args.run
    if args.config:
        from rank1_core.config import load_config

        return load_config(args.config).run.dir
    raise SystemExit("rank1 sql: give --run DIR (or --config FILE)")


def _list(con, views: dict[str, int], out) -> None:
    missing = [v for v in S.VIEWS if v not in views]
    for v in views:
        cols = con.execute(f'DESCRIBE "{v}"').fetchall()
        stage, rel = S.VIEWS[v]
        shown = ", ".join(f"{c[0]} {c[1]}" for c in cols[:12]) + (f", ... ({len(cols)} columns)" if len(cols) > 12 else "")
        print(f"{v:<17} {stage}/{rel}: {shown}", file=out)
    if missing:
        print(f"(not available yet: {', '.join(missing)})", file=out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run = RunDir(_run_dir(args))
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if not run.fs.get_file_info(run.root).type.name == "Directory":
        print(f"error: run directory {run.uri} does not exist", file=sys.stderr)
        return 2
    con = S.connect(None, memory_limit=args.memory_limit, threads=args.threads)
    views = S.register_views(con, run)
    if args.list:
        _list(con, views, sys.stdout)
        return 0
    if args.file:
        with open(args.file) as f:
            query = f.read()
    else:
        query = args.query
    if not query:
        print("error: give a query (rank1 sql \"SELECT ...\" --run DIR), -f FILE, or --list", file=sys.stderr)
        return 2
    if not views:
        print(f"error: {run.uri} has no tables yet (run the extract stage first)", file=sys.stderr)
        return 2
    import duckdb

    try:
        rel = con.sql(query)
        if rel is None:  # a statement without a result (CREATE VIEW, SET, ...)
            return 0
        if args.format == "table" and not args.out:
            rel.show(max_rows=args.max_rows, max_width=1_000_000)
            return 0
        table = rel.to_arrow_table()
    except duckdb.Error as e:
        msg = str(e)
        print(f"error: {msg}", file=sys.stderr)
        if "does not exist" in msg:
            print(f"views of {run.uri}: {', '.join(views)}; not available yet: "
                  f"{', '.join(v for v in S.VIEWS if v not in views) or 'none'}", file=sys.stderr)
        return 1
    _write(table, args)
    return 0


def _write(table, args) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    # --out (a path or a pyarrow URI) is written to a temporary name and renamed (atomic_output)
    if args.format == "parquet":
        if not args.out:
            raise SystemExit("rank1 sql: --format parquet needs --out FILE")
        with atomic_output(*resolve_filesystem(args.out)) as out:
            pq.write_table(table, out)
        return
    if args.format == "csv":
        if args.out:
            with atomic_output(*resolve_filesystem(args.out)) as out:
                pacsv.write_csv(table, out)
        else:
            sys.stdout.flush()
            pacsv.write_csv(table, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return
    if args.format == "json":
        text = "".join(json.dumps(r, default=str) + "\n" for r in table.to_pylist())
    else:  # table into a file: aligned plain text, every row
        text = _aligned(table)
    if args.out:
        with atomic_output(*resolve_filesystem(args.out)) as out:
            out.write(text.encode())
    else:
        sys.stdout.write(text)


def _aligned(table) -> str:
    cells = [[str(v) for v in table.column_names]] + [
        ["NULL" if v is None else str(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.column_names))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in cells)


if __name__ == "__main__":
    raise SystemExit(main())
