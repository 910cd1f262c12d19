"""The export's destination check. The folder itself is built with `rank1_core.rundir.atomic_dir`
(a hidden temporary name beside the destination, renamed into place when complete)."""

from __future__ import annotations

from pathlib import Path


class ExportError(ValueError):
    """An export cannot be made from this run; the message names what is missing."""


def check_destination(out: str | Path, force: bool = False) -> Path:
    """`out` resolved; an error when it already holds something and `force` is not given."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose another folder or pass --force")
    return out
