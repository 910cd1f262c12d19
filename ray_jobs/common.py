"""Shared glue of the stage entry points: arguments, config, Ray connection, run directory.

Every stage module `ray_jobs/<stage>.py` defines

    def run(cfg: Config, force: bool = False) -> dict   # returns the stage manifest

and ends with `if __name__ == "__main__": stage_cli("<stage>", run)`, so both
`python -m ray_jobs.<stage> --config X.yaml key=value ...` and `rank1 <stage> ...` work.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable

from rank1_core.config import Config, ConfigError, Scaling, dump_yaml, load_config, section_hash
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
    # set RAY_ADDRESS=auto. Jobs from `ray job submit` get RAY_ADDRESS from Ray.) It is
    # private: every port on 127.0.0.1, the auth token readable by its owner only.
    loopback_only()
    private_auth_token()
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
             runtime_env=env, include_dashboard=None, dashboard_host="127.0.0.1")
    return ray


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0, Ray runs single-machine: its node IP is 127.0.0.1 (see `loopback_only`)."""


def loopback_only() -> None:
    """Make the local Ray instance this process starts listen on 127.0.0.1 only.

    Ray 2.60 binds the GCS, raylet, object manager, worker, agent and metrics-export ports to
    the node IP, and on Linux turns a node IP of 127.0.0.1 (`_node_ip_address`,
    `--node-ip-address`) into the machine's outward address. With
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-machine mode, its default on macOS and
    Windows) the node IP is the loopback address, so nothing listens on other interfaces.
    Set in the environment (the Ray processes started from here inherit it) and in Ray's
    constants when ray is already imported (it reads the variable at import)."""
    os.environ[LOOPBACK_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def private_auth_token() -> None:
    """Ray 2.60 turns token authentication on for a local instance and, when there is no
    token yet, writes a new one to ~/.ray/auth_token readable by everyone (0644). Create it
    first with mode 0600 (Ray then uses it), and make an existing one of ours 0600."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    import secrets
    from pathlib import Path

    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        elif path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileExistsError:  # another process made it at the same moment
        pass


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


def torch_trainer(worker: Callable, loop_config: dict, stage: StageDir, scaling: Scaling, **trainer_kwargs):
    """The `TorchTrainer` every training stage uses (`ray_jobs/harness.py`): `scaling.num_workers`
    workers of its CPUs and GPUs (NCCL with GPUs, gloo without), checkpoints in
    `<stage>/checkpoints/` through the run's filesystem (shared storage on clusters), a worker
    failure restarting from the last checkpoint up to `scaling.max_failures` times. Extra
    keywords (datasets, dataset_config) pass on."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = scaling.gpus_per_worker > 0
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if gpu else {})}
    return TorchTrainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_TRAIN_RUN_NAME, storage_path=stage.path("checkpoints"), storage_filesystem=stage.fs,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.keep_checkpoints),
        ),
        **trainer_kwargs,
    )


def execute(cfg: Config, name: str, body: Callable, *, force: bool = False, resumable: bool = False) -> dict:
    """Run a stage body with skip-if-done, manifest and success marker.

    The stages it reads (`rank1_core.stages`: its inputs under this config) must be done, and
    their config hashes are folded into this stage's hash.
    """
    from rank1_core.device import stage_choices
    from rank1_core.stages import stage, upstream

    run = RunDir(cfg.run.dir)
    ups = [run.stage(u) for u in upstream(cfg, name, run)]
    for u in ups:
        u.require_done()
    h = chained_hash(section_hash(cfg, name), ups)
    precision = stage_choices(cfg.precision, stage(name).sections)

    def wrapped(sr):
        for u in ups:
            sr.use(u)
        if precision:  # what each `auto` became on this machine, and why (also in config.yaml)
            sr.extra["precision_choices"] = precision
            for key, what in precision.items():
                print(f"[{name}] precision: {key} = {what}", flush=True)
        body(sr)

    return run_stage(run.stage(name), h, dump_yaml(cfg), wrapped, force=force, resumable=resumable,
                     log=lambda m: print(m, flush=True))


READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
"""OSErrors that mean the run directory (or a cache) cannot be written: the user's to fix."""


