"""sae: a cross-layer BatchTopK SAE over the whole adapter state (Ray Data into Ray Train).

    python -m ray_jobs.sae --config configs/demo.yaml
    python -m ray_jobs.sae --config configs/tiny.yaml sae.num_workers=2 sae.batch_size=512

The driver checks the extract stage's activation Parquet against its component catalogue
and fits the input normalisation on the first `sae.norm_tokens` tokens. A `TorchTrainer`
then runs `sae.num_workers` workers: each streams its shard of a Ray Data dataset over the
activation Parquet (`iter_torch_batches` with a seeded local shuffle buffer), trains with
gradients averaged across workers, and reports a checkpoint every `sae.checkpoint_every`
steps. After training every worker encodes its share of the files (every token, the
inference threshold) into `features/`, and rank 0 writes the rest. Leaves in the stage folder:

- `cfg.json`, `sae.safetensors`: the SAE (`rank1_core.sae.BatchTopKSAE.load(dir)`).
- `metrics.parquet`: per step: step, tokens, loss, mse, aux_loss, fvu, l0, dead_fraction, lr, threshold.
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
import tempfile

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli

STAGE = "sae"


def sae_worker(lc: dict) -> None:
    """Body of every Ray Train worker: train (resuming from a checkpoint), then encode."""
    import pyarrow.fs as pafs
    import ray.train
    import torch
    from ray.train import Checkpoint

    from rank1_core.config import SAEConfig
    from ray_jobs.progress import Progress
    from rank1_core.rundir import resolve_filesystem
    from rank1_core.sae import (BatchTopKSAE, ColumnCollate, FeatureWriter, Normalization, SAETrainer,
                                encode_batches, iter_activation_batches, run_training, write_outputs)

    cfg = SAEConfig(**lc["sae"])
    from ray_jobs.common import quiet_train_worker

    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.use_gpu:
        device = ray.train.torch.get_device()
    else:
        device = "cpu"
        torch.set_num_threads(cfg.cpus_per_worker)
    norm = Normalization.from_dict(lc["norm"])
    sae = BatchTopKSAE.from_config(cfg, lc["columns"], seed=lc["seed"])
    sae.set_normalization(norm)
    trainer = SAETrainer(sae, cfg, lc["total_steps"], device=str(device))
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load_checkpoint(d)
        if rank == 0:
            print(f"[sae] resumed from the checkpoint of step {trainer.step}", flush=True)
    tr_total = trainer.total_steps - trainer.step  # what this attempt has left to do

    fs, _ = resolve_filesystem(lc["run_uri"])
    mine = lc["files"][rank::world]  # this worker's files (pyarrow loader, and encoding)
    if cfg.loader == "ray_data":
        shard = ray.train.get_dataset_shard("train")
        collate = ColumnCollate(lc["columns"])
        shuffle = cfg.shuffle_buffer > 0

        def epoch_batches(epoch: int):
            return shard.iter_torch_batches(
                batch_size=cfg.batch_size // world, collate_fn=collate, drop_last=True,
                local_shuffle_buffer_size=max(cfg.shuffle_buffer, cfg.batch_size // world) if shuffle else None,
                local_shuffle_seed=lc["seed"] * 1000 + epoch if shuffle else None)
    else:
        def epoch_batches(epoch: int):
            return iter_activation_batches(fs, mine, lc["columns"], cfg.batch_size // world,
                                           shuffle_buffer=cfg.shuffle_buffer, seed=(lc["seed"], epoch, rank),
                                           drop_last=True)

    # Rank 0 feeds the dashboard's metrics. No terminal bar: a tqdm_ray bar closed here was
    # redrawn by the driver for the rest of the pipeline (seen in the demo, Ray 2.60); the
    # stage prints its summary line at the end instead.
    progress = Progress("sae", total=tr_total, main="steps", unit="step", bar=False) if rank == 0 else None
    last_tokens = [trainer.tokens]

    def on_step(tr: SAETrainer, m: dict) -> None:
        if progress is not None:
            progress.update(1, tokens=m["tokens"] - last_tokens[0])
            progress.set(loss=m["loss"], lr=m["lr"], fvu=m["fvu"], l0=m["l0"], dead_fraction=m["dead_fraction"])
            last_tokens[0] = m["tokens"]
        if tr.step % cfg.checkpoint_every and tr.step != tr.total_steps:
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                tr.save_checkpoint(tmp)
            ray.train.report(m, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)

    run_training(trainer, epoch_batches, lc["steps_per_epoch"], on_step)
    if progress is not None:
        progress.close()

    # Encode every token: files are dealt out by rank (Ray Train's equal split would drop rows).
    dead = trainer.dead_mask().cpu().numpy()
    writer = FeatureWriter(fs, lc["features_dir"], tag=f"r{rank:03d}")
    for info in fs.get_file_info(pafs.FileSelector(lc["features_dir"], allow_not_found=True)):
        if info.base_name.startswith(f"part-r{rank:03d}-"):
            fs.delete_file(info.path)
    stats = encode_batches(sae, iter_activation_batches(fs, mine, lc["columns"], cfg.encode_batch_size), ~dead, writer)
    stats.all_reduce()
    if rank == 0:
        write_outputs(fs, lc["stage_path"], sae, trainer, stats, dead, lc["kinds"], cfg, norm)


def run(cfg: Config, force: bool = False) -> dict:
    from dataclasses import asdict

    sc = cfg.sae

    def body(sr):
        import ray.data
        from ray.train import DataConfig

        from rank1_core.sae import SAEInputError, StageInputs, plan_steps
        from ray_jobs.common import ensure_ray, torch_trainer

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
        lc = {"sae": asdict(sc), "columns": inputs.columns, "kinds": inputs.kinds, "files": inputs.files,
              "norm": norm.to_dict(), "seed": cfg.run.seed, "total_steps": total, "steps_per_epoch": spe,
              "run_uri": stage.run.uri_of(stage.run.root), "stage_path": stage.path(), "features_dir": stage.path("features")}
        trainer = torch_trainer(sae_worker, lc, stage, num_workers=sc.num_workers,
                                cpus_per_worker=sc.cpus_per_worker, gpus_per_worker=1 if sc.use_gpu else 0,
                                max_failures=sc.max_failures, keep_checkpoints=sc.keep_checkpoints, **data)
        with sr.timed("fit_and_encode"):
            trainer.fit()
        summary = json.loads(stage.read_text("summary.json"))
        sr.rows.update({"tokens": summary["tokens"], "latents": summary["latents"],
                        "live_features": summary["live_features"], "feature_rows": summary["feature_rows"],
                        "steps": summary["train_steps"]})
        sr.extra.update(summary)
        print(f"[sae] FVU {summary['fvu']:.4f} (FVE {summary['fve']:.4f}), NMSE {summary['nmse']:.4f}, "
              f"L0 {summary['l0']:.2f}, live {summary['live_features']}/{summary['latents']} "
              f"(dead fraction {summary['dead_fraction']:.3f})", flush=True)

    return execute(cfg, STAGE, body, upstream=("extract",), force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
