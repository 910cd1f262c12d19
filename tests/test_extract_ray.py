"""The extract stage on Ray Data: outputs, manifest, rerun, and exactly-once under a killed actor."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from rank1_core import activations as A
from rank1_core.rundir import RunDir

from test_extract import fake_train_stage, reference_lora_a
from tests.ray_metrics import wait_for

pytestmark = pytest.mark.slow


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _token_pairs(run):
    con = duckdb.connect()
    return con.execute(
        f"SELECT count(*), count(DISTINCT (doc_id, pos)) FROM read_parquet('{run}/extract/tokens/*.parquet')"
    ).fetchone()


def test_extract_stage(ray_session, tiny_cfg, prepared_run, copy_run, tiny_model_dir):
    from ray_jobs import extract

    run = copy_run(prepared_run)
    adapter = fake_train_stage(run, tiny_model_dir, seed=4)
    cfg = tiny_cfg(run_dir=run)
    m = extract.run(cfg)

    prep = RunDir(str(run)).stage("prepare").manifest()
    n_tokens = prep["rows"]["tokens"]
    assert m["rows"]["tokens"] == n_tokens and m["rows"]["rows:activations"] == n_tokens
    assert m["rows"]["components"] == 14 and m["rows"]["neurons"] == 32
    assert set(m["inputs"]) == {"prepare", "train"}
    assert _token_pairs(run) == (n_tokens, n_tokens)
    st = RunDir(str(run)).stage("extract")
    names = sorted(p.name for p in st.local_path("activations").iterdir())
    assert names == sorted(p.name for p in st.local_path("tokens").iterdir())
    assert names == sorted(p.name for p in st.local_path("neurons").iterdir())
    assert len(names) == m["rows"]["files"] >= 6  # 48 docs in batches of 8
    assert 1 <= len(m["extra"]["actor_pids"]) <= 2

    # one document end to end against peft
    tokens = pq.read_table(st.local_path("tokens")).to_pandas()
    acts = pq.read_table(st.local_path("activations")).to_pandas()
    doc = int(tokens.doc_id.iloc[0])
    ids = tokens[tokens.doc_id == doc].sort_values("pos").token_id.to_numpy()
    ref = reference_lora_a(tiny_model_dir, adapter, ids)
    got = acts[acts.doc_id == doc].sort_values("pos")
    for (layer, module), vals in ref.items():
        np.testing.assert_allclose(got[A.component_column(layer, module, 2)].to_numpy(), vals, rtol=1e-4, atol=1e-5)
    comps = pq.read_table(st.local_path("components.parquet")).to_pylist()
    assert [c["column"] for c in comps] == [c for c in acts.columns if c.startswith("L")]

    # topk over the real extraction: every component and baseline neuron gets its contexts
    from ray_jobs import topk

    tm = topk.run(cfg)
    assert tm["extra"]["sources"] == ["adapter", "neuron"]
    assert tm["rows"]["features:adapter"] == 14 and tm["rows"]["features:neuron"] == 32
    ctx = pq.read_table(RunDir(str(run)).stage("topk").local_path("contexts.parquet")).to_pandas()
    per = ctx[ctx.sign == "pos"].groupby("feature")["rank"].max()
    assert len(per) >= 14 and per.max() == cfg.topk.k
    assert (ctx.groupby(["feature", "sign", "doc_id"]).size() <= cfg.topk.max_per_doc).all()
    hit = ctx.iloc[0]
    assert hit.context_values[hit.hit_index] == pytest.approx(hit.value)
    assert hit.context_token_ids[hit.hit_index] == int(
        tokens[(tokens.doc_id == hit.doc_id) & (tokens.pos == hit.pos)].token_id.iloc[0])

    # a rerun with the same config is skipped; --force redoes it without duplicating files
    again = extract.run(cfg)
    assert again["finished_at"] == m["finished_at"]
    forced = extract.run(cfg, force=True)
    assert forced["rows"]["files"] == len(names)
    assert sorted(p.name for p in st.local_path("activations").iterdir()) == names
    assert _token_pairs(run) == (n_tokens, n_tokens)

    # the dashboard's metrics saw the tokens of both extractions, tagged stage="extract"
    want = {("ray_rank1_tokens_total", "extract"): 2 * n_tokens, ("ray_rank1_docs_total", "extract"): 2 * 48}
    got = wait_for(ray_session, want)
    assert all(got[k] >= v for k, v in want.items()), got


def test_extract_exactly_once_when_an_actor_dies(ray_session, tiny_cfg, prepared_run, copy_run, tiny_model_dir,
                                                  tmp_path):
    """An actor process is killed (os._exit) right after writing its first batch's files and
    before returning; Ray restarts it and retries the batch. Every (doc_id, pos) appears once."""
    from ray_jobs import extract

    run = copy_run(prepared_run)
    fake_train_stage(run, tiny_model_dir, seed=5)
    marker = tmp_path / "actor-killed"
    m = extract.run(tiny_cfg(run_dir=run), crash={"marker": str(marker), "when": "after_write"})
    dead = int(marker.read_text())
    assert not _pid_alive(dead)  # the actor process really died...
    assert dead not in m["extra"]["actor_pids"]  # ...and no batch was reported by it
    n_tokens = RunDir(str(run)).stage("prepare").manifest()["rows"]["tokens"]
    assert _token_pairs(run) == (n_tokens, n_tokens)
    assert m["rows"]["rows:neurons"] == n_tokens


def test_extract_killed_before_rename_leaves_no_trace(ray_session, tiny_cfg, prepared_run, copy_run,
                                                      tiny_model_dir, tmp_path):
    from ray_jobs import extract

    run = copy_run(prepared_run)
    fake_train_stage(run, tiny_model_dir, seed=6)
    marker = tmp_path / "actor-killed"
    m = extract.run(tiny_cfg(run_dir=run, ), crash={"marker": str(marker), "when": "before_rename"})
    assert marker.exists() and not _pid_alive(int(marker.read_text()))
    n_tokens = m["rows"]["tokens"]
    assert _token_pairs(run) == (n_tokens, n_tokens)
    st = RunDir(str(run)).stage("extract")
    for t in A.TABLES:
        assert not [p for p in st.local_path(t).iterdir() if p.name.startswith(".tmp-")]
    assert m["extra"]["leftover_files_deleted"] >= 1
