"""Precision `auto`: chosen from the hardware once, logged, saved, hashed (rank1_core/device.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rank1_core.config import ConfigError, load_config, section_hash
from rank1_core.device import Hardware, describe, probe_cpu, resolve_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

AMX = Hardware("cpu", True, "CPU AVX512 with AMX: fast bf16")
SLOW = Hardware("cpu", False, "CPU AVX2: no fast bf16")
GPU = Hardware("cuda", True, "CUDA H200: bf16")
OLD_GPU = Hardware("cuda", False, "CUDA Tesla V100: no bf16")


def _raw(path: Path = DEMO, *overrides: str):
    """The config as written (every `auto` still there): re-read with resolution undone."""
    import yaml

    from rank1_core.config import Config, _from_dict, _set_dotted, parse_override

    data = yaml.safe_load(path.read_text())
    for ov in overrides:
        k, v = parse_override(ov)
        _set_dotted(data, k, v, "test")
    return _from_dict(Config, data, "", str(path))


def _resolved(hw_by_device: dict[str, Hardware], *overrides: str):
    cfg = _raw(DEMO, *overrides)
    cfg.precision = resolve_config(cfg, hw=lambda d: hw_by_device[d])
    return cfg


def test_auto_picks_bf16_on_fast_cpu_and_float32_on_avx2():
    fast = _resolved({"cpu": AMX})
    assert (fast.train.precision, fast.train.full.precision, fast.extract.dtype, fast.transcoder.precision,
            fast.autointerp.local_server.dtype, fast.model.dtype) == \
           ("bf16", "bf16_autocast", "bfloat16", "bf16_autocast", "bfloat16", "bfloat16")
    # Generation stays float32 on a CPU: every Table 1 variant in one dtype.
    assert (fast.evaluate.dtype, fast.ablate.dtype, fast.steer.dtype) == ("float32",) * 3
    slow = _resolved({"cpu": SLOW})
    values = [c.value for c in slow.precision]
    assert set(values) == {"float32"}, values
    assert all(c.requested == "auto" for c in slow.precision)


def test_auto_on_cuda_stages_and_deepspeed_full_finetune():
    cfg = _resolved({"cpu": SLOW, "cuda": GPU}, "train.gpus_per_worker=1", "evaluate.actor_gpus=1",
                    "extract.gpus_per_actor=1", "train.strategy=deepspeed_zero3")
    assert cfg.train.precision == "bf16" and cfg.train.full.precision == "bf16"  # DeepSpeed keeps fp32 masters
    assert cfg.evaluate.dtype == "bfloat16" and cfg.extract.dtype == "bfloat16"
    assert cfg.ablate.dtype == "float32"  # still on the (slow) CPU


def test_explicit_value_wins_with_a_warning_when_slow():
    cfg = _resolved({"cpu": SLOW}, "train.precision=bf16", "extract.dtype=bfloat16")
    assert cfg.train.precision == "bf16" and cfg.extract.dtype == "bfloat16"
    warnings = [line for line in describe(cfg.precision) if line.startswith("warning:")]
    # train.full.precision (unset) inherits train.precision's bf16, and is warned about too
    assert len(warnings) == 3 and "train.precision: bf16 was set in the config" in warnings[0]
    assert "train.full.precision: bf16" in warnings[1]
    assert "CPU AVX2: no fast bf16" in warnings[0]


def test_bf16_on_a_gpu_without_bf16_is_an_error_naming_the_key():
    from rank1_core.device import PrecisionError

    with pytest.raises(PrecisionError, match="'train.precision': bf16 requested.*V100"):
        _resolved({"cpu": SLOW, "cuda": OLD_GPU}, "train.gpus_per_worker=1", "train.precision=bf16")
    # auto on that GPU quietly takes float32
    assert _resolved({"cpu": SLOW, "cuda": OLD_GPU}, "train.gpus_per_worker=1").train.precision == "float32"


def test_unknown_precision_is_the_strict_config_error():
    with pytest.raises(ConfigError, match="'train.precision' must be one of"):
        load_config(DEMO, ["train.precision=fp8"])


def test_the_choice_is_in_the_hash_and_the_saved_config():
    from rank1_core.config import dump_yaml

    fast, slow = _resolved({"cpu": AMX}), _resolved({"cpu": SLOW})
    for stage in ("train", "train_full", "extract", "transcoder"):
        assert section_hash(fast, stage) != section_hash(slow, stage), stage
    assert "precision: bf16\n" in dump_yaml(fast) and "auto" not in dump_yaml(fast).split("precision:")[1][:10]


def test_probe_decides_ambiguous_cpus_and_is_cached(tmp_path):
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return {"float32": 50.0, "bfloat16": 0.8}[dtype]

    cache = tmp_path / "probe.json"
    fast, why = probe_cpu(cache, measure)
    assert not fast and "bf16 0.8 vs float32 50.0" in why and calls == ["float32", "bfloat16"]
    assert probe_cpu(cache, measure)[0] is False and len(calls) == 2  # cached: no second measurement
    cache.write_text("{not json")  # a torn cache file is measured again, not an error
    assert probe_cpu(cache, measure)[0] is False and len(calls) == 4
    (key, hit), = json.loads(cache.read_text()).items()
    assert hit == {"float32": 50.0, "bfloat16": 0.8}


def _run_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(extra)
    return env


def test_simulated_avx2_cpu_resolves_float32_and_the_real_probe_agrees():
    """Under oneDNN/ATen capped at AVX2 (the slow case, reproduced on an AVX512-BF16 machine),
    `auto` is float32 everywhere; with only oneDNN capped the capability is ambiguous and the
    real sub-second probe measures bf16 as slow."""
    code = ("from rank1_core.config import load_config; from rank1_core.device import describe;"
            "c = load_config('configs/demo.yaml'); print('\\n'.join(describe(c.precision)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_run_env(AVX2), capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("precision (CPU AVX2: no fast bf16):") and "bf16" not in out.split("):", 1)[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env=_run_env({"ONEDNN_MAX_CPU_ISA": "AVX2", "RANK1_CACHE": "/tmp/rank1-test-probe"})).stdout
    assert "float32" in out and ("probe:" in out or "no fast bf16" in out)


def test_a_stage_end_to_end_under_the_simulated_avx2_cpu(tmp_path):
    """prepare + 2 steps of the rank-1 LoRA with train.precision auto, on a CPU without fast bf16:
    the run says so first, trains in float32, and saves the choice in config.yaml and the manifest."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ray_jobs.pipeline", "--config", "configs/tiny.yaml", f"run.dir={run}",
           "stages=[prepare, train]", "train.precision=auto", "train.max_steps=2", "train.epochs=1"]
    p = subprocess.run(cmd, cwd=REPO, env=_run_env(AVX2), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    first = p.stdout.splitlines()[0]
    assert first.startswith("precision (CPU AVX2: no fast bf16): ") and "train.precision float32" in first
    assert "[train] precision: train.precision = float32 (auto; CPU AVX2: no fast bf16)" in p.stdout
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert manifest["extra"]["precision_choices"]["train.precision"].startswith("float32 (auto")
    assert "  precision: float32\n" in (run / "train" / "config.yaml").read_text()


def test_rank1_plan_says_which_precision_each_stage_uses(capsys):
    from ray_jobs.plan import main

    assert main(["--config", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "precision on this machine" in out
    for key in ("train.precision", "train.full.precision", "extract.dtype", "evaluate.dtype",
                "autointerp.local_server.dtype"):
        assert key in out.split("precision on this machine", 1)[1], key
    assert main(["--config", str(DEMO), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["precision"]["train.precision"]["requested"] == "auto"
    assert d["precision"]["train.precision"]["value"] in ("bf16", "float32")


def test_deepspeed_ops_are_cached_per_cpu_kind(tmp_path, monkeypatch):
    from rank1_core.device import set_torch_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("RANK1_CACHE", str(tmp_path))
    here = Path(set_torch_extensions_dir())
    assert here.parent == tmp_path / "torch_extensions" and len(here.name) == 10
    code = ("import os; os.environ.pop('TORCH_EXTENSIONS_DIR', None); "
            "from rank1_core.device import set_torch_extensions_dir as f; print(f())")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env=_run_env({**AVX2, "RANK1_CACHE": str(tmp_path)})).stdout.strip()
    assert Path(other).parent == here.parent and Path(other) != here  # an AVX2 machine builds its own
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert set_torch_extensions_dir() == "/somewhere/else"
