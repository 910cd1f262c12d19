"""Every file rank1 writes is written to a temporary name and renamed (issue 17, item 1).

- a source scan of rank1_core/ and ray_jobs/ fails when a direct write appears outside the
  helpers of `rank1_core/rundir.py` (`atomic_output`, `atomic_local_path`, `atomic_dir` and their
  wrappers) and outside the commented allow-list below;
- behaviour: a writer killed by a real SIGKILL mid-write, or failing mid-write, leaves the old
  file (or folder) intact and nothing partial under the final name.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from rank1_core.rundir import TMP_PREFIX, atomic_dir

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("rank1_core", "ray_jobs")
HELPERS = "rank1_core/rundir.py"
"""The one place that writes directly: the atomic helpers themselves."""
ATOMIC = {"atomic_output", "atomic_local_path", "atomic_dir"}
"""A write inside `with <one of these>(...)` goes to the temporary name it yields."""

# Writes that stay direct on purpose, by (file, enclosing function): each says why.
ALLOWED = {
    # streamed logs and locks: appended to / held open while a process runs, never read as data
    ("rank1_core/autointerp/server.py", "LocalServer.start"): "the local LLM server's log, appended to while it runs",
    ("rank1_core/models.py", "_file_lock"): "an empty lock file for flock, never read",
    # a secret created exclusively (O_EXCL) with mode 0600 before Ray would write it 0644
    ("ray_jobs/common.py", "private_auth_token"): "created O_EXCL 0600: never replaces an existing token",
    # crash-test hooks: the marker is created before the process kills itself; only its existence matters
    ("rank1_core/activations.py", "Extractor._die"): "the fault-injection marker (O_EXCL), a test hook",
    ("ray_jobs/harness.py", "_fail_hook.hook"): "the fault-injection marker, a test hook",
    # not a file
    ("ray_jobs/sql.py", "_write"): "CSV to stdout when there is no --out (--out goes through atomic_output)",
    # a finished local folder uploaded into a stage being built (the stage counts only once
    # _SUCCESS is written after it; object stores publish each PUT whole)
    ("ray_jobs/report.py", "run.body"): "uploads the complete local report of a remote run",
    # writes into a temporary folder that `atomic_dir` renames into place whole
    ("rank1_core/models.py", "_save_smollm2"): "builds into _build_once's atomic_dir folder",
    ("rank1_core/models.py", "_save_tiny"): "builds into _build_once's atomic_dir folder",
    ("rank1_core/export/neuronpedia.py", "_gz_jsonl"): "writes inside export_neuronpedia's atomic_dir folder",
    ("rank1_core/export/neuronpedia.py", "_jsonl"): "writes inside export_neuronpedia's atomic_dir folder",
    # private scratch folders (mkdtemp) that are read back by this process and then deleted
    ("rank1_core/generation.py", "local_dir"): "downloads a remote model into a fresh mkdtemp folder",
    ("rank1_core/activations.py", "local_adapter"): "downloads a remote adapter into a fresh mkdtemp folder",
}
UNDER_REFACTOR: set[str] = set()
"""Files skipped whole while a refactor converts them (none now)."""

ANY_CALL = {"to_parquet", "savefig", "save_pretrained", "open_output_stream", "open_append_stream",
            "write_dataset", "write_to_dataset", "ParquetWriter", "copy_files"}
"""Method/function names that write a file whatever their arguments."""
MODULE_CALLS = {("pq", "write_table"), ("pacsv", "write_csv"), ("csv", "write_csv"), ("torch", "save"),
                ("np", "save"), ("np", "savez"), ("np", "savez_compressed"), ("shutil", "copy"),
                ("shutil", "copy2"), ("shutil", "copyfile"), ("shutil", "copytree"), ("shutil", "move"),
                ("os", "fdopen"), ("os", "replace"), ("os", "rename")}  # a rename by hand: use the helpers
WITH_STREAM = {"dump", "safe_dump"}  # json.dump(obj, f), pickle.dump, yaml.safe_dump(obj, f)


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _mode(call: ast.Call, pos: int) -> str:
    arg = call.args[pos] if len(call.args) > pos else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ""


def _writes(call: ast.Call) -> str | None:
    """What kind of direct write `call` is, or None."""
    f, name = call.func, _name(call.func)
    owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
    npos = len(call.args)
    if name in ANY_CALL or (owner, name) in MODULE_CALLS or name == "save_file":
        return name
    if name in ("write_text", "write_bytes") and isinstance(f, ast.Attribute) and npos == 1:
        return f"Path.{name}"  # StageDir.write_text(rel, text) is atomic and takes two
    if name in ("to_csv", "to_json") and (npos or any(k.arg == "path_or_buf" for k in call.keywords)):
        return name  # without a path they return a string
    if name in WITH_STREAM and npos >= 2:
        return f"{owner}.{name}"
    if name == "open" and isinstance(f, ast.Name) and set(_mode(call, 1)) & set("wax+"):
        return f"open(..., {_mode(call, 1)!r})"
    if name == "open" and isinstance(f, ast.Attribute) and owner != "os" and set(_mode(call, 0)) & set("wax+"):
        return f"Path.open({_mode(call, 0)!r})"
    if name == "open" and owner == "os" and any("O_WRONLY" in ast.dump(a) or "O_RDWR" in ast.dump(a)
                                                 for a in call.args[1:]):
        return "os.open(O_WRONLY)"
    return None


def _is_atomic_with(node: ast.AST) -> bool:
    return isinstance(node, (ast.With, ast.AsyncWith)) and any(
        isinstance(i.context_expr, ast.Call) and _name(i.context_expr.func) in ATOMIC for i in node.items)


def direct_writes(path: Path, rel: str | None = None) -> list[tuple[str, int, str, str]]:
    """(file, line, enclosing function, kind) of each direct write in a module."""
    rel = rel or path.relative_to(REPO).as_posix()
    out = []

    def visit(node: ast.AST, scope: list[str], atomic: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        atomic = atomic or _is_atomic_with(node)
        if isinstance(node, ast.Call) and not atomic:
            kind = _writes(node)
            if kind:
                out.append((rel, node.lineno, ".".join(scope), kind))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, atomic)

    visit(ast.parse(path.read_text(), filename=rel), [], False)
    return out


def _scan() -> list[tuple[str, int, str, str]]:
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    return [w for p in files if p.relative_to(REPO).as_posix() != HELPERS for w in direct_writes(p)]


def test_no_direct_write_outside_the_atomic_helpers():
    found = _scan()
    bad = [f"{f}:{line} in {fn or '<module>'}: {kind}" for f, line, fn, kind in found
           if f not in UNDER_REFACTOR and (f, fn) not in ALLOWED]
    assert not bad, ("direct file writes (a kill mid-write leaves a torn file under the final name); write "
                     "through rank1_core.rundir (StageDir.write_text/write_parquet, write_text_atomic, "
                     "atomic_output, atomic_local_path, atomic_dir) or, with a reason, add to ALLOWED:\n"
                     + "\n".join(bad))
    stale = sorted(set(ALLOWED) - {(f, fn) for f, _, fn, _ in found})
    assert not stale, f"ALLOWED entries that no longer write directly (remove them): {stale}"


def test_the_scan_sees_each_kind_of_direct_write(tmp_path):
    """The scanner itself: each pattern is caught, the atomic forms are not."""
    src = textwrap.dedent('''
        def bad(p, fs, df, fig, model, t):
            p.write_text("x"); p.write_bytes(b"x"); df.to_csv(p); df.to_parquet(p); fig.savefig(p)
            pq.write_table(t, p); torch.save(t, p); save_file(t, p); model.save_pretrained(p)
            open(p, "w"); open(p, mode="ab"); p.open("w"); json.dump(t, f); fs.open_output_stream(p)
            pq.ParquetWriter(p, t.schema)

        def good(p, fs, st, df, fig, t):
            st.write_text("rel", "x"); st.write_parquet("rel", t); df.to_csv(index=False); open(p)
            open(p, "rb"); json.dumps(t)
            with atomic_local_path(p) as tmp:
                fig.savefig(tmp); tmp.write_text("x")
            with atomic_output(fs, p) as out, pq.ParquetWriter(out, t.schema) as w:
                pq.write_table(t, out)
            with atomic_dir(p) as d:
                save_file(t, d / "w.safetensors")
    ''')
    mod = tmp_path / "probe.py"
    mod.write_text(src)
    found = direct_writes(mod, "probe.py")
    assert {fn for _, _, fn, _ in found} == {"bad"}
    assert len(found) == 15, found


# --------------------------------------------------------------------------- behaviour

KILLED_WRITER = textwrap.dedent('''
    import sys, time
    import pyarrow.fs as pafs
    from rank1_core.rundir import atomic_output

    with atomic_output(pafs.LocalFileSystem(), sys.argv[1]) as out:
        chunk = b"n" * (1 << 20)
        for i in range(10_000):  # far more than it gets to write before the kill
            out.write(chunk)
            out.flush()
            if i == 4:
                print("writing", flush=True)
            time.sleep(0.01)
''')


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    """A real SIGKILL while a large file is being written: the final name still holds the old
    file whole; the torn bytes are only under the temporary name."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"old and complete")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == b"writing"
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
        assert len(tmps) == 1 and tmps[0].stat().st_size >= 5 << 20  # mid-write, megabytes in
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert target.read_bytes() == b"old and complete"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(TMP_PREFIX)) == ["big.bin"]


