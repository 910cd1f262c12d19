"""rank1 status --run DIR: which stages of a run are done or partial, in pipeline order."""

from __future__ import annotations

import argparse

from rank1_core.rundir import STAGING, RunDir
from rank1_core.stages import STAGES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rank1 status")
    p.add_argument("--run", required=True, help="run directory (path or URI)")
    args = p.parse_args(argv)
    run = RunDir(args.run)
    rebuilding = set(run.rebuilding())
    found = run.status()
    # pipeline order (rank1_core.stages), then any other folder by name
    order = [s for s in STAGES if s in found] + sorted(s for s in found if s not in STAGES)
    width = max([12, *map(len, order)])
    for name in order:
        state = found[name]
        m = run.stage(name).manifest() if state == "done" else {}
        extra = f"  {m.get('seconds', 0):.1f}s  rows={m.get('rows', {})}" if m else ""
        if name in rebuilding and state == "done":
            extra += f"  (a rerun is unfinished in {STAGING}/{name}; these outputs stay until it completes)"
        print(f"{name:{width}s} {state}{extra}")
    return 0
