"""The transcoder stages on Ray (slow tier): the whole lens end to end on the tiny config with
its full fine-tune as the target, two DDP workers, and config errors caught before any work."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from rank1_core.config import ConfigError

# Small enough for CI: a few optimizer steps, 4 held-out traces, 4 problems of 8 new tokens.
QUICK = ("train.max_steps=2", "transcoder.max_steps=4", "transcoder.heldout_docs=4", "evaluate.limit=4",
         "evaluate.max_new_tokens=8", "transcoder_eval.batch_size=8")


def perturbed_target(model_dir, dest, scale: float = 0.2):
    """A stand-in fine-tune: the tiny model with every MLP's down_proj perturbed."""
    from rank1_core.models import load_model, load_tokenizer
    from rank1_core.transcoder import decoder_layers

    m = load_model(model_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in decoder_layers(m):
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=g) * scale)
    m.save_pretrained(dest)
    load_tokenizer(model_dir).save_pretrained(dest)
    return dest


@pytest.mark.slow
def test_transcoder_lens_end_to_end_on_the_tiny_full_fine_tune(tiny_cfg, prepared_run, copy_run, ray_session):
    from rank1_core import sql as S
    from rank1_core.config import TopkConfig
    from rank1_core.rundir import RunDir
    from rank1_core.topk import Source, rank_source
    from rank1_core.transcoder import TranscoderAdapter, feature_name
    from ray_jobs import train_full, transcoder, transcoder_eval, transcoder_extract

    run_dir = copy_run(prepared_run)
    cfg = tiny_cfg(*QUICK, run_dir=run_dir)
    with pytest.raises(Exception, match="train_full"):  # the target stage must be done first
        transcoder.run(cfg)
    train_full.run(cfg)
    m = transcoder.run(cfg)
    st = run_dir / "transcoder"
    faith = json.loads((st / "faithfulness.json").read_text())
    assert m["rows"]["steps"] == 4 and m["extra"]["faithfulness"] == faith
    assert m["inputs"].keys() == {"prepare", "train_full"}
    assert faith["kl_base"] > 0 and faith["kl_adapted"] >= 0 and faith["latents"] == 2 * 128
    layers = pq.read_table(st / "faithfulness_layers.parquet").to_pylist()
    assert [r["layer"] for r in layers] == [0, 1] and all(0 < r["l0"] <= 8 for r in layers)
    metrics = pq.read_table(st / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == [1, 2, 3, 4] and all(r["kl"] >= 0 for r in metrics)
    a = TranscoderAdapter.load(str(st / "adapter"))
    assert a.layers == [0, 1] and a.k == 8 and a.meta["target"] == "train_full"
    assert any(float(a.layer(l).W_dec.detach().abs().sum()) > 0 for l in a.layers)  # trained, not the zero init

    mx = transcoder_extract.run(cfg)
    ex = run_dir / "transcoder_extract"
    tokens = sum(pq.ParquetFile(f).metadata.num_rows for f in (ex / "tokens").glob("*.parquet"))
    prep = pq.read_table(run_dir / "prepare" / "tokens", columns=["num_tokens"]).column("num_tokens")
    assert tokens == mx["rows"]["tokens"] == sum(prep.to_pylist())
    feats = pq.read_table(ex / "features")
    assert feats.schema.names == ["doc_id", "pos", "feature", "value"]
    assert str(feats.schema.field("feature").type) == "int32" and str(feats.schema.field("value").type) == "float"
    assert feats.num_rows == mx["rows"]["feature_rows"] and min(feats.column("value").to_pylist()) > 0
    lat = pq.read_table(ex / "latents.parquet")
    assert lat.num_rows == 256 and set(lat.column_names) >= {"feature", "name", "live", "freq", "max_act", "layer"}
    hes = pq.read_table(ex / "hesitation_features.parquet")
    assert {"share", "selected", "top_tokens"} <= set(hes.column_names)

    # The features go through topk's sparse path and rank1 sql's views like SAE features.
    con = S.connect(None)
    views = S.register_views(con, RunDir(str(run_dir)), ["transcoder_features", "transcoder_latents"])
    assert views.keys() == {"transcoder_features", "transcoder_latents"}
    con.execute("CREATE TABLE acc_summary (feature VARCHAR, doc_id BIGINT, n BIGINT, sum DOUBLE, sumsq DOUBLE, "
                "hi FLOAT, lo FLOAT, n_active BIGINT)")
    con.execute("CREATE TABLE acc_hits (feature VARCHAR, sign VARCHAR, rank INTEGER, doc_id BIGINT, pos INTEGER, "
                "value FLOAT, window_pos INTEGER[], window_values FLOAT[])")
    rank_source(con, Source("transcoder", "transcoder_features", "sparse"), TopkConfig(k=4), log=lambda m: None)
    top = con.execute("SELECT feature, max(value) FROM acc_hits WHERE sign = 'pos' AND rank = 1 GROUP BY feature").fetchall()
    live = {r["feature"]: r["max_act"] for r in lat.to_pylist() if r["live"]}
    assert {f for f, _ in top} == {feature_name(f) for f in live}
    assert all(v == pytest.approx(live[int(f[1:])]) for f, v in top)

    me = transcoder_eval.run(cfg)
    ev = run_dir / "transcoder_eval"
    summary = pq.read_table(ev / "summary.parquet").to_pandas()
    variants = list(dict.fromkeys(summary["variant"]))
    assert variants[:2] == ["base", "transcoder"] and variants[-1] == "full"
    assert {"pass1", "stderr", "mean_tokens", "mean_hesitations", "features_ablated"} <= set(summary.columns)
    if hes.to_pandas()["selected"].any():
        assert "transcoder_no_hesitation" in variants and "transcoder_random_ablated" in variants
    samples = pq.read_table(ev / "samples.parquet").to_pandas()
    assert len(samples) == 4 * len(variants) and (samples["n_tokens"] <= 8).all()
    for f in ("recovery.md", "hesitation.md", "faithfulness.md", "recovery.csv"):
        assert (ev / f).stat().st_size > 0
    assert "KL(target" in (ev / "faithfulness.md").read_text()
    assert me["inputs"].keys() == {"prepare", "transcoder", "transcoder_extract", "train_full"}

    # reference evaluate: base and full rescored from evaluate's samples of the same (first 2) problems
    ref = samples[samples["variant"].isin(["base", "full"])].drop(columns=["hesitations"])
    fake_evaluate_stage(run_dir, ref)
    cfg3 = tiny_cfg(*QUICK, "transcoder_eval.reference=evaluate", "transcoder_eval.limit=2", run_dir=run_dir)
    m3 = transcoder_eval.run(cfg3)
    assert m3["inputs"].keys() == {"prepare", "transcoder", "transcoder_extract", "evaluate"}
    rec = pq.read_table(ev / "summary.parquet").to_pandas()
    assert rec["variant"].iloc[0] == "transcoder" and set(rec["n_problems"]) == {2}
    import pandas as pd

    rc = pd.read_csv(ev / "recovery.csv")
    first = list(dict.fromkeys(ref[ref["variant"] == "base"]["problem_id"]))[:2]
    want = ref[(ref["variant"] == "base") & ref["problem_id"].isin(first)]["correct"].mean()
    assert rc["reference"].iloc[0] == "evaluate" and rc["base"].iloc[0] == pytest.approx(want)
    with pytest.raises(ConfigError, match="lacks 2 of this stage's 6 problems"):
        fake_evaluate_stage(run_dir, ref[ref["problem_id"].isin(list(dict.fromkeys(ref["problem_id"]))[:4])])
        transcoder_eval.run(tiny_cfg(*QUICK, "transcoder_eval.reference=evaluate", "transcoder_eval.limit=6",
                                     run_dir=run_dir))

    # Reruns skip; a change to the hesitation settings reruns extract and eval, never training.
    assert transcoder.run(cfg)["finished_at"] == m["finished_at"]
    cfg2 = tiny_cfg(*QUICK, "transcoder_extract.hesitation.min_share=0.9", run_dir=run_dir)
    assert transcoder.run(cfg2)["finished_at"] == m["finished_at"]
    assert transcoder_extract.run(cfg2)["finished_at"] != mx["finished_at"]


@pytest.mark.slow
def test_two_ddp_workers_and_any_model_dir_as_target(tiny_cfg, tiny_model_dir, prepared_run, copy_run, ray_session,
                                                     tmp_path):
    from rank1_core.transcoder import TranscoderAdapter
    from ray_jobs import transcoder

    run_dir = copy_run(prepared_run)
    target = perturbed_target(tiny_model_dir, tmp_path / "target")
    cfg = tiny_cfg("transcoder.num_workers=2", "transcoder.cpus_per_worker=1", "transcoder.max_steps=2",
                   "transcoder.heldout_docs=2", f"transcoder.target={target}", run_dir=run_dir)
    m = transcoder.run(cfg)
    assert m["extra"]["workers"] == 2 and m["rows"]["steps"] == 2 and m["inputs"].keys() == {"prepare"}
    a = TranscoderAdapter.load(str(run_dir / "transcoder" / "adapter"))
    assert a.meta["target_dir"] == str(target)
    assert m["extra"]["faithfulness"]["kl_base"] > 0


def test_bad_pairs_fail_before_any_work(tiny_cfg, tiny_model_dir, prepared_run, copy_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from rank1_core.models import load_tokenizer
    from ray_jobs import transcoder, transcoder_eval

    run_dir = copy_run(prepared_run)
    other = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    other.config.intermediate_size = 64
    small = AutoModelForCausalLM.from_config(other.config)
    small.save_pretrained(tmp_path / "other")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="does not match the base model"):
        transcoder.run(tiny_cfg(f"transcoder.target={tmp_path / 'other'}", run_dir=run_dir))
    with pytest.raises(ConfigError, match="transcoder.target 'no/such/dir/x'"):
        transcoder.run(tiny_cfg("transcoder.target=no/such/dir/x", run_dir=run_dir))
    with pytest.raises(ConfigError, match="layer 2 is out of range"):
        transcoder.run(tiny_cfg("transcoder.layers=[2]", run_dir=run_dir))
    with pytest.raises(ConfigError, match="set transcoder_eval.reference: generate"):
        transcoder_eval.run(tiny_cfg(f"transcoder.target={tmp_path / 'other'}", "transcoder_eval.reference=evaluate",
                                     run_dir=run_dir))
    assert not (run_dir / "transcoder").exists()


def fake_evaluate_stage(run_dir, samples):
    """An evaluate stage in its published layout, from samples of the base and target variants."""
    import pyarrow as pa

    from rank1_core.rundir import RunDir, run_stage

    def body(sr):
        pq.write_table(pa.Table.from_pandas(samples, preserve_index=False), sr.stage.path("samples.parquet"))

    run_stage(RunDir(str(run_dir)).stage("evaluate"), "test", "{}", body, log=lambda m: None)
