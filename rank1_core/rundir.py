"""Run directories: one folder per stage, each with its config, manifest and success marker.

    run/
      prepare/   config.yaml  manifest.json  _SUCCESS  tokens/part-*.parquet ...
      train/     ...

A stage writes its outputs, then `manifest.json`, then `_SUCCESS` last (holding the stage's
config hash). A stage whose `_SUCCESS` holds the current hash is done and is skipped; a
stage without it is partial and its folder is cleared before it runs again, so a crash never
leaves duplicated output behind.

A finished stage is never cleared to be redone: its new outputs are built beside it, in
`<run>/.staging/<stage>/`, and replace it only once they are complete (`_SUCCESS` written).
A rerun that fails (bad input, a crash, a kill) leaves the finished stage as it was, still
done; a resumable stage picks its staging folder up again on the next run with the same
config. Every file is written to a temporary name and renamed into place (`atomic_output`;
whole folders: `atomic_dir`).

The run directory is a local path or any pyarrow filesystem URI (s3://, gs://, file://,
hdfs://), because on a cluster every node must see it. All I/O goes through
`pyarrow.fs`; libraries that need a local path (torch, transformers) use `local_copy()` /
`upload_dir()`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow.fs as pafs

from rank1_core import __version__

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
STAGING = ".staging"
"""Folder of a run holding the stages being rebuilt beside their finished outputs."""
TMP_PREFIX = ".tmp-"
"""Temporary files are `<folder>/.tmp-<random>-<name>` until renamed onto `<name>`."""


class StageNotDone(RuntimeError):
    """A stage needs the output of an upstream stage that has not finished."""


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """('s3://bucket/run' | '/abs/path' | 'rel/path') -> (filesystem, path inside it)."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_output(fs: pafs.FileSystem, path: str, before_rename=None) -> Iterator[IO[bytes]]:
    """A binary stream to a temporary name beside `path`, renamed onto `path` when the block
    ends without error (and removed when it fails): readers see the old file or the whole new
    one, never a torn one. The one way rank1 writes a file (local or any pyarrow filesystem;
    object stores publish a PUT whole, so the rename there is a copy of a complete object)."""
    folder, base = path.rsplit("/", 1) if "/" in path else (".", path)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{base}"
    try:
        with fs.open_output_stream(tmp) as out:
            yield out
        if before_rename is not None:  # a test hook: the file is complete, not yet in place
            before_rename()
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with atomic_output(fs, path) as out:
        out.write(data)


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table, **write_options) -> None:
    """`pq.write_table(table, ...)` through `atomic_output` (options pass on)."""
    import pyarrow.parquet as pq

    with atomic_output(fs, path) as out:
        pq.write_table(table, out, **write_options)


