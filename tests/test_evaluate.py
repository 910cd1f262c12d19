"""The evaluate stage: engine grouping, bad benchmark input, and (slow) end to end on the
tiny config with the transformers backend (followed by the ablate stage) and with vLLM (the
adapter as a LoRARequest)."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from rank1_core.benchmarks import Variant, engine_groups, order_samples, summarize
from rank1_core.config import ConfigError
from rank1_core.generation import vllm_available
from rank1_core.grading import BenchmarkError
from ray_jobs import evaluate
from test_evaluate_fixtures import VLLM_TINY, add_trained_stages

SAMPLE_COLUMNS = ["variant", "benchmark", "problem_id", "sample", "response", "extracted", "correct",
                  "n_tokens", "finished", "backend", "lora_mode"]


def test_engine_groups_share_base_weights_unless_merged():
    vs = [Variant("base", "/m"), Variant("lora", "/m", "/a"), Variant("x_ablated", "/m", "/b"), Variant("full", "/f")]
    assert engine_groups(vs, "lora_request") == [("/m", {"base": None, "lora": "/a", "x_ablated": "/b"}),
                                                 ("/f", {"full": None})]
    assert engine_groups(vs, "merged") == [("/m", {"base": None}), ("/f", {"full": None}),
                                           ("/m", {"lora": "/a"}), ("/m", {"x_ablated": "/b"})]


def test_config_rejects_impossible_settings(tiny_cfg):
    with pytest.raises(ConfigError, match="evaluate.samples is 4 but evaluate.temperature is 0"):
        tiny_cfg("evaluate.samples=4")
    with pytest.raises(ConfigError, match="lora_mode 'lora_request' needs evaluate.backend 'vllm'"):
        tiny_cfg("evaluate.lora_mode=lora_request")
    with pytest.raises(ConfigError, match="unknown variant 'best'"):
        tiny_cfg("evaluate.variants=[base, best]")
    with pytest.raises(ConfigError, match="ablate.groups\\[g\\].modules: unknown module 'lm_head'"):
        tiny_cfg("ablate.groups=[{name: g, modules: [lm_head]}]")


def test_benchmark_missing_its_answer_column_fails_clearly_and_writes_nothing(
        tiny_cfg, prepared_run, copy_run, tiny_model_dir):
    run_dir = copy_run(prepared_run)
    add_trained_stages(run_dir, tiny_model_dir)
    bench = run_dir / "prepare" / "benchmarks" / "arith-heldout.parquet"
    pq.write_table(pq.read_table(bench).drop(["answer"]), bench)
    with pytest.raises(BenchmarkError, match=r"arith-heldout\.parquet has no column 'answer'"):
        evaluate.run(tiny_cfg(run_dir=run_dir))
    assert not (run_dir / "evaluate" / "_SUCCESS").exists()
    assert not (run_dir / "evaluate" / "samples.parquet").exists()


def test_missing_upstream_stage_is_named(tiny_cfg, prepared_run, copy_run):
    from rank1_core.rundir import StageNotDone

    with pytest.raises(StageNotDone, match="stage 'train' has not finished"):
        evaluate.run(tiny_cfg(run_dir=copy_run(prepared_run)))


def test_order_samples_follows_variants_problems_and_samples_and_counts_them():
    """The one ordering of graded samples (evaluate, ablate, transcoder_eval): variant order as
    given, then benchmark, problem order within it, sample; typed columns; a lost sample fails."""
    items = [{"variant": v, "benchmark": "b", "problem_id": p, "problem_index": i}
             for v in ("lora", "base") for i, p in enumerate(("p9", "p1"))]
    rows = [{"variant": v, "benchmark": "b", "problem_id": p, "sample": s, "correct": 1, "finished": 0,
             "marker_found": 1, "n_tokens": 3.0} for v in ("base", "lora") for p in ("p1", "p9") for s in (1, 0)]
    out = order_samples(pd.DataFrame(rows), items, ["lora", "base"], 2)
    assert list(zip(out["variant"], out["problem_id"], out["sample"]))[:4] == [
        ("lora", "p9", 0), ("lora", "p9", 1), ("lora", "p1", 0), ("lora", "p1", 1)]
    assert out["correct"].dtype == bool and out["n_tokens"].dtype == "int32" and out.index.tolist() == list(range(8))
    with pytest.raises(RuntimeError, match="generation returned 7 samples, expected 8"):
        order_samples(pd.DataFrame(rows[:-1]), items, ["lora", "base"], 2)


def test_summary_and_both_table1s_show_the_marker_rate():
    """evaluate's summary keeps each variant's prompt; Table 1 (evaluate's table1.md and the
    report's) shows the share of think-prompted responses that reached the answer marker."""
    from rank1_core.grading import table1, table1_markdown
    from rank1_core.report import tables as tabs

    rows = []
    for v, prompt, marks in (("base", "plain", [0, 0, 0, 0]), ("lora", "think", [1, 1, 1, 0]),
                             ("full", "think", [1, 1, 1, 1])):
        for i, m in enumerate(marks):
            rows.append({"variant": v, "benchmark": "b", "problem_id": str(i), "sample": 0, "n_tokens": 8,
                         "finished": bool(m), "marker_found": bool(m), "correct": bool(m) and i < 2 + (v == "full"),
                         "prompt": prompt})
    summary = summarize(pd.DataFrame(rows))
    assert summary.set_index("variant").loc[["base", "lora", "full"], "prompt"].tolist() == ["plain", "think", "think"]
    assert summary.set_index("variant")["marker_rate"].to_dict() == {"base": 0.0, "full": 1.0, "lora": 0.75}
    md = table1_markdown(table1(summary, ["b"]))
    assert "Answer marker reached (LoRA / full) |" in md and "| 75.0% / 100.0% |" in md
    t1 = tabs.table1(summary)
    assert t1.loc[0, "base_marker_rate"] is None and t1.loc[0, "lora_marker_rate"] == 0.75
    disp = tabs.table1_display(t1)
    assert disp.columns.tolist()[-1] == "Answer marker reached (Rank-1 LoRA / Full fine-tune)"
    assert disp.iloc[0, -1] == "75.0% / 100.0%"
    assert disp["Rank-1 LoRA"][0] == "0.5000 ± 0.2887"  # the marker column is not taken for a variant
    # the transcoder adapters (transcoder_eval's summary, think prompts) join the column
    tsum = pd.DataFrame({"variant": ["transcoder"], "benchmark": ["b"], "pass1": [0.25], "marker_rate": [0.5]})
    disp = tabs.table1_display(tabs.table1_add_transcoder(t1, tsum))
    assert disp.columns.tolist()[-1] == "Answer marker reached (Rank-1 LoRA / Full fine-tune / Transcoder adapters)"
    assert disp.iloc[0, -1] == "75.0% / 100.0% / 50.0%"


def check_outputs(run_dir, variants, n_problems=16, max_tokens=16):
    st = run_dir / "evaluate"
    samples = pd.read_parquet(st / "samples.parquet")
    assert set(SAMPLE_COLUMNS) | {"marker_found", "answer", "prompt"} == set(samples.columns)
    assert len(samples) == len(variants) * n_problems
    assert samples["variant"].drop_duplicates().tolist() == variants
    assert samples["correct"].dtype == bool and samples["finished"].dtype == bool
    assert (samples["n_tokens"] <= max_tokens).all() and (samples["n_tokens"] >= 1).all()
    summary = pd.read_parquet(st / "summary.parquet")
    assert summary["variant"].tolist() == sorted(variants)
    assert (summary["n_problems"] == n_problems).all()
    for r in summary.itertuples():
        got = samples[samples["variant"] == r.variant]["correct"].mean()
        assert r.pass1 == pytest.approx(got)
    # a think response that never reached the answer marker is graded wrong (evaluate.missing_marker)
    think = samples[samples["prompt"] == "think"]
    assert not (think["correct"] & ~think["marker_found"]).any()
    assert think["extracted"][~think["marker_found"]].isna().all()
    assert summary["prompt"].notna().all()
    return samples, summary


@pytest.mark.slow
def test_evaluate_then_ablate_end_to_end(tiny_cfg, prepared_run, copy_run, tiny_model_dir, ray_session):
    """Both stages on the tiny config (transformers backend), as the pipeline runs them."""
    from ray_jobs import ablate

    run_dir = copy_run(prepared_run)
    add_trained_stages(run_dir, tiny_model_dir)
    cfg = tiny_cfg(run_dir=run_dir)
    m = evaluate.run(cfg)
    samples, summary = check_outputs(run_dir, ["base", "lora", "full"])
    modes = {v: set(g["lora_mode"].fillna("none")) for v, g in samples.groupby("variant")}
    assert modes == {"base": {"none"}, "lora": {"peft"}, "full": {"none"}}
    assert set(samples["backend"]) == {"transformers"}
    # The random-B adapter and the perturbed model generate differently from the base.
    by = {v: g["response"].tolist() for v, g in samples.groupby("variant")}
    assert by["base"] != by["lora"] and by["base"] != by["full"]
    t1 = pd.read_csv(run_dir / "evaluate" / "table1.csv")
    assert t1["benchmark"].tolist() == ["arith-heldout"]
    assert "% Recovery" in (run_dir / "evaluate" / "table1.md").read_text()
    assert t1["base_marker_rate"].isna().all() and t1["lora_marker_rate"].notna().all()  # base: plain prompt
    assert m["extra"]["lora_mode"] == {"base": None, "lora": "peft", "full": None}
    assert set(m["inputs"]) == {"prepare", "train", "train_full"}
    # The base is prompted in its own chat format (evaluate.base_prompt: plain), the others in s1's.
    assert m["extra"]["prompt"] == {"base": "plain", "lora": "think", "full": "think"}
    assert evaluate.run(cfg)["finished_at"] == m["finished_at"]  # done: skipped

    m = ablate.run(cfg)
    st = run_dir / "ablate"
    comps = pd.read_parquet(st / "kl_components.parquet")
    assert len(comps) == 14 and comps["column"].tolist()[:2] == ["L00_q_proj", "L00_k_proj"]
    assert set(comps["kind"]) == {"attn", "mlp"} and (comps["kl_mean"] > 0).all()
    assert (comps["n_tokens"] == comps["n_tokens"].iloc[0]).all() and comps["n_docs"].iloc[0] == 8
    layers = pd.read_parquet(st / "kl_layers.parquet")
    assert layers["layer"].tolist() == [0, 1] and (layers["kl_mean"] > 0).all()
    groups = pd.read_parquet(st / "groups.parquet")
    assert sorted(groups["group"]) == ["attn", "mlp"]
    assert set(groups["benchmark"]) == {"arith-heldout"} and (groups["n_problems"] == 16).all()
    assert (st / "adapters" / "mlp" / "adapter_model.safetensors").exists()
    t2 = (st / "table2.md").read_text()
    assert "LoRA (attn-ablated)" in t2 and "LoRA (mlp-ablated)" in t2
    abl_samples = pd.read_parquet(st / "samples.parquet")
    assert set(abl_samples["variant"]) == {"attn_ablated", "mlp_ablated"}
    assert set(abl_samples["lora_mode"]) == {"peft"}
    assert m["rows"]["kl_components"] == 14 and set(m["inputs"]) == {"prepare", "train", "evaluate"}
    assert ablate.run(cfg)["finished_at"] == m["finished_at"]


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_evaluate_stage_with_vllm_lora_request(tiny_cfg, tmp_path, ray_session):
    """vLLM inside a Ray Data actor, one engine serving base and the adapter as a LoRARequest."""
    from rank1_core.models import resolve_model_dir
    from ray_jobs import prepare

    cfg = tiny_cfg(*VLLM_TINY, "evaluate.backend=vllm", "evaluate.variants=[base, lora]", "evaluate.limit=6",
                   run_dir=tmp_path / "run")
    prepare.run(cfg)
    add_trained_stages(tmp_path / "run", resolve_model_dir(cfg.model))
    m = evaluate.run(cfg)
    samples, _ = check_outputs(tmp_path / "run", ["base", "lora"], n_problems=6)
    assert set(samples["backend"]) == {"vllm"}
    assert m["extra"]["lora_mode"] == {"base": None, "lora": "lora_request"}
