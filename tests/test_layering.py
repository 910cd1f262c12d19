"""`rank1_core` is the Ray-free library: no module of it imports Ray, at the top or lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "rank1_core"


def _ray_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        hits += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                 if n == "ray" or n.startswith("ray.") or n == "ray_jobs" or n.startswith("ray_jobs.")]
    return hits


def test_no_module_of_rank1_core_imports_ray_or_ray_jobs():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 20
    hits = [h for f in files for h in _ray_imports(f)]
    assert hits == [], "rank1_core must stay free of Ray (move the glue to ray_jobs/):\n" + "\n".join(hits)


def test_importing_every_rank1_core_module_loads_no_ray():
    mods = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in CORE.rglob("*.py"))
    mods = [m.removesuffix(".__init__") for m in mods]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _stage_names() -> list[str]:
    """The pipeline's stages, from the stage graph (rank1_core.stages)."""
    from rank1_core.stages import STAGES

    return list(STAGES)


def _imported_ray_jobs_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ray_jobs module `path` imports, at the top or lazily."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "ray_jobs" if node.level else (node.module or "")
            if node.level and node.module:
                base = f"ray_jobs.{node.module}"
            out.append((node.lineno, base))
            if base == "ray_jobs":  # from ray_jobs import evaluate
                out += [(node.lineno, f"ray_jobs.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.append((node.lineno, str(node.args[0].value)))
    return [(n, m.split(".")[1]) for n, m in out if m.startswith("ray_jobs.")]


def test_no_stage_module_imports_another_stage():
    """Each ray_jobs/<stage>.py wires Ray to rank1_core: what stages share lives in rank1_core
    or in ray_jobs' helpers (common, harness, progress), never in a sibling stage."""
    stages = _stage_names()
    assert {"prepare", "train", "evaluate", "ablate", "steer", "transcoder_eval"} <= set(stages)
    files = {s: REPO / "ray_jobs" / f"{s}.py" for s in stages}
    assert [s for s, f in files.items() if not f.exists()] == [], "every stage has its ray_jobs/<stage>.py"
    hits = [f"ray_jobs/{s}.py:{line}: imports ray_jobs.{m}"
            for s, f in files.items() for line, m in _imported_ray_jobs_modules(f) if m in files and m != s]
    assert hits == [], "a stage imports a sibling stage (move what they share to rank1_core or ray_jobs.common):\n" + \
        "\n".join(hits)
