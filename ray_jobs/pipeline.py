"""The whole pipeline: the stages listed in the config's `stages`, in order.

    python -m ray_jobs.pipeline --config configs/demo.yaml
    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config configs/demo.yaml

Each finished stage is skipped on rerun (same config hash), so a pipeline killed mid-stage
and submitted again picks up where it stopped.
"""

from __future__ import annotations

import argparse
import importlib
import time

from rank1_core.config import Config
from ray_jobs.common import add_config_args, config_from_args, guarded


def stage_module(name: str):
    return importlib.import_module(f"ray_jobs.{name}")


def run(cfg: Config, force: bool = False, only: list[str] | None = None) -> dict[str, dict]:
    stages = only or cfg.stages
    out = {}
    t0 = time.perf_counter()
    from rank1_core.device import describe

    for line in describe(cfg.precision):
        print(line, flush=True)
    for name in stages:
        print(f"=== stage {name} ===", flush=True)
        out[name] = stage_module(name).run(cfg, force)
    print(f"=== pipeline finished in {time.perf_counter() - t0:.1f}s: {', '.join(stages)} -> {cfg.run.dir}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.pipeline", description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    args = p.parse_args(argv)

    def go() -> int:
        run(config_from_args(args), args.force, args.stages.split(",") if args.stages else None)
        return 0

    return guarded(go)  # the one error path of every door (ray_jobs.common)


if __name__ == "__main__":
    raise SystemExit(main())
