"""The `rank1` console script and `python -m ray_jobs.<stage>` share one config system."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _rank1():
    exe = Path(sys.executable).parent / "rank1"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray_jobs.cli"]


def _run(args, env_extra=None, **kw):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    env.pop("RANK1_DEBUG", None) if not env_extra or "RANK1_DEBUG" not in env_extra else None
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, **kw)


def test_rank1_run_prepare_then_status_then_skip(tmp_path):
    run = tmp_path / "run"
    r = _run([*_rank1(), "run", "--config", "configs/tiny.yaml", "--run", str(run), "data.num_traces=24",
              "stages=[prepare]"])
    assert r.returncode == 0, r.stderr
    assert (run / "prepare" / "_SUCCESS").exists()
    s = _run([*_rank1(), "status", "--run", str(run)])
    assert s.returncode == 0 and "prepare" in s.stdout and "done" in s.stdout
    again = _run([sys.executable, "-m", "ray_jobs.prepare", "--config", "configs/tiny.yaml", "--run", str(run),
                  "data.num_traces=24", "stages=[prepare]"])
    assert again.returncode == 0 and "skipping" in again.stdout


def test_bad_override_exits_2_with_the_key(tmp_path):
    r = _run([*_rank1(), "prepare", "--config", "configs/tiny.yaml", "--run", str(tmp_path / "r"), "data.tasks=7"])
    assert r.returncode == 2
    assert "'data.tasks' must be a list, got 7" in r.stderr
    assert not (tmp_path / "r" / "prepare" / "_SUCCESS").exists()


def test_unknown_command_lists_commands():
    r = _run([*_rank1(), "frobnicate"])
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr and "prepare" in r.stderr
    h = _run([*_rank1(), "--help"])
    assert h.returncode == 0 and "plan" in h.stdout


# --------------------------------------------------------------------------- one error path, every door


def _one_line_error(r) -> str:
    """The door printed one `error: ...` line (no traceback) and exited 2."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    return last


def _bad_utf8_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"question": "caf\xe9", "solution": "x"}\n{"question": "What is 1+1?", "solution": "2"}\n')
    parquet = tmp_path / "bad.parquet"
    question = pa.array([b"caf\xe9", b"What is 1+1?"], type=pa.binary()).view(pa.string())  # unchecked bytes
    pq.write_table(pa.table({"question": question, "solution": ["x", "2"]}), parquet)
    return jsonl, parquet


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_rerun_fails_through_every_door_and_keeps_the_finished_stage(tmp_path, capsys):
    from rank1_core.config import load_config
    from ray_jobs import prepare, status

    run = tmp_path / "run"
    base = ["--config", "configs/tiny.yaml", "--run", str(run), "data.num_traces=24", "stages=[prepare]"]
    prepare.run(load_config("configs/tiny.yaml", [f"run.dir={run}", "data.num_traces=24", "stages=[prepare]"]))
    before = _files(run / "prepare")
    jsonl, parquet = _bad_utf8_inputs(tmp_path)
    bad = ["data.source=s1k"]
    doors = [
        ([*_rank1(), "run", *base, *bad, f"data.path={jsonl}"], f"{jsonl}: row 1: "),
        ([*_rank1(), "prepare", *base, *bad, f"data.path={parquet}"], f"{parquet}: row 1: column 'question' "),
        ([sys.executable, "-m", "ray_jobs.prepare", *base, *bad, f"data.path={jsonl}"], f"{jsonl}: row 1: "),
    ]
    for args, want in doors:
        err = _one_line_error(_run(args))
        assert err.startswith("error: DataError: ") and want in err and "not valid UTF-8" in err
        assert _files(run / "prepare") == before  # the finished stage is untouched
    capsys.readouterr()
    assert status.main(["--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prepare      done") and "a rerun is unfinished" in out


def test_config_run_dir_and_model_errors_are_one_line_at_every_door(tmp_path):
    run = str(tmp_path / "run")
    base = ["--config", "configs/tiny.yaml", "--run", run, "stages=[prepare]"]
    override = "error: override 'data.source=hub': 'data.source' must be one of"
    for door in ([*_rank1(), "run"], [*_rank1(), "prepare"], [sys.executable, "-m", "ray_jobs.prepare"],
                 [sys.executable, "-m", "ray_jobs.pipeline"]):
        assert _one_line_error(_run([*door, *base, "data.source=hub"])).startswith(override)
    # a run directory that cannot be written (/sys refuses new folders, even to root)
    ro = _one_line_error(_run([*_rank1(), "run", *base[:2], "--run", "/sys/rank1-test/run", "stages=[prepare]"]))
    assert "PermissionError" in ro and "/sys/rank1-test" in ro
    missing = _one_line_error(_run([sys.executable, "-m", "ray_jobs.pipeline", *base, "model.name=/nonexistent/model"]))
    assert "ModelNotAvailable: model '/nonexistent/model'" in missing
    # RANK1_DEBUG=1: the same error with its traceback
    debug = _run([*_rank1(), "run", *base, "data.source=hub"], env_extra={"RANK1_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_nan_activations_are_one_line_through_rank1_run(tmp_path):
    import numpy as np
    import pyarrow as pa

    from tests.test_sae_fixtures import write_extract_stage

    def poison(i, t):
        col = t.column("L00_v_proj").to_numpy().copy()
        col[3] = np.nan
        return t.set_column(t.schema.get_field_index("L00_v_proj"), "L00_v_proj", pa.array(col, pa.float32()))

    write_extract_stage(tmp_path / "run", tokens=200, table_edit=poison)
    for door in ([*_rank1(), "run"], [*_rank1(), "sae"]):
        err = _one_line_error(_run([*door, "--config", "configs/tiny.yaml", "--run", str(tmp_path / "run"),
                                    "stages=[sae]"]))
        assert "SAEInputError" in err and "'L00_v_proj'" in err and "nan" in err
    assert not (tmp_path / "run" / "sae" / "_SUCCESS").exists()
