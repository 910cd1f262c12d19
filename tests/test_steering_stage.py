"""The steer stage end to end on the tiny config (slow: Ray): a prepared run with a random-B
adapter, the real extract stage (Ray Data), a real SAE (the sae stage's no-Ray path) and the
real topk stage; then steering of a named component, the component chosen automatically by
its hesitation contexts, a named and an automatically chosen SAE feature, with random
controls, on Ray actors. Bad targets fail before anything is written."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
from pathlib import Path

import pytest

from rank1_core.config import ConfigError
from rank1_core.rundir import RunDir, run_stage
from rank1_core.steering import RESULT_COLUMNS, SteerError
from test_evaluate_fixtures import add_trained_stages

pytestmark = pytest.mark.slow

# The random tiny model's top contexts never sit on "Wait"; " double" (of "Hmm, let me
# double-check") is among its hits, so it stands in as a hesitation word here.
WORDS = "steer.hesitation_tokens=[Wait, Hmm, double]"
STEER = [WORDS, "steer.limit=4", "steer.max_new_tokens=6", "steer.batch_size=4", "steer.alphas=[0, 1, 100]",
         "steer.modes=[scale, add]", "steer.random_seeds=2", "steer.components=[L00_q_proj]",
         "steer.auto_components=1", "steer.auto_sae_features=1", "steer.actors=2", "steer.threads=1",
         "steer.figure_dpi=40"]


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, prepared_run, tiny_model_dir, ray_session):
    """prepare (shared) + random-B adapter + extract (Ray Data) + SAE + topk."""
    import shutil

    from rank1_core.config import load_config
    from rank1_core.sae import StageInputs, train_local
    from ray_jobs import extract, topk
    from conftest import REPO

    run_dir = tmp_path_factory.mktemp("steer") / "run"
    shutil.copytree(prepared_run, run_dir)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={run_dir}"])
    add_trained_stages(run_dir, tiny_model_dir)
    extract.run(cfg)
    run = RunDir(str(run_dir))
    ex = run.stage("extract")

    def sae_body(sr):
        train_local(cfg.sae, StageInputs.from_extract(ex.fs, ex.path()), sr.stage.path(), seed=0, out_fs=sr.stage.fs)

    run_stage(run.stage("sae"), "test-sae", "test: sae via train_local\n", sae_body, log=lambda m: None)
    topk.run(cfg)
    return run_dir


def _cfg(tiny_cfg, run_dir, *extra):
    latents = pd.read_parquet(RunDir(str(run_dir)).stage("sae").path("latents.parquet"))
    live = latents.loc[latents["live"], "name"].iloc[0]
    return tiny_cfg(*STEER, f"steer.sae_features=[{live}]", *extra, run_dir=run_dir), live


def test_steer_stage_end_to_end(tiny_cfg, topk_run, ray_session, capsys, tmp_path):
    from ray_jobs import steer

    cfg, live = _cfg(tiny_cfg, topk_run)
    m = steer.run(cfg)
    st = RunDir(str(topk_run)).stage("steer")
    res = pq.read_table(st.path("results.parquet")).to_pandas()
    targets = pq.read_table(st.path("targets.parquet")).to_pandas()
    samples = pq.read_table(st.path("samples.parquet")).to_pandas()
    assert list(res.columns) == RESULT_COLUMNS

    # targets: the named ones plus one automatic component and one automatic SAE feature
    by = targets.set_index("target")
    assert by.loc["L00_q_proj", "chosen_by"] == "config" and by.loc[live, "chosen_by"] == "config"
    auto = targets[targets["chosen_by"] == "auto"]
    assert sorted(auto["kind"]) == ["component", "sae"]
    assert (auto["n_hesitation"] > 0).all()
    # the automatic component has the most hesitation contexts of all components
    from rank1_core.steering import hesitation_contexts

    ctx = pd.read_parquet(RunDir(str(topk_run)).stage("topk").path("contexts.parquet"))
    best = hesitation_contexts(ctx, "adapter", ["Wait", "Hmm", "double"], [0, 1])
    comp = auto[auto["kind"] == "component"].iloc[0]
    assert comp["n_hesitation"] == best["n_hesitation"].max()

    # conditions: 1 unsteered + (2 components x 2 modes + 2 SAE features x add) x 3 alphas, x 3 (2 random seeds)
    assert len(res) == 1 + (2 * 2 + 2) * 3 * 3
    assert len(samples) == 4 * len(res)
    assert set(res["target_kind"]) == {"none", "component", "sae", "random"}
    assert (res["n"] == 4).all()
    own = res[res["target_kind"].isin(["component", "sae"])]
    # alpha 1 in scale mode and alpha 0 in add mode reproduce the unsteered responses exactly
    ident = own[((own["mode"] == "scale") & (own["alpha"] == 1)) | ((own["mode"] == "add") & (own["alpha"] == 0))]
    assert len(ident) == 2 * 2 + 2
    assert (ident["identical_rate"] == 1.0).all() and (ident["kl_mean"] == 0.0).all()
    base = res[res["target_kind"] == "none"].iloc[0]
    for col in ("hesitation_rate", "mean_length", "accuracy"):
        assert (ident[col] == base[col]).all()
    # far from the identity the KL is positive
    assert (own[(own["mode"] == "add") & (own["alpha"] == 100)]["kl_mean"] > 0).all()
    # random controls: the target's perturbation size, one row per seed
    rnd = res[res["target_kind"] == "random"]
    assert sorted(rnd["seed"].unique().tolist()) == [0, 1]
    merged = rnd.merge(own, on=["target", "mode", "alpha"], suffixes=("", "_t"))
    assert len(merged) == len(rnd)
    assert (merged["perturbation_rms"] - merged["perturbation_rms_t"]).abs().max() < 1e-9
    # every measure in range (greedy responses of at most 6 tokens)
    assert (res["hesitation_rate"] >= 0).all() and res["mean_length"].between(1, 6).all()

    # figures, summary, manifest
    for f in targets["figure"]:
        assert st.exists(f) and (st.local_path(f).read_bytes()[:4] == b"\x89PNG")
    assert "### L00_q_proj" in st.read_text("summary.md")
    ex = m["extra"]
    assert ex["conditions"] == len(res) and ex["prompts"] == 4 and ex["actors"] == 2
    assert ex["reused_conditions"] == 2 * (2 * 2 + 2)  # zero-norm random controls
    assert m["rows"]["results"] == len(res)
    # done: skipped on rerun
    assert steer.run(cfg)["finished_at"] == m["finished_at"]

    # the report shows every curve and links each from its feature's page
    from rank1_core.config import ReportConfig
    from rank1_core.report.build import build_report

    out = tmp_path / "report"
    rep = build_report(str(topk_run), ReportConfig(), out, log=lambda msg: None)
    assert "steering" in rep.rendered
    index = (out / "index.html").read_text()
    for t in targets.itertuples():
        fig = out / "figures" / "steer" / Path(t.figure).name
        assert fig.read_bytes()[:4] == b"\x89PNG"
        assert f'src="figures/steer/{fig.name}"' in index
    page = (out / "features" / "adapter" / "L00_q_proj.html").read_text()
    assert '<section class="steering"' in page and 'src="../../figures/steer/adapter_L00_q_proj.png"' in page
    assert (out / "features" / "adapter" / "L00_q_proj.html").parent.joinpath(
        "../../figures/steer/adapter_L00_q_proj.png").resolve().exists()
    unsteered = (out / "features" / "adapter" / "L00_k_proj.html")
    if unsteered.exists() and "L00_k_proj" not in set(targets["target"]):
        assert '<section class="steering"' not in unsteered.read_text()


@pytest.mark.parametrize("override, match", [
    ("steer.components=[L07_q_proj]", "unknown component 'L07_q_proj'"),
    ("steer.sae_features=[F09999]", "'F09999' does not exist"),
    ("steer.benchmarks=[nope]", "steer.benchmarks names 'nope'"),
])
def test_bad_targets_fail_before_any_work(tiny_cfg, topk_run, override, match, tmp_path):
    import shutil

    from ray_jobs import steer

    run_dir = tmp_path / "run"
    shutil.copytree(topk_run, run_dir, ignore=shutil.ignore_patterns("steer"))
    cfg, _ = _cfg(tiny_cfg, run_dir, override)
    with pytest.raises(ConfigError, match=match):
        steer.run(cfg)
    assert not (run_dir / "steer").exists()


def test_dead_sae_feature_and_no_hesitation_context(tiny_cfg, topk_run, tmp_path):
    import shutil

    from ray_jobs import steer

    run_dir = tmp_path / "run"
    shutil.copytree(topk_run, run_dir, ignore=shutil.ignore_patterns("steer"))
    latents = pd.read_parquet(run_dir / "sae" / "latents.parquet")
    if latents["live"].all():
        pytest.skip("every latent of this SAE is live")
    dead = latents.loc[~latents["live"], "name"].iloc[0]
    with pytest.raises(SteerError, match=f"'{dead}' is not live"):
        steer.run(tiny_cfg(*STEER, f"steer.sae_features=[{dead}]", run_dir=run_dir))
    with pytest.raises(SteerError, match="no component has a top positive context"):
        steer.run(tiny_cfg("steer.hesitation_tokens=[Nonexistentword]", "steer.auto_components=2",
                           "steer.components=[]", run_dir=run_dir))
    assert not (run_dir / "steer").exists()
