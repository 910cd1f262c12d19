"""Reading tabular input (Parquet, JSONL, JSON, CSV, or a hub dataset id) with row checks.

Every reader returns plain dict rows. Malformed input raises :class:`DataError` naming the
file and the row (1-based, as a person counts lines), or, with ``bad_rows="skip"``, is
skipped and counted by the caller's `Skipped` tally. Nothing is ever silently coerced.

A row that cannot even be read (bad UTF-8, bad JSON, not an object) is a row error like any
other, so the policy applies to it: JSONL is split on b"\\n" and each line decoded on its
own; a JSON list or CSV file is decoded with its bad bytes kept aside (surrogateescape) and a
row holding any is the bad one; a Parquet string cell that is not UTF-8 marks its row. A
file that cannot be split into rows at all (not JSON, not Parquet, empty) stops with an error
under either policy.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union


class DataError(ValueError):
    """Input data is malformed; the message names the file and row. `reason`: the kind of
    problem without the place (the key rows skipped under `bad_rows: skip` are counted by)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message.split(": ")[-1]


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


Row = Union[dict, DataError]
"""A row as read: its fields, or the DataError saying why it could not be read."""

_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, kept by surrogateescape


def _bad_utf8(value) -> bool:
    if isinstance(value, str):
        return _BAD_BYTE.search(value) is not None
    if isinstance(value, dict):
        return any(_bad_utf8(k) or _bad_utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_bad_utf8(v) for v in value)
    return False


def _checked_object(p: Path, i: int, row) -> Row:
    """A row of a JSON list or CSV file: a dict with UTF-8 text, or the DataError of row i."""
    if not isinstance(row, dict):
        return DataError(f"{p}: row {i}: expected a JSON object, got {type(row).__name__}",
                         reason="not a JSON object")
    for k, v in row.items():
        if _bad_utf8(k) or _bad_utf8(v):
            return DataError(f"{p}: row {i}: field {k!r} is not valid UTF-8", reason="not valid UTF-8")
    return row


def _read_jsonl(p: Path) -> list[tuple[int, Row]]:
    rows: list[tuple[int, Row]] = []
    for i, raw in enumerate(p.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((i, DataError(f"{p}: row {i}: not valid UTF-8 (byte {e.start} of the row)",
                                      reason="not valid UTF-8")))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((i, DataError(f"{p}: row {i}: not valid JSON ({e.msg})", reason="not valid JSON")))
            continue
        rows.append((i, _checked_object(p, i, row)))
    return rows


def _read_parquet(p: Path) -> list[tuple[int, Row]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:
        raise DataError(f"{p}: not a readable Parquet file ({e})") from None
    try:
        return list(enumerate(table.to_pylist(), 1))
    except UnicodeDecodeError:
        pass
    # Some string cell is not UTF-8: convert column by column, cell by cell where needed, and
    # replace each row holding such a cell by its error.
    import pyarrow as pa

    cols, bad = {}, {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            raw = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()).to_pylist()
            vals = []
            for i, v in enumerate(raw):
                try:
                    vals.append(None if v is None else v.decode("utf-8"))
                except UnicodeDecodeError as e:
                    vals.append(None)
                    bad.setdefault(i, DataError(f"{p}: row {i + 1}: column {name!r} is not valid UTF-8 "
                                                f"(byte {e.start} of {v[:40]!r})", reason="not valid UTF-8"))
            cols[name] = vals
            continue
        try:
            cols[name] = col.to_pylist()
        except UnicodeDecodeError:  # strings nested in lists or structs: cell by cell
            vals = []
            for i in range(len(col)):
                try:
                    vals.append(col.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError:
                    vals.append(None)
                    bad.setdefault(i, DataError(f"{p}: row {i + 1}: column {name!r} holds text that is not valid "
                                                "UTF-8", reason="not valid UTF-8"))
            cols[name] = vals
    names = table.column_names
    return [(i + 1, bad[i] if i in bad else {n: cols[n][i] for n in names}) for i in range(table.num_rows)]


def _read_file(p: Path) -> list[tuple[int, Row]]:
    """(row number, row) of one file, numbered from 1 (JSONL: the line); a row that cannot be
    read is its DataError (the caller's policy decides); a file that cannot be read raises."""
    suffix = p.suffix.lower()
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    if suffix == ".parquet":
        return _read_parquet(p)
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix not in (".json", ".csv"):
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .parquet, .jsonl, .json or .csv)")
    text = p.read_bytes().decode("utf-8", errors="surrogateescape")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of objects")
        return [(i, _checked_object(p, i, r)) for i, r in enumerate(data, 1)]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames and _bad_utf8(reader.fieldnames):
        raise DataError(f"{p}: the header row is not valid UTF-8")
    return [(i, _checked_object(p, i, r)) for i, r in enumerate(reader, 1)]


def read_rows(path: str) -> list[tuple[str, Row]]:
    """Rows of a file, directory or hub dataset, each with its 'file:row' location (a row that
    could not be read is the DataError saying why)."""
    out: list[tuple[str, Row]] = []
    for f in _resolve(path):
        out.extend((f"{f}: row {i}", r) for i, r in _read_file(f))
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
            if isinstance(row, DataError):
                raise row
            good.append(check(row, where))
        except DataError as e:
            if bad_rows == "error":
                raise
            skipped.add(e.reason, where)
    if not good:
        raise DataError(f"{path}: no valid rows ({skipped.total} skipped: {skipped.counts})")
    return good
