"""sae: a cross-layer BatchTopK SAE over the whole adapter state (Ray Data into Ray Train).

    python -m ray_jobs.sae --config configs/demo.yaml
    python -m ray_jobs.sae --config configs/tiny.yaml sae.num_workers=2 sae.batch_size=512

The driver checks the extract stage's activation Parquet against its component catalogue
and fits the input normalisation on the first `sae.norm_tokens` tokens. `ray_jobs.harness.fit`
then trains `rank1_core.sae.job` on `sae.num_workers` Ray Train workers: each streams its shard of a Ray Data dataset over the
activation Parquet (`iter_torch_batches` with a seeded local shuffle buffer), trains with
gradients averaged across workers, and reports a checkpoint every `sae.checkpoint_every`
steps. After training every worker encodes its share of the files (every token, the
inference threshold) into `features/`, and rank 0 writes the rest. Leaves in the stage folder:

- `cfg.json`, `sae.safetensors`: the SAE (`rank1_core.sae.BatchTopKSAE.load(dir)`).
- `metrics.parquet`: per step: step, tokens, loss, mse, aux_loss, fvu, l0, dead_fraction, lr, threshold;
  `train_state.json`: where training ended.
- `latents.parquet`: feature, name (F00000), live, dead_in_training, count, freq, mean_act,
  max_act, dec_norm_<kind> (decoder norm over each component kind's columns).
- `features/part-*.parquet`: doc_id int64, pos int32, feature int32, value float32; one row
  per (token, live feature) that fired. Dead latents never appear.
- `summary.json` (also in the manifest's `extra`): fvu, fve, fvu_raw, nmse, l0,
  dead_fraction, live_features, ...
- `checkpoints/ray_train/`: Ray Train checkpoints; a crashed stage run again with the same
  config resumes from the last one.
"""

from __future__ import annotations

import json

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli

STAGE = "sae"


def run(cfg: Config, force: bool = False) -> dict:
    from dataclasses import asdict

    sc = cfg.sae

    def body(sr):
        import ray.data
        from ray.train import DataConfig

        from rank1_core.sae import SAEInputError, StageInputs, plan_steps
        from ray_jobs.common import ensure_ray
        from ray_jobs.harness import fit

        stage = sr.stage
        extract = stage.run.stage("extract")
        with sr.timed("check_inputs"):
            inputs = StageInputs.from_extract(extract.fs, extract.path())
        if sc.loader == "pyarrow" and sc.num_workers > len(inputs.files):
            raise SAEInputError(f"sae.num_workers ({sc.num_workers}) exceeds the {len(inputs.files)} activation "
                                "files: with sae.loader pyarrow every worker trains on whole files (use ray_data)")
        spe, total = plan_steps(sc, inputs.tokens,
                                inputs.shard_tokens(sc.num_workers) if sc.loader == "pyarrow" else None)
        with sr.timed("fit_normalization"):
            norm = inputs.fit_normalization(sc)
        print(f"[sae] {inputs.tokens} tokens x {len(inputs.columns)} components -> "
              f"{len(inputs.columns) * sc.expansion} latents, k={sc.k}; {total} steps of {sc.batch_size} tokens "
              f"({sc.normalize} normalisation from {norm.tokens} tokens)", flush=True)
        if stage.exists("features"):
            stage.fs.delete_dir(stage.path("features"))
        stage.fs.create_dir(stage.path("features"), recursive=True)

        ensure_ray(cfg)
        data = {}
        if sc.loader == "ray_data":
            data["datasets"] = {"train": ray.data.read_parquet(inputs.files, filesystem=extract.fs,
                                                               columns=["doc_id", "pos", *inputs.columns])}
            ingest = DataConfig.default_ingest_options()
            ingest.preserve_order = True  # with the seeded local shuffle: the same batches on every run
            data["dataset_config"] = DataConfig(datasets_to_split=["train"], execution_options=ingest)
        args = {"sae": asdict(sc), "columns": inputs.columns, "kinds": inputs.kinds, "files": inputs.files,
                "norm": norm.to_dict(), "seed": cfg.run.seed, "total_steps": total, "steps_per_epoch": spe,
                "run_uri": stage.run.uri_of(stage.run.root)}
        with sr.timed("fit_and_encode"):
            fit(sr, cfg, sc, "rank1_core.sae:job", args, **data)
        summary = json.loads(stage.read_text("summary.json"))
        sr.rows.update({"tokens": summary["tokens"], "latents": summary["latents"],
                        "live_features": summary["live_features"], "feature_rows": summary["feature_rows"],
                        "steps": summary["train_steps"]})
        sr.extra.update(summary)
        print(f"[sae] FVU {summary['fvu']:.4f} (FVE {summary['fve']:.4f}), NMSE {summary['nmse']:.4f}, "
              f"L0 {summary['l0']:.2f}, live {summary['live_features']}/{summary['latents']} "
              f"(dead fraction {summary['dead_fraction']:.3f})", flush=True)

    return execute(cfg, STAGE, body, force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
