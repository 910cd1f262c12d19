"""The sae stage on Ray Train (slow tier): equal to the no-Ray path, skip, resume, manifest."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from rank1_core.sae import StageInputs, train_local
from test_sae_fixtures import write_extract_stage

pytestmark = pytest.mark.slow


def assert_same_outputs(a, b):
    ta, tb = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert (ta[k] == tb[k]).all(), k
    for name in ("metrics.parquet", "latents.parquet"):
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    fa = pq.read_table(a / "features").sort_by([("doc_id", "ascending"), ("pos", "ascending"), ("feature", "ascending")])
    fb = pq.read_table(b / "features").sort_by([("doc_id", "ascending"), ("pos", "ascending"), ("feature", "ascending")])
    assert fa.equals(fb)


def test_stage_equals_local_path_skips_and_resumes(tiny_cfg, ray_session, tmp_path, capsys):
    from ray_jobs import sae

    run = tmp_path / "run"
    write_extract_stage(run, tokens=3000, files=2)
    cfg = tiny_cfg("sae.loader=pyarrow", "sae.checkpoint_every=30", run_dir=run)
    manifest = sae.run(cfg)

    out = run / "sae"
    ex = manifest["extra"]
    for key in ("fvu", "fve", "nmse", "l0", "dead_fraction", "live_features"):
        assert key in ex
    assert manifest["rows"]["live_features"] == ex["live_features"] > 0
    assert manifest["inputs"]["extract"]["config_hash"] == "test-0-3000-2"
    assert ex["fvu"] < 0.6 and ex["train_steps"] == 4 * (3000 // 128)
    ckpts = list((out / "checkpoints" / "ray_train").glob("checkpoint_2*"))
    assert 1 <= len(ckpts) <= cfg.sae.keep_checkpoints

    # the same training without Ray, same seed and settings: the same bytes
    local = tmp_path / "local"
    train_local(cfg.sae, StageInputs.from_extract(None, str(run / "extract")), str(local), seed=cfg.run.seed)
    assert_same_outputs(out, local)
    assert json.loads((out / "summary.json").read_text()) == json.loads((local / "summary.json").read_text())

    # done: a second run is skipped
    capsys.readouterr()
    assert sae.run(cfg)["finished_at"] == manifest["finished_at"]
    assert "skipping" in capsys.readouterr().out

    # a crash after training (outputs half gone, no marker): the rerun resumes from the last
    # checkpoint, trains no further step, and writes the same outputs again
    keep = tmp_path / "keep"
    shutil.copytree(out, keep, ignore=shutil.ignore_patterns("checkpoints"))
    (out / "_SUCCESS").unlink()
    (out / "latents.parquet").unlink()
    shutil.rmtree(out / "features")
    (out / "features").mkdir()
    (out / "features" / "part-r000-00000.parquet").write_bytes(b"torn")
    before = sorted(p.name for p in (out / "checkpoints" / "ray_train").glob("checkpoint_2*"))
    sae.run(cfg)
    # resumed, not retrained: no new checkpoint was reported
    assert sorted(p.name for p in (out / "checkpoints" / "ray_train").glob("checkpoint_2*")) == before
    assert_same_outputs(out, keep)


def test_ray_data_loader_matches_local_order(tiny_cfg, ray_session, tmp_path):
    """Ray Data into Ray Train (dataset shard, iter_torch_batches) without shuffling streams
    the tokens in file order: the same model as the pyarrow path."""
    from ray_jobs import sae

    run = tmp_path / "run"
    write_extract_stage(run, tokens=2000, files=2)
    cfg = tiny_cfg("sae.loader=ray_data", "sae.shuffle_buffer=0", "sae.epochs=2", run_dir=run)
    manifest = sae.run(cfg)
    assert manifest["extra"]["train_steps"] == 2 * (2000 // 128)
    local = tmp_path / "local"
    train_local(cfg.sae, StageInputs.from_extract(None, str(run / "extract")), str(local), seed=cfg.run.seed)
    assert_same_outputs(run / "sae", local)


def test_two_workers_encode_every_token(tiny_cfg, ray_session, tmp_path):
    """Data-parallel: each worker trains on its share (gradients averaged) and encodes its files."""
    from ray_jobs import sae

    run = tmp_path / "run"
    write_extract_stage(run, tokens=2000, files=3)
    cfg = tiny_cfg("sae.num_workers=2", "sae.epochs=2", run_dir=run)
    ex = sae.run(cfg)["extra"]
    # pyarrow loader: worker 0 reads files 0 and 2 (1333 tokens), worker 1 file 1 (667 tokens);
    # both stop at the smaller share: 667 // 64 = 10 steps per epoch
    assert ex["train_steps"] == 20 and ex["train_tokens"] == 20 * 128
    assert ex["tokens"] == 2000 and ex["fvu"] < 1.0
    names = sorted(p.name for p in (run / "sae" / "features").glob("*.parquet"))
    assert names == ["part-r000-00000.parquet", "part-r001-00000.parquet"]
    feats = pq.read_table(run / "sae" / "features")
    assert feats.num_rows == ex["feature_rows"]
    lat = pq.read_table(run / "sae" / "latents.parquet").to_pylist()
    assert sum(r["count"] for r in lat if r["live"]) == feats.num_rows
    docs = {(d, p) for d, p in zip(feats.column("doc_id").to_pylist(), feats.column("pos").to_pylist())}
    # every file is encoded (file i holds doc ids from 1000 * i on)
    assert {d // 1000 for d, _ in docs} == {0, 1, 2}
