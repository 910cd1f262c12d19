"""train: the rank-1 LoRA on Ray Train (`train_full` runs the same with mode full).

    python -m ray_jobs.train --config configs/demo.yaml
    python -m ray_jobs.train --config configs/tiny.yaml train.num_workers=2 train.cpus_per_worker=1
    python -m ray_jobs.train --config configs/tiny.yaml train.strategy=deepspeed_zero3

A `TorchTrainer` runs `rank1_core.train.train_loop` on `train.num_workers` workers (DDP over
gloo on CPU / nccl on GPU, or DeepSpeed ZeRO-2/3). Leaves in the stage folder:

- `adapter/` (train): peft adapter (`adapter_config.json`, `adapter_model.safetensors`);
  `model/` (train_full): a Hugging Face model directory with the tokenizer.
- `metrics.parquet`: step, epoch, loss, lr, tokens, tokens_per_s, grad_norm, heldout_loss
  (where evaluated; step 0 holds the initial one), wall.
- `checkpoints/ray_train/`: Ray Train checkpoints. A worker that dies is replaced and the
  run resumes from the last checkpoint (`train.max_failures`); a crashed stage run again
  with the same config resumes from there too.

Test hook: with $RANK1_TRAIN_FAIL_AT_STEP="N:/path/marker", the rank-0 worker kills its own
process right after step N once (it creates the marker file), a real worker failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli

STAGE = "train"
FAIL_ENV = "RANK1_TRAIN_FAIL_AT_STEP"


def stage_name(mode: str) -> str:
    return STAGE if mode == "lora" else "train_full"


def _fail_hook(spec: str | None, rank: int):
    if not spec:
        return lambda state: None
    n, marker = spec.split(":", 1)

    def hook(state) -> None:
        if rank == 0 and state.step == int(n) and not os.path.exists(marker):
            Path(marker).write_text(f"killed rank 0 after step {n}\n")
            os._exit(17)  # a real crash of the worker process, not an exception

    return hook


def train_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker."""
    import ray.train
    import torch
    from ray.experimental.tqdm_ray import tqdm
    from ray.train import Checkpoint

    from rank1_core.config import config_from_dict
    from rank1_core.models import load_tokenizer
    from rank1_core.rundir import resolve_filesystem
    from ray_jobs.progress import Progress
    from rank1_core.train import (STATE_FILE, TrainState, build_model, deepspeed_config, load_checkpoint,
                                  for_mode, load_docs, make_engine, save_checkpoint, settings, total_steps,
                                  train_loop)

    cfg = config_from_dict(loop_config["config"])
    mode = loop_config["mode"]
    tc = for_mode(cfg.train, mode)
    from ray_jobs.common import quiet_train_worker

    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.gpus_per_worker:
        device = ray.train.torch.get_device()
    else:
        device = "cpu"
        torch.set_num_threads(tc.cpus_per_worker)
    fs, path = resolve_filesystem(loop_config["tokens"])
    train_docs, held = load_docs(fs, path, "train"), load_docs(fs, path, "heldout")
    tok = load_tokenizer(loop_config["model_dir"])
    st = settings(tc, mode)
    zero3 = deepspeed_config(tc, st.strategy, world) if st.strategy == "deepspeed_zero3" else None
    model = build_model(loop_config["model_dir"], tc, mode, loop_config["num_layers"], cfg.run.seed, zero3)
    limit = total_steps(train_docs, tc, st, cfg.run.seed, world)
    engine = make_engine(model, tc, st, limit, rank, world, device)

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(engine, Path(d))
            if state.finished:  # the run had finished: hand its export back again
                if rank == 0:
                    with tempfile.TemporaryDirectory() as tmp:
                        shutil.copytree(d, tmp, dirs_exist_ok=True)
                        ray.train.report({"step": state.step, "finished": True}, checkpoint=Checkpoint.from_directory(tmp))
                else:
                    ray.train.report({"step": state.step, "finished": True})
                return
        state.resumed_from.append(state.step)
        if rank == 0:
            print(f"[{stage_name(mode)}] resumed from the checkpoint of step {state.step}", flush=True)

    # Rank 0 feeds the dashboard's metrics (the bar is train_loop's tqdm_ray).
    progress = Progress(stage_name(mode), main="steps", unit="step", bar=False) if rank == 0 else None

    def report(metrics: dict, state: TrainState, save: bool) -> None:
        m = {k: v for k, v in metrics.items() if v == v}  # drop NaNs
        if progress is not None and m.get("step"):
            progress.update(1, tokens=m.get("tokens", 0))
            progress.set(**{k: m[k] for k in ("loss", "lr", "heldout_loss") if k in m})
            if limit:
                progress.set(progress=state.step / limit)
        if not save:
            ray.train.report(m)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(engine, state, Path(tmp))
            write = rank == 0 or engine.sharded_checkpoint
            ray.train.report(m, checkpoint=Checkpoint.from_directory(tmp) if write else None)
        # Wait until the controller has registered the checkpoint: reports are collected by
        # polling, and a worker that died before the next poll would lose it (measured: the
        # restarted run began at step 0). Costs little, and only at checkpoints.
        ray.train.get_all_reported_checkpoints(timeout_s=120)

    state = train_loop(engine, train_docs, held, tc, st, cfg.run.seed, tok.pad_token_id, state, report=report,
                       on_step_end=_fail_hook(loop_config.get("fail_at"), rank), progress=tqdm)
    if progress is not None:
        progress.close()
    with tempfile.TemporaryDirectory() as tmp:
        engine.export(Path(tmp) / "export", tokenizer=tok)
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(state.to_json())
        last = state.history[-1]
        ray.train.report({"step": state.step, "finished": True, "heldout_loss": last["heldout_loss"]},
                         checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


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
        import pyarrow.parquet as pq

        from rank1_core.rundir import RunDir
        from rank1_core.train import STATE_FILE, TrainError, TrainState, metrics_table
        from ray_jobs.common import ensure_ray, torch_trainer

        ensure_ray(cfg)
        stage = sr.stage
        tokens = RunDir(cfg.run.dir).stage("prepare").uri_of("tokens")
        loop_config = {"config": cfg.to_dict(), "mode": mode, "model_dir": str(model_dir),
                       "num_layers": num_layers, "tokens": tokens, "fail_at": os.environ.get(FAIL_ENV)}
        trainer = torch_trainer(train_worker, loop_config, stage, num_workers=tc.num_workers,
                                cpus_per_worker=tc.cpus_per_worker, gpus_per_worker=tc.gpus_per_worker,
                                max_failures=tc.max_failures, keep_checkpoints=tc.keep_checkpoints)
        with sr.timed("fit"):
            result = trainer.fit()
        if result.checkpoint is None:
            raise TrainError(f"[{name}] Ray Train finished without a checkpoint")
        out = "adapter" if mode == "lora" else "model"
        with result.checkpoint.as_directory() as d:
            d = Path(d)
            state = TrainState.from_json((d / STATE_FILE).read_text())
            if not state.finished:
                raise TrainError(f"[{name}] the last checkpoint {d} is not a finished run")
            export = d / "export"
            if mode == "lora":
                chk = check_adapter(export, tc.lora, num_layers)  # loud failure: empty / zero lora_B
                sr.rows["components"] = len(chk.components)
                sr.extra["min_lora_b_norm"] = chk.min_b_norm
            elif not (export / "config.json").exists():
                raise TrainError(f"[{name}] the exported model in {export} has no config.json")
            if stage.exists(out):
                stage.fs.delete_dir(stage.path(out))
            stage.upload_dir(export, out)
        pq.write_table(metrics_table(state.history), stage.path("metrics.parquet"), filesystem=stage.fs)
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


def run(cfg: Config, force: bool = False) -> dict:
    return run_training(cfg, "lora", force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
