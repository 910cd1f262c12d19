"""Run directories: one folder per stage, each with its config, manifest and success marker.

    run/
      prepare/   config.yaml  manifest.json  _SUCCESS  tokens/part-*.parquet ...
      train/     ...

A stage writes its outputs, then `manifest.json`, then `_SUCCESS` last (holding the stage's
config hash). A stage whose `_SUCCESS` holds the current hash is done and is skipped; a
stage without it is partial and its folder is cleared before it runs again, so a crash never
leaves duplicated output behind.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from rank1_core import __version__

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"


class StageNotDone(RuntimeError):
    """A stage needs the output of an upstream stage that has not finished."""


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """('s3://bucket/run' | '/abs/path' | 'rel/path') -> (filesystem, path inside it)."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


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

    @property
    def fs(self) -> pafs.FileSystem:
        return self.run.fs

    @property
    def root(self) -> str:
        return f"{self.run.root}/{self.name}"

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
        """Write atomically where the filesystem allows (local: temp file + rename)."""
        p = self.path(rel)
        parent = p.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, p)
        else:
            with self.fs.open_output_stream(p) as f:
                f.write(text.encode())

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
        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            if info.type == pafs.FileType.Directory:
                st = self.stage(info.base_name)
                out[info.base_name] = "done" if st.is_done() else "partial"
        return out


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


def run_stage(stage: StageDir, config_hash: str, config_yaml: str, body, *, force: bool = False,
              resumable: bool = False, log=print) -> dict:
    """Run `body(StageRun)` unless the stage is done with this hash; write manifest + marker.

    A partial stage is cleared first, unless `resumable` (the stage keeps checkpoints and
    resumes from them; it must then make its own outputs idempotent) and the partial
    folder was started with the same config hash. Returns the manifest (the existing one
    when skipped).
    """
    if not force and stage.is_done(config_hash):
        log(f"[{stage.name}] done already (config {config_hash}); skipping. Use --force to redo.")
        return stage.manifest()
    if stage.exists(SUCCESS):
        log(f"[{stage.name}] config changed (was {stage.done_hash()}, now {config_hash}); redoing")
    partial_hash = stage.read_text(".started").strip() if stage.exists(".started") else None
    if resumable and not force and not stage.exists(SUCCESS) and partial_hash == config_hash:
        log(f"[{stage.name}] resuming a partial run (config {config_hash})")
        if stage.exists(MANIFEST):
            stage.fs.delete_file(stage.path(MANIFEST))
    else:
        stage.clear()
    stage.write_text(".started", config_hash + "\n")
    stage.write_text(CONFIG, config_yaml)
    sr = StageRun(stage=stage, config_hash=config_hash)
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
    stage.write_json(MANIFEST, manifest)
    stage.write_text(SUCCESS, config_hash + "\n")  # last: marks the stage complete
    log(f"[{stage.name}] finished in {manifest['seconds']:.1f}s; rows {sr.rows}")
    return manifest