class _Boom:
    def __str__(self) -> str:
        raise OSError("disk full")


def test_converted_writers_keep_the_old_file_when_they_fail_mid_write(tmp_path):
    """Real writers of the audit (report tables, the SQL --out, a figure) failing part way."""
    from rank1_core.report import tables as tabs

    good = pd.DataFrame({"a": [1, 2]})
    tabs.write_table(good, tmp_path, "t")
    # pandas writes the CSV in chunks; the last row fails after earlier chunks hit the disk
    bad = pd.DataFrame({"a": [*range(300_000), _Boom()]})
    with pytest.raises(OSError, match="disk full"):
        tabs.write_table(bad, tmp_path, "t")
    assert pd.read_csv(tmp_path / "t.csv")["a"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]  # no temporary left

    from rank1_core.report.figures import _save
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1], [0, 1])
    png = _save(fig, tmp_path / "f.png", 40)
    before = png.read_bytes()
    assert before[:4] == b"\x89PNG"
    fig.subplots().set_title("$\\notacommand$")  # mathtext fails while drawing, after the file opened
    with pytest.raises(ValueError):
        _save(fig, png, 40)
    assert png.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "config.json").write_text('{"new": true}')
            (d / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == "{}"
    with atomic_dir(out) as d:
        (d / "w.bin").write_bytes(b"new")
    assert [p.name for p in out.iterdir()] == ["w.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # neither the temp nor the old folder left

