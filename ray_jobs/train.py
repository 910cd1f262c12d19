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
from ray_jobs.harness import FAIL_ENV  # noqa: F401 (the test hook, for tests)

STAGE = "train"


def stage_name(mode: str) -> str:
    return STAGE if mode == "lora" else "train_full"


def run_training(cfg: Config, mode: str, force: bool = False) -> dict:
    """Run the `train` (mode lora) or `train_full` (mode full) stage."""
    from rank1_core.lora import check_adapter, validate_for_model
    from rank1_core.models import resolve_model_dir
    from rank1_core.config import ConfigError
    from rank1_core.train import TrainError, deepspeed_config, for_mode, settings

    name = stage_name(mode)
    tc = for_mode(cfg.train, mode)
    st = settings(tc, mode)
    # Everything that can be wrong with the config fails here, before Ray or any stage I/O.
    num_layers = validate_for_model(tc, cfg.model, mode)
    if st.strategy != "ddp":
        try:
            deepspeed_config(tc, st.strategy, tc.num_workers)
        except TrainError as e:
            raise ConfigError(str(e)) from None
    model_dir = resolve_model_dir(cfg.model)

    def body(sr):
        from rank1_core.rundir import RunDir
        from ray_jobs.harness import fit

        stage = sr.stage
        tokens = RunDir(cfg.run.dir).stage("prepare").uri_of("tokens")
        args = {"config": cfg.to_dict(), "mode": mode, "model_dir": str(model_dir), "num_layers": num_layers,
                "tokens": tokens}
        state = fit(sr, cfg, tc, "rank1_core.train:job", args)
        out = "adapter" if mode == "lora" else "model"
        if mode == "lora":
            with stage.local_copy(out) as export:
                chk = check_adapter(export, tc.lora, num_layers)  # loud failure: empty / zero lora_B
            sr.rows["components"] = len(chk.components)
            sr.extra["min_lora_b_norm"] = chk.min_b_norm
        elif not stage.exists(out, "config.json"):
            raise TrainError(f"[{name}] the exported model in {stage.uri_of(out)} has no config.json")
        steps = [r for r in state.history if r["step"] > 0]
        held = [r["heldout_loss"] for r in state.history if r["heldout_loss"] == r["heldout_loss"]]
        sr.rows["steps"] = state.step
        sr.rows["tokens"] = state.tokens
        sr.extra.update({
            "mode": mode, "strategy": st.strategy, "precision": tc.precision, "workers": tc.num_workers,
            "resumed_from": state.resumed_from,
            "final_loss": steps[-1]["loss"] if steps else None,
            "initial_heldout_loss": held[0] if held else None, "final_heldout_loss": held[-1] if held else None,
            "mean_tokens_per_s": (sum(r["tokens"] for r in steps) / sum(r["tokens"] / r["tokens_per_s"] for r in steps)
                                  if steps else None),
        })
        print(f"[{name}] {state.step} steps, {state.tokens} tokens; held-out loss "
              f"{sr.extra['initial_heldout_loss']:.4f} -> {sr.extra['final_heldout_loss']:.4f}; "
              f"{out} in {stage.uri_of(out)}", flush=True)

    return execute(cfg, name, body, upstream=("prepare",), force=force, resumable=True)


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

    return execute(cfg, STAGE, body, upstream=(), force=force)


def run(cfg: Config, force: bool = False) -> dict:
    if cfg.train.adapter_path:
        return use_existing_adapter(cfg, force)
    return run_training(cfg, "lora", force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
