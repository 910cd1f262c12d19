"""`rank1 sql` over a hand-made run: the example queries of docs/sql.md with hand-computed answers,
output formats, --list, and errors that name what is missing."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from rank1_core import topk as T
from rank1_core.config import TopkConfig
from ray_jobs import sql as sqlcmd

from test_sql_queries import A_VALS, B_VALS, write_fixture

# The three example queries of docs/sql.md, verbatim but for the token text.
EX_TOP_TOKENS = """
SELECT t.token, a.L00_q_proj AS value, a.doc_id, a.pos
FROM activations AS a JOIN tokens AS t USING (doc_id, pos)
ORDER BY value DESC
LIMIT 3
"""
EX_ON_TOKEN = """
WITH on_token AS (
    UNPIVOT (SELECT a.* FROM activations AS a JOIN tokens AS t USING (doc_id, pos) WHERE trim(t.token) = 'Wait')
    ON COLUMNS('^L[0-9]') INTO NAME component VALUE value
)
SELECT o.component, count(*) AS n, round(avg((o.value - s.mean) / s.std), 2) AS z
FROM on_token AS o JOIN stats AS s ON s.source = 'adapter' AND s.feature = o.component
GROUP BY o.component
ORDER BY abs(z) DESC
LIMIT 10
"""
EX_CONTEXTS = """
SELECT rank, round(value, 2) AS value,
       array_to_string(context_tokens[1:hit_index], '') || '[[' || context_tokens[hit_index + 1] || ']]'
         || array_to_string(context_tokens[hit_index + 2:], '') AS context
FROM contexts
WHERE feature = 'L00_q_proj' AND sign = 'pos'
ORDER BY rank
"""


@pytest.fixture
def run_dir(tmp_path):
    run = write_fixture(tmp_path / "run", names=("L00_q_proj", "L00_k_proj"))
    st = run.stage("topk")
    st.fs.create_dir(st.root, recursive=True)
    T.run_topk(run, st, TopkConfig(k=2, max_per_doc=1, window_before=1, window_after=1, memory_limit="512MB"),
               log=lambda m: None)
    return str(tmp_path / "run")


def csv_rows(capsys, *argv):
    assert sqlcmd.main([*argv, "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_example_top_tokens(run_dir, capsys):
    got = csv_rows(capsys, EX_TOP_TOKENS, "--run", run_dir)
    assert [(r["token"], float(r["value"]), r["doc_id"], r["pos"]) for r in got] == [
        ("t11", 5.0, "0", "1"), ("t20", 4.0, "1", "0"), ("t13", 3.0, "0", "3")]


def test_example_components_on_a_token(run_dir, capsys):
    got = csv_rows(capsys, EX_ON_TOKEN.replace("'Wait'", "'t21'"), "--run", run_dir)
    a = np.concatenate([A_VALS[d] for d in range(3)])
    b = np.concatenate([B_VALS[d] for d in range(3)])
    z = {"L00_q_proj": (-6 - a.mean()) / a.std(), "L00_k_proj": (2 - b.mean()) / b.std()}
    assert [r["component"] for r in got] == sorted(z, key=lambda c: -abs(z[c]))
    for r in got:
        assert float(r["z"]) == pytest.approx(round(z[r["component"]], 2)) and r["n"] == "1"


def test_example_contexts_as_text(run_dir, capsys):
    got = csv_rows(capsys, EX_CONTEXTS, "--run", run_dir)
    assert [(r["rank"], float(r["value"]), r["context"]) for r in got] == [
        ("1", 5.0, "t10[[t11]]t12"), ("2", 4.0, "[[t20]]t21")]


def test_formats_and_cli_dispatch(run_dir, capsys, tmp_path):
    from ray_jobs import cli

    assert cli.main(["sql", "SELECT count(*) AS n FROM tokens", "--run", run_dir]) == 0
    out = capsys.readouterr().out
    assert "12" in out and "n" in out
    assert sqlcmd.main(["SELECT feature, n_tokens FROM stats ORDER BY feature LIMIT 1", "--run", run_dir,
                        "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"feature": "L00_k_proj", "n_tokens": 12}
    q = tmp_path / "q.sql"
    q.write_text("SELECT module, b_norm FROM components ORDER BY component_id")
    out_file = tmp_path / "out.parquet"
    assert sqlcmd.main(["-f", str(q), "--run", run_dir, "--format", "parquet", "--out", str(out_file)]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out_file).to_pylist() == [{"module": "q_proj", "b_norm": 0.5}, {"module": "k_proj", "b_norm": 0.25}]


def test_list_views(run_dir, capsys):
    assert sqlcmd.main(["--list", "--run", run_dir]) == 0
    out = capsys.readouterr().out
    for v in ("activations", "tokens", "components", "contexts", "stats", "sae_features"):
        assert f"\n{v} " in "\n" + out
    assert "not available yet:" in out and "explanations" in out


def test_errors_name_what_is_missing(run_dir, tmp_path, capsys):
    assert sqlcmd.main(["SELECT * FROM explanations", "--run", run_dir]) == 1
    err = capsys.readouterr().err
    assert "explanations" in err and "not available yet: " in err
    assert sqlcmd.main(["SELECT 1", "--run", str(tmp_path / "nowhere")]) == 2
    assert "has no tables yet" in capsys.readouterr().err
    assert sqlcmd.main(["--run", run_dir]) == 2
