"""train: the rank-1 LoRA on Ray Train (`train_full` runs the same with mode full).

    python -m ray_jobs.train --config configs/demo.yaml
    python -m ray_jobs.train --config configs/tiny.yaml train.num_workers=2 train.cpus_per_worker=1
    python -m ray_jobs.train --config configs/tiny.yaml train.strategy=deepspeed_zero3

`ray_jobs.harness.fit` trains `rank1_core.train.job` on `train.num_workers` Ray Train workers
(DDP over gloo on CPU / nccl on GPU, or DeepSpeed ZeRO-2/3). Leaves in the stage folder:

- `adapter/` (train): peft adapter (`adapter_config.json`, `adapter_model.safetensors`);
  `model/` (train_full): a Hugging Face model directory with the tokenizer.
- `metrics.parquet`: step, epoch, loss, lr, tokens, tokens_per_s, grad_norm, heldout_loss
  (where evaluated; step 0 holds the initial one), wall; `train_state.json`: where training
  ended (steps, tokens, resumed_from, the same rows).
- with `train.adapter_path` (an adapter made elsewhere, any rank) nothing is trained:
  `adapter/` is that adapter, checked against the model, and the manifest records its
  sha256, rank, modules and layers.
- `checkpoints/ray_train/`: Ray Train checkpoints. A worker that dies is replaced and the
  run resumes from the last checkpoint (`train.max_failures`); a crashed stage run again
  with the same config resumes from there too.

Test hook: $RANK1_TRAIN_FAIL_AT_STEP (see `ray_jobs.harness`).
"""

from __future__ import annotations

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli
from ray_jobs.harness import FAIL_ENV, training_body  # noqa: F401 (FAIL_ENV: the test hook, for tests)

STAGE = "train"


def use_existing_adapter(cfg: Config, force: bool = False) -> dict:
    """`train.adapter_path`: check a peft adapter made elsewhere against the model, copy it to
    train/adapter and record its hash, instead of training (any rank; see rank1_core.lora)."""
    from rank1_core.lora import adapter_sha256, read_external_adapter
    from rank1_core.rundir import RunDir

    spec = read_external_adapter(cfg.train.adapter_path, cfg.model)  # fails before any stage I/O
    stage = RunDir(cfg.run.dir).stage(STAGE)
    if stage.is_done() and not force and stage.exists("adapter", "adapter_model.safetensors"):
        # Same config, other files at the same path: redo (the config hash cannot see file contents).
        with stage.local_copy("adapter") as have:
            force = adapter_sha256(have) != spec.sha256

    def body(sr):
        if stage.exists("adapter"):
            stage.fs.delete_dir(stage.path("adapter"))
        stage.upload_dir(spec.path, "adapter")
        sr.rows["components"] = len(spec.components)
        sr.extra.update({"mode": "adapter_path", "adapter_path": str(spec.path), "adapter_sha256": spec.sha256,
                         "rank": spec.rank, "alpha": spec.alpha, "use_rslora": spec.use_rslora,
                         "modules": spec.modules, "layers": spec.layers})
        print(f"[{STAGE}] using the adapter at {spec.path} (rank {spec.rank}, {len(spec.components)} components, "
              f"sha256 {spec.sha256[:12]}) as {stage.uri_of('adapter')}", flush=True)

    return execute(cfg, STAGE, body, force=force)


def run(cfg: Config, force: bool = False) -> dict:
    if cfg.train.adapter_path:
        return use_existing_adapter(cfg, force)
    return execute(cfg, STAGE, training_body(cfg, "lora"), force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
