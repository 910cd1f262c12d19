"""rank1 status --run DIR: which stages of a run are done, partial or missing."""

from __future__ import annotations

import argparse

from rank1_core.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rank1 status")
    p.add_argument("--run", required=True, help="run directory (path or URI)")
    args = p.parse_args(argv)
    run = RunDir(args.run)
    for name, state in sorted(run.status().items()):
        m = run.stage(name).manifest() if state == "done" else {}
        extra = f"  {m.get('seconds', 0):.1f}s  rows={m.get('rows', {})}" if m else ""
        print(f"{name:12s} {state}{extra}")
    return 0