@contextmanager
def atomic_local_path(path: str | Path) -> Iterator[Path]:
    """For libraries that want a file name (savefig, torch.save, to_csv, save_file): a
    temporary local path beside `path` (same suffix), renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """A local text file, written whole or not at all."""
    with atomic_local_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A local folder written whole or not at all: yields an empty temporary folder beside
    `path` (`.tmp-<random>-<name>`), renamed onto `path` when the block ends without error and
    removed when it fails. An existing `path` is replaced: moved aside, the new folder renamed
    in, the old one removed (readers see the old folder or the whole new one, never a mix).
    For outputs that are folders (a saved model, an adapter, an export)."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, suffix=f"-{path.name}", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f"{TMP_PREFIX}old-{uuid.uuid4().hex[:8]}-{path.name}")
    os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}" if sha else __version__


@dataclass
class StageDir:
    """One stage's folder inside a run directory."""

    run: "RunDir"
    name: str
    folder: str | None = None
    """Folder inside the run when it is not `name` (a stage being rebuilt: `.staging/<name>`)."""

    @property
    def fs(self) -> pafs.FileSystem:
        return self.run.fs

    @property
    def root(self) -> str:
        return f"{self.run.root}/{self.folder or self.name}"

    def staging(self) -> "StageDir":
        """Where this stage's new outputs are built while its finished ones stay in place."""
        return StageDir(self.run, self.name, f"{STAGING}/{self.name}")

    @property
    def uri(self) -> str:
        """Address of the folder that Ray Data / pyarrow / DuckDB readers accept."""
        return self.run.uri_of(self.root)

    def path(self, *parts: str) -> str:
        """Path of an entry of this stage inside the run's filesystem."""
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return self.run.uri_of(self.path(*parts))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self, *parts: str) -> Path:
        """A local path to an entry; only for local run directories."""
        if not self.is_local:
            raise RuntimeError(f"{self.uri} is not on the local filesystem; use local_copy()/upload_dir()")
        return Path(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    # ---- state -----------------------------------------------------------------------

    def done_hash(self) -> str | None:
        if not self.exists(SUCCESS):
            return None
        return self.read_text(SUCCESS).strip() or None

    def is_done(self, config_hash: str | None = None) -> bool:
        h = self.done_hash()
        return h is not None and (config_hash is None or h == config_hash)

    def manifest(self) -> dict:
        if not self.exists(MANIFEST):
            raise StageNotDone(f"stage '{self.name}' has no manifest in {self.uri}: run it first")
        return json.loads(self.read_text(MANIFEST))

    def require_done(self) -> dict:
        """The stage's manifest, or a clear error if it has not finished."""
        if not self.is_done():
            raise StageNotDone(
                f"stage '{self.name}' has not finished in run {self.run.uri} "
                f"(no {SUCCESS} in {self.uri}); run `rank1 {self.name} --config ...` first"
            )
        return self.manifest()

    def clear(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.root)
        self.fs.create_dir(self.root, recursive=True)

    # ---- small files -------------------------------------------------------------------

    def write_text(self, rel: str, text: str) -> None:
        """Write atomically (temp file + rename, `atomic_output`)."""
        write_bytes_atomic(self.fs, self.path(rel), text.encode())

    def write_parquet(self, rel: str, table, **write_options) -> None:
        """A Parquet file of this stage, written atomically (`write_parquet_atomic`)."""
        write_parquet_atomic(self.fs, self.path(rel), table, **write_options)

    def write_dataframe(self, rel: str, df) -> None:
        """A pandas DataFrame as a zstd Parquet file of this stage (no index), atomically."""
        import pyarrow as pa

        self.write_parquet(rel, pa.Table.from_pandas(df, preserve_index=False), compression="zstd")

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    # ---- directories for libraries that need local paths --------------------------------

    def upload_dir(self, local: str | Path, rel: str) -> None:
        """Copy a local directory into this stage (no-op copy when already local)."""
        dest = self.path(rel)
        if self.is_local:
            if Path(dest).resolve() != Path(local).resolve():
                shutil.copytree(local, dest, dirs_exist_ok=True)
            return
        self.fs.create_dir(dest, recursive=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    @contextmanager
    def local_copy(self, rel: str) -> Iterator[Path]:
        """A local path to a directory of this stage (downloaded to a temp dir if remote)."""
        if self.is_local:
            yield self.local_path(rel)
            return
        with tempfile.TemporaryDirectory(prefix="rank1-") as tmp:
            pafs.copy_files(self.path(rel), tmp, source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)


@dataclass
class RunDir:
    """A run directory: `RunDir("runs/demo")` or `RunDir("s3://bucket/runs/demo")`."""

    uri: str
    fs: pafs.FileSystem = field(init=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.fs, self.root = resolve_filesystem(self.uri)
        self.fs.create_dir(self.root, recursive=True)

    def uri_of(self, path: str) -> str:
        if isinstance(self.fs, pafs.LocalFileSystem):
            return path
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{path}"

    def stage(self, name: str) -> StageDir:
        return StageDir(self, name)

    def status(self) -> dict[str, str]:
        """{stage: "done" | "partial"}: done when its folder holds `_SUCCESS` (a rerun being
        built in `.staging/` does not change that); partial when started and not finished."""
        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and not info.base_name.startswith("."):
                st = self.stage(info.base_name)
                out[info.base_name] = "done" if st.is_done() else "partial"
        for name in self.rebuilding():
            out.setdefault(name, "partial")
        return out

    def rebuilding(self) -> list[str]:
        """Stages with a rerun under way (or failed) in `.staging/`, beside their outputs."""
        sel = pafs.FileSelector(f"{self.root}/{STAGING}", allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory and not i.base_name.endswith(".old"))


@dataclass
class StageRun:
    """What a stage's body reports back: row counts, inputs and extras for the manifest."""

    stage: StageDir
    config_hash: str
    inputs: dict[str, dict] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def use(self, upstream: StageDir) -> dict:
        """Declare an upstream stage as input: it must be done; its manifest is recorded."""
        m = upstream.require_done()
        self.inputs[upstream.name] = {"config_hash": m["config_hash"], "uri": upstream.uri,
                                      "finished_at": m.get("finished_at")}
        return m

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)


def chained_hash(own: str, upstream: list[StageDir]) -> str:
    """The stage's hash folds in its inputs' hashes: a retrained adapter invalidates extract."""
    import hashlib

    parts = [own] + [f"{u.name}:{u.done_hash() or 'missing'}" for u in upstream]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Rename a folder (one rename on local disks; a copy then delete where the filesystem
    cannot rename folders, as object stores)."""
    try:
        fs.move(src, dst)
    except (OSError, NotImplementedError):
        if isinstance(fs, pafs.LocalFileSystem):
            raise
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)


def _old_path(stage: StageDir) -> str:
    return f"{stage.run.root}/{STAGING}/{stage.name}.old"


def _settle(stage: StageDir) -> None:
    """Finish a publish that a crash cut between its renames (old moved away, new not yet in
    place), and drop the replaced outputs it left behind."""
    new, old = stage.staging(), _old_path(stage)
    if not stage.exists() and new.is_done():
        _move_dir(stage.fs, new.root, stage.root)
    if stage.is_done() and stage.fs.get_file_info(old).type != pafs.FileType.NotFound:
        stage.fs.delete_dir(old)


def _publish(new: StageDir, stage: StageDir) -> None:
    """Replace the stage's folder by its finished rebuild: two renames, then the old is dropped."""
    fs, old = stage.fs, _old_path(stage)
    if fs.get_file_info(old).type != pafs.FileType.NotFound:
        fs.delete_dir(old)
    if stage.exists():
        _move_dir(fs, stage.root, old)
    _move_dir(fs, new.root, stage.root)
    if fs.get_file_info(old).type != pafs.FileType.NotFound:
        fs.delete_dir(old)


def run_stage(stage: StageDir, config_hash: str, config_yaml: str, body, *, force: bool = False,
              resumable: bool = False, log=print) -> dict:
    """Run `body(StageRun)` unless the stage is done with this hash; write manifest + marker.

    A stage that is not done runs in its own folder, cleared first unless `resumable` (the
    stage keeps checkpoints and resumes from them; it must then make its own outputs
    idempotent) and the partial folder was started with the same config hash. A stage that
    is done (with another hash, or `force`) is rebuilt in `stage.staging()` and replaces the
    finished folder only when the body has succeeded: a failed rerun leaves it done.
    `body` writes to `sr.stage`, which is the folder being built. Returns the manifest (the
    existing one when skipped).
    """
    _settle(stage)
    if not force and stage.is_done(config_hash):
        log(f"[{stage.name}] done already (config {config_hash}); skipping. Use --force to redo.")
        return stage.manifest()
    if stage.is_done():
        if stage.done_hash() != config_hash:
            log(f"[{stage.name}] config changed (was {stage.done_hash()}, now {config_hash}); redoing "
                f"beside the finished outputs, which stay until the new ones are complete")
        work = stage.staging()
    else:
        work = stage
        if stage.staging().exists():  # a rebuild of a stage that is no longer done: stale
            stage.fs.delete_dir(stage.staging().root)
    partial_hash = work.read_text(".started").strip() if work.exists(".started") else None
    if resumable and not force and not work.exists(SUCCESS) and partial_hash == config_hash:
        log(f"[{stage.name}] resuming a partial run (config {config_hash})")
        if work.exists(MANIFEST):
            work.fs.delete_file(work.path(MANIFEST))
    else:
        work.clear()
    work.write_text(".started", config_hash + "\n")
    work.write_text(CONFIG, config_yaml)
    sr = StageRun(stage=work, config_hash=config_hash)
    started = time.time()
    t0 = time.perf_counter()
    body(sr)
    manifest = {
        "stage": stage.name,
        "config_hash": config_hash,
        "code_version": code_version(),
        "host": socket.gethostname(),
        "started_at": started,
        "finished_at": time.time(),
        "seconds": round(time.perf_counter() - t0, 3),
        "inputs": sr.inputs,
        "rows": sr.rows,
        "timings": sr.timings,
        **({"extra": sr.extra} if sr.extra else {}),
    }
    work.write_json(MANIFEST, manifest)
    work.write_text(SUCCESS, config_hash + "\n")  # last: marks the stage complete
    if work is not stage:
        _publish(work, stage)
    log(f"[{stage.name}] finished in {manifest['seconds']:.1f}s; rows {sr.rows}")
    return manifest
