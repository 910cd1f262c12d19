"""The real `sae-lens` package in its own virtualenv (its pins clash with rank1's: it pulls
transformer-lens, datasets and a newer transformers), built once per machine and cached.

    python = saelens_python()      # path of the venv's python, or pytest.skip with the reason

Where: $RANK1_CACHE/saelens-venv (default ~/.cache/rank1/saelens-venv). Built under a file
lock into a temporary folder renamed into place, so concurrent test processes build it once
and a killed build leaves nothing half-made. Measured here: ~1 min 50 s and 1.9 GB
(`torch==2.13.0` first, the CPU build from local disk, then sae-lens and its dependencies).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rank1_core.models import cache_dir

SAELENS = "sae-lens==6.54.12"
TORCH = "torch==2.13.0"


def _venv_dir() -> Path:
    return cache_dir() / "saelens-venv"


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    r = subprocess.run([str(python), "-c", "import sae_lens, pyarrow"], capture_output=True, timeout=300)
    return r.returncode == 0


def saelens_python() -> str:
    dest = _venv_dir()
    python = dest / "bin" / "python"
    if _works(python):
        return str(python)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _works(python):
            return str(python)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
        try:
            # A venv's scripts hold its absolute path: build it at its final path's sibling and
            # run everything through `python -m pip`, then move; `python -m` works after a move.
            subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            for spec in (TORCH, SAELENS):
                r = subprocess.run([*pip, spec], capture_output=True, text=True, timeout=1500)
                if r.returncode != 0:
                    pytest.skip(f"cannot install {spec} into a virtualenv here (pip exit {r.returncode}): "
                                f"{(r.stderr or r.stdout).strip()[-600:]}")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _works(python):
        pytest.skip(f"{SAELENS} installed into {dest} but `import sae_lens` fails there")
    return str(python)
