"""rank1 plan --config X.yaml: adapter shape, sizes, memory and time of a run (meta device)."""

from __future__ import annotations

import argparse
import json
import sys

from rank1_core.config import ConfigError
from ray_jobs.common import add_config_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rank1 plan", description=__doc__)
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rank1_core.plan import make_plan

    from rank1_core.device import describe

    plan = make_plan(cfg)
    if args.json:
        d = dict(plan.__dict__, trainable_fraction=plan.trainable_fraction,
                 precision={c.key: {"value": c.value, "requested": c.requested, "why": c.why,
                                    "warning": c.warning} for c in cfg.precision})
        print(json.dumps(d, indent=2))
    else:
        print(plan.render())
        print("precision on this machine (auto: bf16 only where the hardware runs it fast):")
        print("\n".join(f"  {line}" for line in describe(cfg.precision)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
