"""The Ray side of `rank1_core.harness`: one Ray Train worker for every trained stage.

    state = fit(sr, cfg, cfg.train, "rank1_core.train:job", args)

`fit` starts a `TorchTrainer` (`ray_jobs.common.torch_trainer`: the section's shared
`Scaling` keys) whose workers all run `train_worker`: set the device and threads, build the
stage's `rank1_core.harness.Job` (`job(args, rank, world, device)` of the named module),
resume from the last Ray Train checkpoint (a dead worker is replaced, and a crashed stage run
again with the same config continues there), train with `rank1_core.harness.train`
reporting a checkpoint where the plan says, then run the job's finish (the stage's outputs
into its folder) and, on rank 0, write `metrics.parquet` and `train_state.json`. A run whose
last checkpoint is finished trains nothing and only runs the finish again.

Test hook: with $RANK1_TRAIN_FAIL_AT_STEP="N:/path/marker", the rank-0 worker kills its own
process right after step N once (it creates the marker file), a real worker failure.

`training_body(cfg, mode)` is the body of the train (lora) and train_full (full) stages.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

from rank1_core.config import Config, Scaling

FAIL_ENV = "RANK1_TRAIN_FAIL_AT_STEP"
GAUGES = ("loss", "heldout_loss", "lr", "fvu", "l0", "dead_fraction")
"""Row values rank 0 shows on the dashboard (`ray_jobs.progress`)."""


def _fail_hook(spec: str | None, rank: int):
    if not spec:
        return lambda state: None
    n, marker = spec.split(":", 1)

    def hook(state) -> None:
        if rank == 0 and state.step == int(n) and not os.path.exists(marker):
            Path(marker).write_text(f"killed rank 0 after step {n}\n")
            os._exit(17)  # a real crash of the worker process, not an exception

    return hook


def _job_factory(name: str):
    module, fn = name.split(":")
    return getattr(importlib.import_module(module), fn)


def train_worker(lc: dict) -> None:
    """Body of every Ray Train worker of every trained stage."""
    import ray.train
    import torch
    from ray.experimental.tqdm_ray import tqdm
    from ray.train import Checkpoint

    from rank1_core import harness
    from rank1_core.rundir import RunDir, StageDir
    from ray_jobs.common import quiet_train_worker
    from ray_jobs.progress import Progress

    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    scaling = Scaling(**lc["scaling"])
    if scaling.gpus_per_worker:
        device = ray.train.torch.get_device()
    else:
        device = "cpu"
        torch.set_num_threads(scaling.cpus_per_worker)
    args = dict(lc["args"])
    if lc["datasets"]:
        args["shards"] = {n: ray.train.get_dataset_shard(n) for n in lc["datasets"]}
    job = _job_factory(lc["job"])(args, rank, world, device)
    obj, name = job.objective, lc["name"]
    run_root, folder = lc["stage"]
    stage = StageDir(RunDir(run_root), name, folder)

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = harness.load_checkpoint(obj, Path(d))
        if not state.finished:
            state.resumed_from.append(state.step)
        if rank == 0:
            print(f"[{name}] resumed from the checkpoint of step {state.step}", flush=True)
    else:
        job.start()

    # Rank 0 feeds the dashboard's metrics (the terminal bar, where the job has one, is tqdm_ray).
    progress = Progress(name, main="steps", unit="step", bar=False) if rank == 0 else None
    tokens = [state.tokens if state else 0]

    def report(row: dict, state: harness.TrainState, save: bool) -> None:
        metrics = {k: v for k, v in row.items() if v == v}  # drop NaNs
        if progress is not None and row["step"]:
            progress.update(1, tokens=state.tokens - tokens[0])
            progress.set(progress=state.step / job.plan.limit, **{k: metrics[k] for k in GAUGES if k in metrics})
            tokens[0] = state.tokens
        if not save:
            return
        with tempfile.TemporaryDirectory() as tmp:
            harness.save_checkpoint(obj, state, Path(tmp))
            write = rank == 0 or obj.sharded_checkpoint
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if write else None)
        # Wait until the controller has registered the checkpoint: reports are collected by
        # polling, and a worker that died before the next poll would lose it (measured: the
        # restarted run began at step 0). Costs little, and only at checkpoints.
        ray.train.get_all_reported_checkpoints(timeout_s=120)

    if state is None or not state.finished:
        state = harness.train(obj, job.source, job.plan, state, report=report,
                              on_step_end=_fail_hook(lc.get("fail_at"), rank),
                              progress=tqdm if job.bar else None, name=obj.name)
    if progress is not None:
        progress.close()
    job.finish(stage, state)
    if rank == 0:
        harness.write_state(stage.fs, stage.path(), state, job.metric_columns)


def fit(sr, cfg: Config, scaling: Scaling, job: str, args: dict, **trainer_kwargs):
    """Train the stage of `sr` (a `rank1_core.rundir.StageRun`) on Ray Train: `job` names the
    `module:function` that builds each worker's `rank1_core.harness.Job` from `args`; extra
    keywords (datasets, dataset_config) pass on to the `TorchTrainer`, and each worker gets its
    dataset shards as args["shards"]. Returns the final `rank1_core.harness.TrainState`."""
    from dataclasses import fields

    from rank1_core.harness import STATE_FILE, TrainError, TrainState
    from ray_jobs.common import ensure_ray, torch_trainer

    ensure_ray(cfg)
    stage = sr.stage
    lc = {"job": job, "args": args, "name": stage.name, "stage": [stage.run.uri_of(stage.run.root), stage.folder],
          "scaling": {f.name: getattr(scaling, f.name) for f in fields(Scaling)},
          "datasets": sorted(trainer_kwargs.get("datasets") or {}), "fail_at": os.environ.get(FAIL_ENV)}
    trainer = torch_trainer(train_worker, lc, stage, Scaling(**lc["scaling"]), **trainer_kwargs)
    with sr.timed("fit"):
        trainer.fit()
    if not stage.exists(STATE_FILE):
        raise TrainError(f"[{stage.name}] Ray Train finished without writing {STATE_FILE}")
    state = TrainState.from_json(stage.read_text(STATE_FILE))
    if not state.finished:
        raise TrainError(f"[{stage.name}] training did not finish (at step {state.step})")
    return state


def training_body(cfg: Config, mode: str):
    """The body of the `train` (mode lora) or `train_full` (mode full) stage, for
    `ray_jobs.common.execute`; everything that can be wrong with the config fails here, before
    Ray or any stage I/O."""
    from rank1_core.config import ConfigError
    from rank1_core.lora import check_adapter, validate_for_model
    from rank1_core.models import resolve_model_dir
    from rank1_core.train import TrainError, deepspeed_config, for_mode, settings

    name = "train" if mode == "lora" else "train_full"
    tc = for_mode(cfg.train, mode)
    st = settings(tc, mode)
    num_layers = validate_for_model(tc, cfg.model, mode)
    if st.strategy != "ddp":
        try:
            deepspeed_config(tc, st.strategy, tc.num_workers)
        except TrainError as e:
            raise ConfigError(str(e)) from None
    model_dir = resolve_model_dir(cfg.model)

    def body(sr):
        from rank1_core.rundir import RunDir

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

    return body
