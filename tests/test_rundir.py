"""Run directories: markers, manifests, skip-on-rerun, partial-stage clearing, URIs."""

import json

import pyarrow.fs as pafs
import pytest

from rank1_core.rundir import RunDir, StageNotDone, chained_hash, run_stage


def _body(rows):
    def body(sr):
        sr.stage.write_text("out/a.txt", "hello")
        sr.rows["things"] = rows
    return body


def test_stage_writes_manifest_and_marker_and_skips(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    st = run.stage("s")
    calls = []

    def body(sr):
        calls.append(1)
        _body(3)(sr)

    m = run_stage(st, "h1", "cfg: 1\n", body, log=lambda _: None)
    assert m["rows"] == {"things": 3} and m["config_hash"] == "h1"
    assert st.read_text("_SUCCESS").strip() == "h1"
    assert json.loads(st.read_text("manifest.json"))["stage"] == "s"
    assert st.read_text("config.yaml") == "cfg: 1\n"
    run_stage(st, "h1", "cfg: 1\n", body, log=lambda _: None)
    assert len(calls) == 1  # skipped
    run_stage(st, "h2", "cfg: 2\n", body, log=lambda _: None)
    assert len(calls) == 2  # config changed: redone
    run_stage(st, "h2", "cfg: 2\n", body, force=True, log=lambda _: None)
    assert len(calls) == 3


def test_crashed_stage_leaves_no_marker_and_is_cleared(tmp_path):
    st = RunDir(str(tmp_path / "run")).stage("s")

    def crash(sr):
        sr.stage.write_text("out/partial.txt", "x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(st, "h", "", crash, log=lambda _: None)
    assert not st.is_done() and st.exists("out/partial.txt")
    run_stage(st, "h", "", _body(1), log=lambda _: None)
    assert st.is_done("h") and not st.exists("out/partial.txt")


def test_resumable_stage_keeps_partial_output_with_same_hash(tmp_path):
    st = RunDir(str(tmp_path / "run")).stage("s")

    def crash(sr):
        sr.stage.write_text("ckpt/step1", "x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(st, "h", "", crash, resumable=True, log=lambda _: None)
    seen = []
    run_stage(st, "h", "", lambda sr: seen.append(sr.stage.exists("ckpt/step1")), resumable=True, log=lambda _: None)
    assert seen == [True]


def test_require_done_names_the_stage(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(StageNotDone, match="stage 'train' has not finished"):
        run.stage("train").require_done()


def test_chained_hash_changes_with_upstream(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    up = run.stage("up")
    run_stage(up, "a", "", lambda sr: None, log=lambda _: None)
    h1 = chained_hash("own", [up])
    run_stage(up, "b", "", lambda sr: None, log=lambda _: None)
    assert chained_hash("own", [up]) != h1


def test_file_uri_goes_through_pyarrow(tmp_path):
    run = RunDir(f"file://{tmp_path}/uri-run")
    assert isinstance(run.fs, pafs.LocalFileSystem)
    st = run.stage("s")
    run_stage(st, "h", "", _body(2), log=lambda _: None)
    assert (tmp_path / "uri-run" / "s" / "_SUCCESS").exists()
    assert run.status() == {"s": "done"}


def test_remote_style_filesystem_roundtrip(tmp_path):
    # A SubTreeFileSystem is not LocalFileSystem: exercises the non-local code paths
    # (stream writes, copy_files uploads and downloads) that s3:// and gs:// take.
    run = RunDir(str(tmp_path / "x"))
    run.fs = pafs.SubTreeFileSystem(str(tmp_path / "remote"), pafs.LocalFileSystem())
    run.root = "run"
    run.fs.create_dir("run", recursive=True)
    st = run.stage("s")
    local = tmp_path / "model"
    local.mkdir()
    (local / "w.bin").write_bytes(b"123")
    run_stage(st, "h", "", lambda sr: sr.stage.upload_dir(local, "model"), log=lambda _: None)
    assert (tmp_path / "remote" / "run" / "s" / "model" / "w.bin").read_bytes() == b"123"
    with st.local_copy("model") as p:
        assert (p / "w.bin").read_bytes() == b"123"
    assert st.is_done("h")


# --------------------------------------------------------------------------- reruns of a finished stage


def test_failed_rerun_leaves_the_finished_stage_done_and_intact(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    st = run.stage("s")
    run_stage(st, "h1", "cfg: 1\n", _body(1), log=lambda _: None)

    def bad_input(sr):
        sr.stage.write_text("out/a.txt", "half-written")
        sr.stage.write_text("ckpt/step1", "x")
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        run_stage(st, "h2", "cfg: 2\n", bad_input, resumable=True, log=lambda _: None)
    assert st.is_done("h1") and st.read_text("out/a.txt") == "hello" and st.read_text("config.yaml") == "cfg: 1\n"
    assert run.status() == {"s": "done"} and run.rebuilding() == ["s"]
    # the rerun with the same config resumes its own folder, then replaces the old outputs
    seen = []

    def finish(sr):
        seen.append(sr.stage.exists("ckpt/step1"))
        sr.stage.write_text("out/a.txt", "new")

    run_stage(st, "h2", "cfg: 2\n", finish, resumable=True, log=lambda _: None)
    assert seen == [True] and st.is_done("h2") and st.read_text("out/a.txt") == "new"
    assert json.loads(st.read_text("manifest.json"))["config_hash"] == "h2"
    assert run.rebuilding() == [] and sorted(p.name for p in (tmp_path / "run").iterdir()) == [".staging", "s"]
    assert list((tmp_path / "run" / ".staging").iterdir()) == []


def test_publish_cut_between_its_renames_is_finished_on_the_next_run(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    st = run.stage("s")
    run_stage(st, "h1", "", _body(1), log=lambda _: None)
    run_stage(st, "h2", "", _body(2), log=lambda _: None)  # published: staging gone
    # as if killed after moving the old folder away and before moving the new one in
    new = st.staging()
    run_stage(new, "h3", "", _body(3), log=lambda _: None)
    (tmp_path / "run" / "s").rename(tmp_path / "run" / ".staging" / "s.old")
    calls = []
    run_stage(st, "h3", "", lambda sr: calls.append(1), log=lambda _: None)
    assert calls == [] and st.is_done("h3") and not (tmp_path / "run" / ".staging" / "s.old").exists()


def test_rerun_on_a_filesystem_without_local_paths(tmp_path):
    run = RunDir(str(tmp_path / "x"))
    run.fs = pafs.SubTreeFileSystem(str(tmp_path / "remote"), pafs.LocalFileSystem())
    run.root = "run"
    st = run.stage("s")
    run_stage(st, "h1", "", _body(1), log=lambda _: None)
    with pytest.raises(RuntimeError):
        run_stage(st, "h2", "", lambda sr: (_ for _ in ()).throw(RuntimeError("boom")), log=lambda _: None)
    assert st.is_done("h1")
    run_stage(st, "h2", "", _body(2), log=lambda _: None)
    assert st.is_done("h2") and json.loads(st.read_text("manifest.json"))["rows"] == {"things": 2}


def test_atomic_output_keeps_the_old_file_when_a_write_fails(tmp_path):
    from rank1_core.rundir import atomic_local_path, atomic_output, write_parquet_atomic
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = pafs.LocalFileSystem(), str(tmp_path / "t.parquet")
    write_parquet_atomic(fs, path, pa.table({"a": [1, 2]}))
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(fs, path) as out:
            out.write(b"PAR1 torn")
            raise KeyboardInterrupt
    assert pq.read_table(path).column("a").to_pylist() == [1, 2]
    with pytest.raises(OSError):
        with atomic_local_path(tmp_path / "fig.png") as p:
            p.write_bytes(b"half")
            raise OSError("disk full")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.parquet"]  # no temporary left over
