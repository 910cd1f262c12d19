"""A persistent, content-addressed cache of LLM requests and their answers.

The key is the SHA-256 of the request's canonical JSON: provider, model, every generation
parameter, the response schema and the messages. It never holds an API key or a server
address (a local server gets a new port each start; its answers stay valid). One JSON file per
entry, ``<root>/<key[:2]>/<key>.json``, written atomically, so concurrent writers (several
actors) and a crash mid-write never leave a torn entry. The root is a local path or any
pyarrow filesystem URI (s3://, gs://) so every node of a cluster can share it.

Only answers that came back are stored; errors are not, so a rerun tries them again. An
entry holds what the answer cost and which stage attempt paid for it (``paid_by``): it is
that payment's record, which a stage killed before logging the call recovers on resume. An
answer its task's parser rejected is stored marked ``unparsable`` as that record only: the
worker never serves it, so a rerun asks again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from rank1_core.rundir import write_bytes_atomic


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(payload: dict) -> str:
    """SHA-256 hex of the canonical JSON of a request payload."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class ResponseCache:
    """``get(key)`` -> stored dict or None; ``put(key, entry)``; entries are JSON objects."""

    def __init__(self, root: str) -> None:
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.root = self.root.rstrip("/")
            self.local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(root).expanduser().resolve())
            self.local = True
        self.fs.create_dir(self.root, recursive=True)
        self.uri = root

    def _path(self, key: str) -> str:
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a hex digest, got {key!r}")
        return f"{self.root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.read()
        except (FileNotFoundError, OSError):
            return None
        try:
            entry = json.loads(data)
        except json.JSONDecodeError:
            return None  # a foreign or damaged file: treat as a miss, it will be overwritten
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def put(self, key: str, entry: dict) -> None:
        entry = {**entry, "key": key, "stored_at": time.time()}
        write_bytes_atomic(self.fs, self._path(key), canonical_json(entry).encode())

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        sel = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        return sum(1 for i in self.fs.get_file_info(sel)
                   if i.type == pafs.FileType.File and i.base_name.endswith(".json")
                   and not i.base_name.startswith("."))  # not a temp file of an interrupted write
