"""`rank1 plan` on the meta device: the paper's Qwen2.5-32B adapter shape and fraction."""

import subprocess
import sys

from rank1_core.config import load_config
from rank1_core.plan import make_plan
from tests.conftest import REPO


def test_qwen32b_plan_matches_the_paper():
    cfg = load_config(REPO / "configs" / "qwen2.5-32b-s1k.yaml")
    p = make_plan(cfg)
    assert (p.components, p.mlp_components, p.attn_components) == (448, 192, 256)
    assert p.layers == 64
    # r=1: each of the 448 modules adds in+out parameters.
    per_layer = (5120 + 5120) + 2 * (5120 + 1024) + (5120 + 5120) + 2 * (5120 + 27648) + (27648 + 5120)
    assert p.lora_params == 64 * per_layer == 8_388_608
    assert 32.7e9 < p.base_params < 32.8e9
    assert p.trainable_fraction < 0.0003  # the paper: under 0.03%
    assert p.store_bytes_adapter_fp16 == 10_000_000 * 448 * 2


def test_tiny_plan_counts_layers_times_seven(tiny_cfg):
    p = make_plan(tiny_cfg())
    assert p.components == 2 * 7 and p.mlp_components == 6


def test_plan_cli_prints_the_figures():
    out = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "plan", "--config",
                          str(REPO / "configs" / "qwen2.5-32b-s1k.yaml")],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "448 = 192 MLP + 256 attention" in out
    assert "0.0256% of the base" in out
