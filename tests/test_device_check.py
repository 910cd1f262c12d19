"""scripts/device_check.py on the CPU: the CUDA check cannot rot while no GPU is at hand.

The whole check runs once, `--device cpu` against the CPU float32 reference, in a subprocess
that cannot import ray, duckdb, vllm or deepspeed (the GPU machine has none of them), so an
import that would break it there breaks it here. The comparison itself is tested on values
worked out by hand, and a real bf16-vs-float32 difference under a too-strict tolerance must make
the script exit 1.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "device_check.py"

# Runs the script as `python scripts/device_check.py` would, with ray, duckdb, vllm and
# deepspeed invisible to every import (find_spec included, as transformers' checks use it).
HIDDEN_RUN = """
import runpy, sys
HIDE = {"ray", "duckdb", "vllm", "deepspeed"}
class Hidden:
    def __init__(self, inner): self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDE: return None
        f = getattr(self.inner, "find_spec", None)
        return f(name, path, target) if f else None
    def __getattr__(self, a): return getattr(self.inner, a)
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
sys.path = [p for p in sys.path if p not in ("", ".")]
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _load():
    """The script as a module (registered, as its dataclasses need)."""
    if "device_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["device_check"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["device_check"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "report.json"
    proc = subprocess.run([sys.executable, "-c", HIDDEN_RUN, str(SCRIPT), "--device", "cpu", "--quick",
                           "--threads", "2", "--out", str(out)],
                          cwd=tmp_path_factory.mktemp("cwd"), capture_output=True, text=True, timeout=600)
    return proc, out


def test_cpu_against_itself_passes_without_ray_duckdb_vllm_deepspeed(cpu_run):
    proc, out = cpu_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rep = json.loads(out.read_text())
    assert rep["passed"] and rep["forbidden_modules_imported"] == []
    rows = rep["rows"]
    for arch in ("qwen2", "llama"):
        for piece in ("train", "extract", "ablate", "sae", "steer", "transcoder"):
            mine = [r for r in rows if r["arch"] == arch and r["piece"] == piece]
            assert any("float32 vs cpu float32" in r["mode"] for r in mine), (arch, piece)
            if piece != "sae":
                assert any("bfloat16 vs cpu float32" in r["mode"] for r in mine), (arch, piece)
    # float32 on the same CPU is deterministic: every compared quantity is identical
    f32 = [r for r in rows if r["mode"] == "cpu float32 vs cpu float32"]
    assert len(f32) >= 30 and all(r["error"] == 0.0 for r in f32)
    # bf16 is rounded, not wrong: its errors are nonzero but inside the stated tolerances
    bf = [r for r in rows if r["mode"] == "cpu bfloat16 vs cpu float32" and not r["quantity"].startswith("tokens_")]
    assert any(r["error"] > 0 for r in bf) and all(r["error"] <= r["tolerance"] for r in bf)
    # steering with alpha = 1 changes no logit, in either dtype
    ident = [r for r in rows if r["quantity"].startswith("alpha=1")]
    assert len(ident) == 2 * 3 and all(r["ok"] and r["error"] == 0.0 for r in ident)
    # the throughput part ran and reports its ratios
    b = rep["bench"]
    assert b["extract"]["hooks_vs_bare"] > 0 and b["ablate"]["passes_per_s"] > 0 and b["sae"]["tokens_per_s"] > 0
    assert b["plan_qwen32b"]["layers"] == 64
    assert "checks passed" in proc.stdout and "extraction hooks vs bare forward" in proc.stdout


def test_compare_on_hand_worked_values():
    dc = _load()
    ref = np.array([3.0, 4.0])  # norm 5
    assert dc.rel_err(np.array([3.0, 4.0005]), ref) == pytest.approx(1e-4)
    assert dc.rel_err(np.array([3.0, 4.0, 0.0]), ref) == float("inf")
    assert np.isnan(dc.rel_err(np.array([np.nan, 4.0]), ref))
    def cmp(x):
        return dc.compare("a", "extract", {"neurons": np.array(x), "info": {}}, {"neurons": ref}, "m", "float32")

    rows = cmp([3.0, 4.0005])
    assert [(r.quantity, r.ok) for r in rows] == [("neurons", True)]  # 1e-4 <= tolerance 1e-4
    rows = cmp([3.0, 4.001])
    assert not rows[0].ok and rows[0].error == pytest.approx(2e-4)


def test_greedy_divergence_allowed_only_at_a_near_tie():
    dc = _load()
    ref_tokens = np.array([[1, 2, 3]])
    logits = np.zeros((1, 3, 4))
    logits[0, 1] = [0.0, 10.0, 9.99999, 0.0]  # step 1: near tie between tokens 1 and 2
    logits[0, 2] = [0.0, 0.0, 0.0, 10.0]
    assert dc.greedy_agreement(np.array([[1, 1, 3]]), ref_tokens, logits, 1e-5)[0]  # broke the tie: fine
    ok, _, first = dc.greedy_agreement(np.array([[1, 2, 0]]), ref_tokens, logits, 1e-5)
    assert not ok and first == 2  # differs where the reference was sure
    rows = dc.compare("a", "steer", {"tokens_x": np.array([[1, 2, 0]]), "logits_x": logits, "info": {}},
                      {"tokens_x": ref_tokens, "logits_x": logits}, "m", "float32")
    assert {r.quantity: r.ok for r in rows} == {"tokens_x": False, "logits_x": True}


def test_a_real_mismatch_exits_1(tmp_path, monkeypatch):
    """bf16 extraction differs from float32 by rounding; under a tolerance of 1e-9 that is a
    mismatch, which the script must report with exit status 1 and a FAIL row."""
    dc = _load()
    monkeypatch.setitem(dc.TOLERANCES, "bfloat16", {**dc.TOLERANCES["bfloat16"], "act": 1e-9})
    out = tmp_path / "r.json"
    rc = dc.main(["--device", "cpu", "--quick", "--dtypes", "bfloat16", "--archs", "llama", "--pieces", "extract",
                  "--no-bench", "--threads", "2", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rc == 1 and not rep["passed"]
    bad = {r["quantity"] for r in rep["rows"] if not r["ok"]}
    assert bad == {"adapter_scalars", "neurons"}


def test_bad_arguments_exit_2(tmp_path, capsys):
    dc = _load()
    assert dc.main(["--device", "cpu", "--pieces", "extract,evaluate", "--out", str(tmp_path / "r.json")]) == 2
    assert "--pieces: unknown value 'evaluate'" in capsys.readouterr().out
