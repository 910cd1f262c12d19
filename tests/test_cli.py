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


def _run(args, **kw):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
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
