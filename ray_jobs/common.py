"""Shared glue of the stage entry points: arguments, config, Ray connection, run directory.

Every stage module `ray_jobs/<stage>.py` defines

    def run(cfg: Config, force: bool = False) -> dict   # returns the stage manifest

and ends with `if __name__ == "__main__": stage_cli("<stage>", run)`, so both
`python -m ray_jobs.<stage> --config X.yaml key=value ...` and `rank1 <stage> ...` work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from rank1_core.config import Config, ConfigError, dump_yaml, load_config, section_hash
from rank1_core.rundir import RunDir, StageDir, StageNotDone, chained_hash, run_stage

log = logging.getLogger("rank1")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--run", default=None, help="run directory (overrides run.dir)")
    p.add_argument("--force", action="store_true", help="redo the stage(s) even if done")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides or [])
    if getattr(args, "run", None):
        overrides.append(f"run.dir={args.run}")
    return load_config(args.config, overrides)


def ensure_ray(cfg: Config):
    """Join the cluster named by ray.address / $RAY_ADDRESS, else start a local instance."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Quiet, deterministic workers: the project's code is importable from the working dir.
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return ray
    # No address: a fresh local instance sized by the config. (Not "auto": that would attach
    # to whatever Ray happens to run on the machine; to use a head started with `ray start`,
    # set RAY_ADDRESS=auto. Jobs from `ray job submit` get RAY_ADDRESS from Ray.)
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
             runtime_env=env, include_dashboard=None)
    return ray


def quiet_train_worker() -> None:
    """Inside a Ray Train worker: drop Ray Train's INFO line for every `ray.train.report`
    ("Reporting training result N: TrainingReport(...)"), which would print the full
    metrics dict once per optimizer step into the job log. Warnings and errors still show;
    the step metrics go to the bar, the dashboard's metrics and the stage's Parquet."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray Train layout: keep its logging as it is
        return
    # That module logs through logging.getLogger(__file__).
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


RAY_TRAIN_RUN_NAME = "ray_train"
"""Ray Train's run folder inside `<stage>/checkpoints/` (train, train_full, sae, transcoder)."""


def torch_trainer(worker: Callable, loop_config: dict, stage: StageDir, *, num_workers: int,
                  cpus_per_worker: float, gpus_per_worker: float, max_failures: int, keep_checkpoints: int,
                  **trainer_kwargs):
    """The `TorchTrainer` every training stage uses: `num_workers` workers of the given CPUs and
    GPUs (NCCL with GPUs, gloo without), checkpoints in `<stage>/checkpoints/` through the run's
    filesystem (shared storage on clusters), a worker failure restarting from the last
    checkpoint up to `max_failures` times. Extra keywords (datasets, dataset_config) pass on."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpu else {})}
    return TorchTrainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_TRAIN_RUN_NAME, storage_path=stage.path("checkpoints"), storage_filesystem=stage.fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
        **trainer_kwargs,
    )


def stage_dir(cfg: Config, name: str) -> StageDir:
    return RunDir(cfg.run.dir).stage(name)


def execute(cfg: Config, name: str, body: Callable, upstream: tuple[str, ...] = (), *,
            force: bool = False, resumable: bool = False) -> dict:
    """Run a stage body with skip-if-done, manifest and success marker.

    `upstream` names stages whose outputs this stage reads: they must be done, and their
    config hashes are folded into this stage's hash.
    """
    run = RunDir(cfg.run.dir)
    ups = [run.stage(u) for u in upstream]
    for u in ups:
        u.require_done()
    h = chained_hash(section_hash(cfg, name), ups)

    def wrapped(sr):
        for u in ups:
            sr.use(u)
        body(sr)

    return run_stage(run.stage(name), h, dump_yaml(cfg), wrapped, force=force, resumable=resumable,
                     log=lambda m: print(m, flush=True))


def stage_cli(name: str, run_fn: Callable[[Config, bool], dict], argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m ray_jobs.{name}", description=f"rank1 stage: {name}")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        run_fn(cfg, args.force)
    except (ConfigError, StageNotDone) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Bad input found by a stage (DataError, SAEInputError, ...): its message names the
        # file/row/key at fault. RANK1_DEBUG=1 shows the traceback too.
        if os.environ.get("RANK1_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0
