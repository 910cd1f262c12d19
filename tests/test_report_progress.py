"""ray_jobs.progress: a terminal bar without Ray; Ray metrics (tagged by stage) under Ray,
read back from the node's Prometheus endpoint as the dashboard's Prometheus would."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.ray_metrics import wait_for

REPO = Path(__file__).resolve().parent.parent


def test_line_bar_for_logs():
    from ray_jobs.progress import _LineBar

    out = io.StringIO()
    bar = _LineBar("[x] tokens", 200, "tok", every=0.0, file=out)
    bar.update(50)
    bar.update(150)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[x] tokens: 50/200 tok (25%), ")
    assert lines[-1].startswith("[x] tokens: 200/200 tok (100%), ")


def test_progress_without_ray_in_a_fresh_process():
    """No Ray initialised: the same calls drive only the terminal output; ray is not even imported."""
    code = """
import sys
from ray_jobs.progress import Progress, metric, count
with Progress("extract", total=30, unit="tok", log_every=0.0) as p:
    for _ in range(3):
        p.update(10, docs=1, llm_calls=2, spend_usd=0.5)
    p.set(loss=1.25)
assert p.n == 30
assert metric("counter", "tokens") is None
count("extract", "tokens", 5)
print("ray imported:", "ray" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ray imported: False"
    assert "[extract] tokens: 30/30 tok (100%)" in r.stderr


def test_metric_names_are_checked():
    from ray_jobs.progress import metric

    with pytest.raises(ValueError, match="lower_snake_case"):
        metric("counter", "Tokens Processed")


@pytest.mark.slow
def test_metrics_under_ray(ray_session):
    ray = ray_session
    from ray_jobs.progress import Progress

    stage = f"t{uuid.uuid4().hex[:8]}"
    with Progress(stage, total=100, bar=False) as p:
        p.update(40, llm_calls=3, llm_tokens_in=900, spend_usd=0.25)
        p.update(20)
        p.set(loss=1.5)

    @ray.remote
    def explain(n: int, stage: str) -> int:
        from ray_jobs.progress import Progress, in_ray_worker

        assert in_ray_worker()
        with Progress(stage, total=n, main="features_explained", unit="feat") as q:  # tqdm_ray bar
            for _ in range(n):
                q.update(1, llm_calls=1)
        return n

    worker_stage = stage + "_w"
    assert ray.get(explain.remote(5, worker_stage)) == 5
    want = {("ray_rank1_tokens_total", stage): 60, ("ray_rank1_llm_calls_total", stage): 3,
            ("ray_rank1_llm_tokens_in_total", stage): 900, ("ray_rank1_spend_usd_total", stage): 0.25,
            ("ray_rank1_loss", stage): 1.5, ("ray_rank1_progress", stage): 0.6,
            ("ray_rank1_features_explained_total", worker_stage): 5, ("ray_rank1_llm_calls_total", worker_stage): 5,
            ("ray_rank1_progress", worker_stage): 1.0}
    # Ray exports every ~10 s; gauges stay ~30 s after their last set, counters for good
    assert wait_for(ray, want, at_least=False) == pytest.approx(want)
