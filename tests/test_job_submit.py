"""`ray job submit --working-dir .` runs the pipeline on a head started with `ray start`,
token authentication on (the token reaches the client through RAY_AUTH_TOKEN_PATH)."""

import subprocess

import pytest

from tests.conftest import REPO
from tests.local_head import LocalHead


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(tmp_path):
    run = tmp_path / "run"
    with LocalHead(tmp_path) as head:
        # Without the token the job server refuses the client.
        env_no_token = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        env_no_token["HOME"] = str(tmp_path)  # no default ~/.ray/auth_token either
        denied = subprocess.run([head.ray_cli(), "job", "list", "--address", head.dashboard],
                                env=env_no_token, capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0
        r = subprocess.run(
            [head.ray_cli(), "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--",
             "python", "-m", "ray_jobs.pipeline", "--config", "configs/tiny.yaml", "--run", str(run),
             # the Ray-using stages (Ray Train, Ray Data actors, DuckDB) and the report
             "stages=[prepare,train,extract,topk,report]"],
            env=head.env, capture_output=True, text=True, timeout=1500, cwd=REPO)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr)
    for stage in ("prepare", "train", "extract", "topk", "report"):
        assert (run / stage / "_SUCCESS").exists(), stage
    # the report of what ran: adapter components with pages, the rest listed as not rendered
    index = (run / "report" / "index.html").read_text()
    assert "Not rendered" in index and "features.html" in index
    assert any((run / "report" / "features" / "adapter").glob("*.html"))
