"""transcoder: transcoder adapters on Ray Train (a second lens on what fine-tuning changed).

    python -m ray_jobs.transcoder --config configs/demo.yaml
    python -m ray_jobs.transcoder --config configs/tiny.yaml transcoder.num_workers=2 transcoder.cpus_per_worker=1

A `TorchTrainer` runs `rank1_core.transcoder.train_loop` on `transcoder.num_workers` workers
(DDP over gloo on CPU / nccl on GPU): the frozen base model (model.name) with a sparse branch
per MLP layer, trained on the training traces of `prepare/tokens` so that it matches the
frozen target (`transcoder.target`: the train_full stage's model, or any model directory of
the same architecture). At the end rank 0 measures faithfulness on the held-out traces.
Leaves in the stage folder:

- `adapter/`: `cfg.json` + `transcoder.safetensors` (`TranscoderAdapter.load(dir)`;
  `.install(model)` puts it on a base model).
- `metrics.parquet`: step, epoch, loss, kl, recon (mean per-layer FVU), sparsity, l0, fve,
  lr, grad_norm, tokens, tokens_per_s, wall.
- `faithfulness.json` (also the manifest's `extra.faithfulness`): kl_adapted = KL(target ||
  base + adapters), kl_base = KL(target || base), kl_closed, cross-entropies, top-1
  agreement, mean explained variance of the MLP difference, L0, live latents.
- `faithfulness_layers.parquet`: per layer: fve_difference, fvu_difference, diff_norm,
  adapter_norm, l0, live_latents.
- `checkpoints/ray_train/`: Ray Train checkpoints; a crashed stage rerun with the same config
  resumes from the last one.

The stage hash covers `model` and `transcoder` without its `extract`, `hesitation` and
`eval` subsections (so tuning those never retrains), chained with prepare's (and
train_full's when it is the target); this stage's config.yaml shows those subsections at
their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from rank1_core.config import Config, ConfigError, TranscoderConfig
from ray_jobs.common import execute, stage_cli

STAGE = "transcoder"


def hash_view(cfg: Config, keep: tuple[str, ...] = ()) -> Config:
    """`cfg` with the transcoder subsections not in `keep` at their defaults: what a stage's
    hash (and its config.yaml) covers."""
    from rank1_core.config import TRANSCODER_SUBSECTIONS

    defaults = TranscoderConfig()
    tc = dataclasses.replace(cfg.transcoder, **{s: getattr(defaults, s) for s in TRANSCODER_SUBSECTIONS
                                                if s not in keep})
    return dataclasses.replace(cfg, transcoder=tc)


def target_spec(cfg: Config) -> tuple[str, tuple[str, ...]]:
    """(target model directory or URI, upstream stages) of `transcoder.target`."""
    from rank1_core.config import ModelConfig
    from rank1_core.models import ModelNotAvailable, resolve_model_dir
    from rank1_core.rundir import RunDir

    t = cfg.transcoder.target
    if t == "train_full":
        return RunDir(cfg.run.dir).stage("train_full").uri_of("model"), ("prepare", "train_full")
    try:
        return str(resolve_model_dir(ModelConfig(name=t, tiny=cfg.model.tiny))), ("prepare",)
    except ModelNotAvailable as e:
        raise ConfigError(f"transcoder.target {t!r}: {e}") from None


def validate(cfg: Config) -> int:
    """Check transcoder.layers and k against the base model's shape (no weights); returns the
    layer count."""
    from rank1_core.models import meta_model

    hf = meta_model(cfg.model).config
    n, d = int(hf.num_hidden_layers), int(hf.hidden_size)
    tc = cfg.transcoder
    bad = [i for i in (tc.layers or []) if i >= n]
    if bad:
        raise ConfigError(f"transcoder.layers: layer {bad[0]} is out of range: model {cfg.model.name!r} has {n} "
                          f"layers (valid: 0..{n - 1})")
    if tc.k > tc.expansion * d:
        raise ConfigError(f"transcoder.k ({tc.k}) exceeds the latents per layer (expansion {tc.expansion} x hidden "
                          f"{d} = {tc.expansion * d})")
    return n


def check_target_shape(base_dir: str, target_dir: str) -> None:
    """Base and target must share layers, hidden size and vocabulary (config.json only)."""
    def shape(p: str) -> tuple:
        c = json.loads((Path(p) / "config.json").read_text())
        c = c.get("text_config", c)
        return c.get("num_hidden_layers"), c.get("hidden_size"), c.get("intermediate_size"), c.get("vocab_size")

    if "://" in target_dir or not (Path(target_dir) / "config.json").exists():
        return  # checked again by the workers once loaded
    b, t = shape(base_dir), shape(target_dir)
    if b != t:
        raise ConfigError(f"transcoder.target {target_dir} does not match the base model {base_dir}: (layers, hidden, "
                          f"intermediate, vocab) = {t} vs {b}")


def transcoder_worker(lc: dict) -> None:
    """Body of every Ray Train worker."""
    import ray.train
    import torch
    from ray.experimental.tqdm_ray import tqdm
    from ray.train import Checkpoint

    from rank1_core.config import config_from_dict
    from rank1_core.generation import local_dir
    from rank1_core.models import load_model, load_tokenizer
    from rank1_core.rundir import resolve_filesystem
    from rank1_core.train import load_docs
    from rank1_core.transcoder import (STATE_FILE, TranscoderAdapter, TranscoderObjective, TranscoderTrainer,
                                       faithfulness, fit_layer_stats, total_steps, train_loop)

    cfg = config_from_dict(lc["config"])
    tc = cfg.transcoder
    from ray_jobs.common import quiet_train_worker

    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.gpus_per_worker:
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(tc.cpus_per_worker)
    fs, path = resolve_filesystem(lc["tokens"])
    train_docs, held = load_docs(fs, path, "train"), load_docs(fs, path, "heldout")
    if tc.heldout_docs:
        held = held[:tc.heldout_docs]
    tok = load_tokenizer(lc["base_dir"])
    pad = tok.pad_token_id
    tmp_models = tempfile.mkdtemp(prefix="rank1-tc-target-")
    base = load_model(lc["base_dir"])
    target = load_model(local_dir(lc["target_dir"], tmp_models))
    meta = {"base_model": cfg.model.name, "target": tc.target, "target_dir": lc["target_dir"], "recon": tc.recon,
            "positions": tc.positions, "expansion": tc.expansion}
    adapter = TranscoderAdapter.for_model(base, tc, seed=cfg.run.seed, meta=meta)
    obj = TranscoderObjective(base, target, adapter, tc)
    trainer = TranscoderTrainer(obj, tc, total_steps(train_docs, tc, cfg.run.seed, world), rank, world, device)

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = trainer.load(Path(d))
            if state.finished:  # the run had finished: hand its export back again
                if rank == 0:
                    with tempfile.TemporaryDirectory() as t:
                        shutil.copytree(d, t, dirs_exist_ok=True)
                        ray.train.report({"step": state.step, "finished": True}, checkpoint=Checkpoint.from_directory(t))
                else:
                    ray.train.report({"step": state.step, "finished": True})
                return
        state.resumed_from.append(state.step)
        if rank == 0:
            print(f"[{STAGE}] resumed from the checkpoint of step {state.step}", flush=True)
    else:
        # Same data and weights on every rank, so every rank fits the same statistics.
        adapter.set_layer_stats(fit_layer_stats(base, obj.inst, train_docs, pad, tc.init_tokens, tc.batch_tokens,
                                                target=target))

    def report(metrics: dict, st, save: bool) -> None:
        m = {k: v for k, v in metrics.items() if v == v}
        if not save:
            ray.train.report(m)
            return
        with tempfile.TemporaryDirectory() as t:
            trainer.save(Path(t), st)
            ray.train.report(m, checkpoint=Checkpoint.from_directory(t) if rank == 0 else None)
        ray.train.get_all_reported_checkpoints(timeout_s=120)

    state = train_loop(trainer, train_docs, tc, cfg.run.seed, pad, state, report=report, progress=tqdm)
    state.finished = True
    with tempfile.TemporaryDirectory() as t:
        if rank == 0:
            summary, layers = faithfulness(base, target, obj.inst, held, pad, tc.batch_tokens, tc.positions,
                                           autocast=tc.precision == "bf16_autocast")
            import pyarrow.parquet as pq

            trainer.save(Path(t), state)
            (Path(t) / "faithfulness.json").write_text(json.dumps(summary, indent=2) + "\n")
            pq.write_table(layers, str(Path(t) / "faithfulness_layers.parquet"))
            assert (Path(t) / STATE_FILE).exists()
        ray.train.report({"step": state.step, "finished": True},
                         checkpoint=Checkpoint.from_directory(t) if rank == 0 else None)
    shutil.rmtree(tmp_models, ignore_errors=True)


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.models import resolve_model_dir

    tc = cfg.transcoder
    validate(cfg)
    base_dir = str(resolve_model_dir(cfg.model))
    target_dir, upstream = target_spec(cfg)
    check_target_shape(base_dir, target_dir)

    def body(sr):
        import pyarrow.parquet as pq

        from rank1_core.rundir import RunDir
        from rank1_core.transcoder import STATE_FILE, TrainState, TranscoderError, metrics_table
        from ray_jobs.common import ensure_ray, torch_trainer

        ensure_ray(cfg)
        stage = sr.stage
        tokens = RunDir(cfg.run.dir).stage("prepare").uri_of("tokens")
        lc = {"config": cfg.to_dict(), "base_dir": base_dir, "target_dir": target_dir, "tokens": tokens}
        trainer = torch_trainer(transcoder_worker, lc, stage, num_workers=tc.num_workers,
                                cpus_per_worker=tc.cpus_per_worker, gpus_per_worker=tc.gpus_per_worker,
                                max_failures=tc.max_failures, keep_checkpoints=tc.keep_checkpoints)
        with sr.timed("fit"):
            result = trainer.fit()
        if result.checkpoint is None:
            raise TranscoderError(f"[{STAGE}] Ray Train finished without a checkpoint")
        with result.checkpoint.as_directory() as d:
            d = Path(d)
            state = TrainState.from_json((d / STATE_FILE).read_text())
            if not state.finished or not (d / "faithfulness.json").exists():
                raise TranscoderError(f"[{STAGE}] the last checkpoint {d} is not a finished run")
            if stage.exists("adapter"):
                stage.fs.delete_dir(stage.path("adapter"))
            stage.upload_dir(d / "adapter", "adapter")
            faith = json.loads((d / "faithfulness.json").read_text())
            stage.write_json("faithfulness.json", faith)
            layers = pq.read_table(str(d / "faithfulness_layers.parquet"))
        pq.write_table(layers, stage.path("faithfulness_layers.parquet"), filesystem=stage.fs)
        pq.write_table(metrics_table(state.history), stage.path("metrics.parquet"), filesystem=stage.fs)
        steps = state.history
        sr.rows.update({"steps": state.step, "tokens": state.tokens, "layers": layers.num_rows,
                        "latents": int(faith["latents"])})
        sr.extra.update({"faithfulness": faith, "workers": tc.num_workers, "resumed_from": state.resumed_from,
                         "target_dir": target_dir,
                         "mean_tokens_per_s": (sum(r["tokens"] for r in steps) /
                                               sum(r["tokens"] / r["tokens_per_s"] for r in steps)) if steps else None})
        print(f"[{STAGE}] {state.step} steps, {state.tokens} tokens; held-out KL to the target "
              f"{faith['kl_base']:.4f} (base) -> {faith['kl_adapted']:.4f} (adapters; {100 * faith['kl_closed']:.1f}% "
              f"closed); MLP difference explained {faith['fve_difference_mean']:.3f}; L0 {faith['l0_per_layer']:.1f} "
              f"per layer", flush=True)

    return execute(hash_view(cfg), STAGE, body, upstream=upstream, force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
