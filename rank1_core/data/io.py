"""Reading tabular input (Parquet, JSONL, JSON, CSV, or a hub dataset id) with row checks.

Every reader returns plain dict rows. Malformed input raises :class:`DataError` naming the
file and the row (1-based, as a person counts lines), or, with ``bad_rows="skip"``, is
skipped and counted by the caller's `Skipped` tally. Nothing is ever silently coerced.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable


class DataError(ValueError):
    """Input data is malformed; the message names the file and row."""


@dataclass
class Skipped:
    """Rows skipped under `bad_rows: skip`, by reason (recorded in manifests)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _resolve(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted([*p.rglob("*.parquet"), *p.rglob("*.jsonl"), *p.rglob("*.json"), *p.rglob("*.csv")])
        if not files:
            raise DataError(f"{p}: directory holds no .parquet/.jsonl/.json/.csv file")
        return files
    if p.exists():
        return [p]
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return _resolve(str(_hub_dataset(path)))
    raise DataError(f"{path}: no such file")


def _hub_dataset(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, repo_type="dataset"))
    except Exception as e:
        raise DataError(
            f"dataset {repo!r} is neither a local file nor in the Hugging Face cache, and could not be "
            f"downloaded ({type(e).__name__}). Download it on a machine with network "
            f"(`huggingface-cli download --repo-type dataset {repo}`) or point the config at a local "
            "Parquet/JSONL file."
        ) from None


def _read_file(p: Path) -> list[dict]:
    suffix = p.suffix.lower()
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:
            raise DataError(f"{p}: not a readable Parquet file ({e})") from None
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{p}: row {line}: not valid UTF-8 (byte {e.start})") from None
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: row {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}: row {i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of objects")
        return data
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    raise DataError(f"{p}: unsupported file type {suffix!r} (use .parquet, .jsonl, .json or .csv)")


def read_rows(path: str) -> list[tuple[str, dict]]:
    """Rows of a file, directory or hub dataset, each with its 'file:row' location."""
    out: list[tuple[str, dict]] = []
    for f in _resolve(path):
        rows = _read_file(f)
        out.extend((f"{f}: row {i}", r) for i, r in enumerate(rows, 1))
    if not out:
        raise DataError(f"{path}: holds no rows")
    return out


def check_row(row: dict, where: str, required: dict[str, type], *, nonempty: Iterable[str] = ()) -> dict:
    """Raise DataError naming `where` if a required field is missing, mistyped or empty."""
    for name, tp in required.items():
        if name not in row or row[name] is None:
            raise DataError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], tp):
            raise DataError(f"{where}: field {name!r} should be {tp.__name__}, got {type(row[name]).__name__}")
    for name in nonempty:
        v = row.get(name)
        if isinstance(v, str) and not v.strip():
            raise DataError(f"{where}: field {name!r} is empty")
    return row


def load_checked(path: str, check: Callable[[dict, str], dict], bad_rows: str, skipped: Skipped) -> list[dict]:
    """Read rows and pass each through `check`; by policy raise or skip-and-count bad ones."""
    good = []
    for where, row in read_rows(path):
        try:
            good.append(check(row, where))
        except DataError as e:
            if bad_rows == "error":
                raise
            skipped.add(str(e).split(": ")[-1], where)
    if not good:
        raise DataError(f"{path}: no valid rows ({skipped.total} skipped: {skipped.counts})")
    return good
