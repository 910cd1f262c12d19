"""Shared fixtures. Tiers: fast (no Ray, no training), slow (marked `slow`: Ray or training).

- `tiny_cfg(**overrides)`: a Config from configs/tiny.yaml with run.dir in tmp_path.
- `tiny_model_dir`: the tiny Qwen2 model directory (built once per machine, cached).
- `prepared_run`: a run directory whose prepare stage is done (built once per session;
  copy it with `copy_run` before writing into it).
- `ray_session`: one local Ray instance per session (never `ray stop`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_cfg(tmp_path):
    from rank1_core.config import load_config

    def build(*overrides: str, run_dir: str | Path | None = None):
        return load_config(REPO / "configs" / "tiny.yaml",
                           [f"run.dir={run_dir or tmp_path / 'run'}", *overrides])

    return build


@pytest.fixture(scope="session")
def tiny_model_dir():
    from rank1_core.config import ModelConfig, TinyModelConfig
    from rank1_core.models import resolve_model_dir

    return resolve_model_dir(ModelConfig(name="tiny-qwen2", tiny=TinyModelConfig(
        num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)))


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """A run dir with the tiny config's prepare stage done. Read-only: use copy_run to write."""
    from rank1_core.config import load_config
    from ray_jobs import prepare

    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={run_dir}"])
    prepare.run(cfg)
    return run_dir


@pytest.fixture
def copy_run(tmp_path):
    def copy(src: Path) -> Path:
        dst = tmp_path / "run"
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
