"""The topk stage over a hand-made run (the fixture of test_sql_queries): output files and
schemas, source selection, pass width, bad input, and the stage entry point (no Ray needed)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from rank1_core import topk as T
from rank1_core.config import TopkConfig
from rank1_core.rundir import RunDir, StageNotDone, run_stage

from test_sql_queries import write_fixture

CFG = TopkConfig(k=2, max_per_doc=1, window_before=1, window_after=1, memory_limit="512MB", threads=1)


def finished_run(tmp_path, sae=True) -> RunDir:
    """The fixture, with extract (and sae) marked done the way stages mark themselves."""
    run = write_fixture(tmp_path / "run")
    for name in ("extract", "sae") if sae else ("extract",):
        st = run.stage(name)
        st.write_text(".started", f"fixture-{name}\n")
        run_stage(st, f"fixture-{name}", "", lambda sr: None, resumable=True, log=lambda m: None)
    if not sae:
        run.stage("sae").fs.delete_dir_contents(run.stage("sae").root)
    return run


def test_run_topk_writes_both_tables(tmp_path):
    run = finished_run(tmp_path)
    st = run.stage("topk")
    st.fs.create_dir(st.root, recursive=True)
    res = T.run_topk(run, st, CFG, sae_done=True, log=lambda m: None)
    assert res.sources == ["adapter", "sae"]
    assert res.rows == {"contexts:adapter": 7, "features:adapter": 2, "contexts:sae": 3, "features:sae": 2,
                        "tokens": 12}
    ctx = pq.read_table(st.path("contexts.parquet"))
    assert ctx.schema.equals(T.CONTEXTS_SCHEMA)
    stats = pq.read_table(st.path("stats.parquet"))
    assert stats.schema.equals(T.STATS_SCHEMA)
    assert sorted(zip(stats.column("source").to_pylist(), stats.column("feature").to_pylist())) == [
        ("adapter", "A"), ("adapter", "B"), ("sae", "F00003"), ("sae", "F00007")]
    row = [r for r in ctx.to_pylist() if r["feature"] == "F00003" and r["rank"] == 2][0]
    assert row["context_values"] == [0.0, 2.0, 0.0] and row["context_tokens"] == ["t10", "t11", "t12"]


def test_pass_width_does_not_change_results(tmp_path, monkeypatch):
    run = finished_run(tmp_path, sae=False)
    out = {}
    for width in (1, 10**9):  # one column per pass (UNPIVOT-free) and all columns in one pass
        monkeypatch.setattr(T, "PASS_VALUES", width)
        st = run.stage(f"topk{width}")
        st.fs.create_dir(st.root, recursive=True)
        T.run_topk(run, st, CFG, log=lambda m: None)
        out[width] = (pq.read_table(st.path("contexts.parquet")).sort_by([("feature", "ascending"),
                      ("sign", "ascending"), ("rank", "ascending")]), pq.read_table(st.path("stats.parquet")))
    assert out[1][0].equals(out[10**9][0]) and out[1][0].num_rows == 7
    assert out[1][1].equals(out[10**9][1])


def test_contexts_written_in_feature_ranges_equal_one_pass(tmp_path, monkeypatch):
    """Contexts are built a few features at a time (bounded memory); the file is the same,
    in the same order, as in one pass."""
    run = finished_run(tmp_path)
    out = {}
    for chunk in (1, 10**9):  # a range per feature, and everything at once
        monkeypatch.setattr(T, "CONTEXT_CHUNK_HITS", chunk)
        st = run.stage(f"topk{chunk}")
        st.fs.create_dir(st.root, recursive=True)
        T.run_topk(run, st, CFG, sae_done=True, log=lambda m: None)
        out[chunk] = pq.read_table(st.path("contexts.parquet"))
    assert out[1].equals(out[10**9]) and out[1].num_rows == 10
    keys = list(zip(out[1].column("source").to_pylist(), out[1].column("feature").to_pylist(),
                    out[1].column("sign").to_pylist(), out[1].column("rank").to_pylist()))
    assert keys == sorted(keys, key=lambda k: (["adapter", "sae"].index(k[0]), k[1], k[2], k[3]))


def test_feature_ranges_never_split_a_feature():
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE TABLE acc_hits AS SELECT * FROM (VALUES ('a', 1), ('a', 2), ('b', 1), ('c', 1), ('c', 2), "
                "('c', 3), ('d', 1)) t(feature, rank)")
    assert T._feature_ranges(con, 3) == [("a", "b"), ("c", "c"), ("d", "d")]
    assert T._feature_ranges(con, 100) == [("a", "d")]
    assert T._feature_ranges(con, 1) == [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
    assert T._sql_str("it's") == "'it''s'"


def test_sources_must_exist_when_listed(tmp_path):
    run = finished_run(tmp_path, sae=False)
    st = run.stage("topk")
    st.fs.create_dir(st.root, recursive=True)
    cfg = TopkConfig(**{**CFG.__dict__, "sources": ["adapter", "neuron"]})
    with pytest.raises(T.TopkError, match=r"topk.sources lists 'neuron' but no extract/neurons"):
        T.run_topk(run, st, cfg, log=lambda m: None)


def test_empty_token_table(tmp_path):
    run = finished_run(tmp_path, sae=False)
    tok = run.stage("extract").path("tokens")
    for f in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        t = pq.read_table(f"{tok}/{f}")
        pq.write_table(t.slice(0, 0), f"{tok}/{f}")
    st = run.stage("topk")
    st.fs.create_dir(st.root, recursive=True)
    with pytest.raises(T.TopkError, match=r"token table .*extract/tokens is empty"):
        T.run_topk(run, st, CFG, log=lambda m: None)


def test_no_extract_output(tmp_path):
    run = RunDir(str(tmp_path / "empty"))
    st = run.stage("topk")
    st.fs.create_dir(st.root, recursive=True)
    with pytest.raises(T.TopkError, match="no token table .*run the extract stage first"):
        T.run_topk(run, st, CFG, log=lambda m: None)


def test_stage_entry_point(tiny_cfg, tmp_path):
    from ray_jobs import topk

    run = finished_run(tmp_path, sae=False)
    over = ["topk.k=2", "topk.max_per_doc=1", "topk.window_before=1", "topk.window_after=1"]
    cfg = tiny_cfg(*over, run_dir=run.root)
    m = topk.run(cfg)
    assert m["rows"]["contexts:adapter"] == 7 and m["extra"]["sources"] == ["adapter"]
    assert set(m["inputs"]) == {"extract"}
    assert topk.run(cfg)["finished_at"] == m["finished_at"]  # done: skipped
    # asking for SAE features before the sae stage ran names the missing stage
    with pytest.raises(StageNotDone, match="stage 'sae' has not finished"):
        topk.run(tiny_cfg(*over, "topk.sources=[adapter, sae]", run_dir=run.root))
    # once sae is done it is a source by default, and its hash enters topk's
    run2 = finished_run(tmp_path / "b", sae=True)
    m2 = topk.run(tiny_cfg(*over, run_dir=run2.root))
    assert m2["extra"]["sources"] == ["adapter", "sae"] and set(m2["inputs"]) == {"extract", "sae"}
