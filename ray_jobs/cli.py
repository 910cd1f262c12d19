"""The `rank1` command: the same stages and config system as `python -m ray_jobs.<stage>`.

    rank1 run     --config configs/demo.yaml [key=value ...]   # the whole pipeline
    rank1 <stage> --config configs/demo.yaml [key=value ...]   # one stage
    rank1 plan    --config configs/qwen2.5-32b-s1k.yaml        # sizes, no download
    rank1 status  --run runs/demo                               # which stages are done
    rank1 export  sae --run runs/demo --format saelens OUT/     # SAELens / Neuronpedia formats

Any `ray_jobs/<name>.py` module with a `main(argv)` function is a subcommand; a stage
module with only `run(cfg, force)` gets the standard stage arguments.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import ray_jobs

USAGE = __doc__


def _commands() -> list[str]:
    skip = {"cli", "common", "__init__"}
    return sorted(m.name for m in pkgutil.iter_modules(ray_jobs.__path__) if m.name not in skip)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        print("commands:", ", ".join(["run", *_commands()]))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        cmd = "pipeline"
    if cmd not in _commands():
        print(f"rank1: unknown command {cmd!r}; commands: {', '.join(['run', *_commands()])}", file=sys.stderr)
        return 2
    from ray_jobs.common import guarded, stage_cli

    mod = importlib.import_module(f"ray_jobs.{cmd}")
    if hasattr(mod, "main"):
        return guarded(lambda: mod.main(rest))  # run, report, sql, ...: one error path for all
    return stage_cli(cmd, mod.run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