def input_error(e: BaseException) -> BaseException | None:
    """The error a user can act on (bad input, config, data, a missing model or stage, a run
    directory that cannot be written), or None for a fault in rank1 or a library. A Ray task
    error is judged by the exception the task raised."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    if isinstance(e, (ValueError, StageNotDone)) or type(e).__module__.split(".")[0] == "rank1_core":
        return e  # ValueError: DataError, SAEInputError, ConfigError, ...; rank1_core's own errors
    if isinstance(e, OSError) and (isinstance(e, PermissionError) or e.errno in READ_ONLY_ERRNOS):
        return e
    return None



def guarded(fn: Callable[[], object]) -> int:
    """The one error path of every door (`rank1 run`, `rank1 <stage>`, `python -m
    ray_jobs.<stage>`): an input error prints one line `error: ...` on stderr and returns 2;
    anything else keeps its traceback. RANK1_DEBUG=1 shows the traceback of every error."""
    try:
        return int(fn() or 0)
    except Exception as e:
        shown = input_error(e)
        if shown is None or os.environ.get("RANK1_DEBUG"):
            raise
        kind = "" if isinstance(shown, (ConfigError, StageNotDone)) else f"{type(shown).__name__}: "
        print(f"error: {kind}{' '.join(str(shown).split())}", file=sys.stderr)
        return 2


def stage_cli(name: str, run_fn: Callable[[Config, bool], dict], argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m ray_jobs.{name}", description=f"rank1 stage: {name}")
    add_config_args(p)
    args = p.parse_args(argv)

    def go() -> int:
        run_fn(config_from_args(args), args.force)
        return 0

    return guarded(go)


def generate_and_grade(cfg: Config, variants: list, benchmarks: dict, sr=None, tag: str = "generate"):
    """Samples DataFrame (rank1_core.grading.SAMPLE_COLUMNS plus prompt) of every variant
    (`rank1_core.benchmarks.Variant`) on every benchmark, generated on `evaluate.actors` Ray Data
    actors (`rank1_core.generation.GenerationWorker`, one engine per `engine_groups` group) and
    graded here (math-verify needs the main thread). The evaluate and ablate stages use it."""
    import contextlib
    import math

    import pandas as pd

    from rank1_core.benchmarks import build_items, engine_groups, order_samples
    from rank1_core.generation import (GENERATED_COLUMNS, EngineSpec, GenerationWorker, resolve_backend,
                                       resolve_lora_mode)
    from rank1_core.grading import grade_samples
    from ray_jobs.progress import Progress

    ec = cfg.evaluate
    backend = resolve_backend(ec.backend)
    mode = resolve_lora_mode(backend, ec.lora_mode)
    items = build_items(cfg, benchmarks, variants)
    ray = ensure_ray(cfg)
    rows = []
    for model_dir, adapters in engine_groups(variants, mode):
        part = [it for it in items if it["variant"] in adapters]
        spec = EngineSpec(
            model_dir=model_dir, adapters=adapters, backend=backend, lora_mode=mode,
            settings=dict(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
                          n=ec.samples, seed=cfg.run.seed),
            dtype=ec.dtype or cfg.model.dtype, vllm=vars(ec.vllm).copy(), batch_size=ec.batch_size,
            threads=ec.threads,
        )
        blocks = max(1, min(len(part), max(ec.actors * 2, math.ceil(len(part) / ec.batch_size))))
        ds = ray.data.from_items(part, override_num_blocks=blocks)
        ds = ds.map_batches(GenerationWorker, fn_constructor_kwargs={"spec": spec.to_dict()},
                            batch_size=ec.batch_size, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=ec.actors),
                            num_cpus=ec.actor_cpus, num_gpus=ec.actor_gpus or None)
        label = f"{tag}:{'+'.join(adapters)}"
        with sr.timed(label) if sr is not None else contextlib.nullcontext():
            with Progress("evaluate", total=len(part) * ec.samples, main="samples", unit="sample",
                          desc=f"[evaluate] {label}") as p:
                for r in ds.iter_rows():
                    rows.append(r)
                    p.update(1, tokens=int(r["n_tokens"]))
    generated = pd.DataFrame(rows, columns=GENERATED_COLUMNS)
    prompts = {v.name: v.prompt for v in variants}
    # a think-format response without the answer marker is graded per missing_marker; a
    # plain-prompted one on its whole response
    generated["prompt"] = generated["variant"].map(prompts)
    with sr.timed(f"grade:{tag}") if sr is not None else contextlib.nullcontext():
        samples = grade_samples(generated, cfg.model.answer_marker, ec.tail_chars, ec.missing_marker)
    samples["prompt"] = samples["variant"].map(prompts)
    samples = order_samples(samples, items, [v.name for v in variants], ec.samples)
    samples["lora_mode"] = samples["lora_mode"].astype(object).where(samples["lora_mode"].notna(), None)
    return samples
