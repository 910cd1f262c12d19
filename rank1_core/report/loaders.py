"""Read whatever a run's stages have left; record what is missing instead of failing.

Every reader takes the stage's name and the file inside it, checks that the stage is done
(its `_SUCCESS` marker exists), that the file exists and that it has the columns the report
needs. When any of that fails the reader returns None and records a :class:`Missing` entry
naming the item of the report that cannot be drawn and why, so `rank1 report` renders what
exists and lists the rest. All I/O goes through the run's pyarrow filesystem (local or URI).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rank1_core.rundir import RunDir, StageDir
from rank1_core.stages import REPORT_INPUTS

UPSTREAM = REPORT_INPUTS  # the stages whose outputs the report reads, in the status table's order
SOURCES = ("adapter", "neuron", "sae", "transcoder")
TRANSCODER_STAGES = ("transcoder", "transcoder_extract", "transcoder_eval")
# Groups of stages not every run has: when no stage of a group was ever started, the group is
# left out of the status table and the report says nothing about it; once one started, all
# of its stages are listed like any other (and what the others would give is "not rendered").
OPTIONAL_GROUPS = (TRANSCODER_STAGES,)
# Sparse feature sources: (stage, folder) of their doc_id, pos, feature, value Parquet.
SPARSE_STORE = {"sae": ("sae", "features"), "transcoder": ("transcoder_extract", "features")}


@dataclass(frozen=True)
class Missing:
    """One item of the report that could not be rendered, and why."""

    what: str
    why: str


def sae_name(idx: int) -> str:
    return f"F{int(idx):05d}"


def feature_key(source: str, feature: Any) -> str:
    """One spelling per feature across stages: adapter 'L03_gate_proj', neuron 'N03_0012',
    SAE and transcoder 'F00012' (a sparse feature given as an index, int or digits, becomes
    its name; topk's SQL prints both sparse sources as 'F%05d' of the global index, and a
    transcoder feature's index is layer * d_latent + latent)."""
    if source in SPARSE_STORE:
        if isinstance(feature, (int, np.integer)):
            return sae_name(feature)
        s = str(feature)
        if s.isdigit():
            return sae_name(int(s))
        return s
    return str(feature)


def sae_index(key: str) -> Optional[int]:
    """The index of a sparse (SAE or transcoder) feature key 'F00012' -> 12."""
    m = re.fullmatch(r"F(\d+)", key)
    return int(m.group(1)) if m else None


sparse_index = sae_index


class RunInputs:
    """Reader over one run directory that remembers what it could not find."""

    def __init__(self, run: RunDir):
        self.run = run
        self.status: dict[str, str] = run.status()
        self.missing: list[Missing] = []

    # ---- bookkeeping -----------------------------------------------------------------

    def miss(self, what: str, why: str) -> None:
        m = Missing(what, why)
        if m not in self.missing:
            self.missing.append(m)

    def done(self, stage: str) -> bool:
        return self.status.get(stage) == "done"

    def stage(self, name: str) -> StageDir:
        return self.run.stage(name)

    def stage_state(self, stage: str) -> str:
        """'done', 'partial' (started, not finished) or 'missing' (never started)."""
        return self.status.get(stage, "missing")

    def need(self, stage: str, what: str) -> Optional[StageDir]:
        """The stage's folder if it is done, else None with a Missing entry for `what`."""
        state = self.stage_state(stage)
        if state == "done":
            return self.stage(stage)
        why = (f"stage '{stage}' has not finished (partial output in {self.stage(stage).uri})"
               if state == "partial" else f"stage '{stage}' has not run")
        self.miss(what, why)
        return None

    def started(self, stage: str) -> bool:
        """The stage has run or is running (done or partial)."""
        return self.stage_state(stage) != "missing"

    def exists(self, stage: str, rel: str) -> bool:
        return self.done(stage) and self.stage(stage).exists(rel)

    # ---- readers ---------------------------------------------------------------------

    def schema(self, stage: str, rel: str) -> Optional[pa.Schema]:
        st = self.stage(stage)
        with st.fs.open_input_file(st.path(rel)) as f:
            return pq.read_schema(f)

    def table(self, stage: str, rel: str, what: str, columns: Iterable[str] = (),
              optional: Iterable[str] = (), all_columns: bool = False) -> Optional[pd.DataFrame]:
        """One Parquet file as a DataFrame with `columns` (required) and whichever of
        `optional` exist (`all_columns`: every column), or None with a Missing entry."""
        st = self.need(stage, what)
        if st is None:
            return None
        if not st.exists(rel):
            self.miss(what, f"{stage}/{rel} does not exist")
            return None
        try:
            schema = self.schema(stage, rel)
        except (OSError, pa.ArrowInvalid) as e:
            self.miss(what, f"{stage}/{rel} is not readable Parquet ({e})")
            return None
        names = set(schema.names)
        columns = list(columns)
        lacking = [c for c in columns if c not in names]
        if lacking:
            self.miss(what, f"{stage}/{rel} lacks column(s) {', '.join(lacking)} (has {', '.join(schema.names)})")
            return None
        cols = None if all_columns else columns + [c for c in optional if c in names and c not in columns]
        with st.fs.open_input_file(st.path(rel)) as f:
            return pq.read_table(f, columns=cols).to_pandas()

    def part_files(self, stage: str, rel_dir: str) -> list[str]:
        """Parquet files of a folder of parts (sorted; hidden and `_` files skipped)."""
        if not self.done(stage):
            return []
        st = self.stage(stage)
        sel = pafs.FileSelector(st.path(rel_dir), allow_not_found=True, recursive=True)
        files = [i.path for i in st.fs.get_file_info(sel)
                 if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                 and not i.base_name.startswith((".", "_"))]
        return sorted(files)

    def parts_schema(self, stage: str, rel_dir: str) -> Optional[pa.Schema]:
        files = self.part_files(stage, rel_dir)
        if not files:
            return None
        fs = self.stage(stage).fs
        with fs.open_input_file(files[0]) as f:
            return pq.read_schema(f)

    def iter_parts(self, stage: str, rel_dir: str, columns: Optional[list[str]] = None,
                   max_files: Optional[int] = None) -> Iterator[pa.Table]:
        fs = self.stage(stage).fs
        for i, path in enumerate(self.part_files(stage, rel_dir)):
            if max_files is not None and i >= max_files:
                return
            with fs.open_input_file(path) as f:
                yield pq.read_table(f, columns=columns)

    def parts_where(self, stage: str, rel_dir: str, key: str, values: Iterable[Any],
                    columns: list[str]) -> Iterator[pa.Table]:
        """Rows of every part whose `key` is in `values` (only the columns asked for); a file
        is skipped after reading `key` alone when it holds none of them."""
        want = pa.array(sorted(set(values)))
        if len(want) == 0:
            return
        fs = self.stage(stage).fs
        for path in self.part_files(stage, rel_dir):
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                keys = pf.read(columns=[key]).column(key)
                mask = pc.is_in(keys, value_set=want.cast(keys.type))
                if not pc.any(mask).as_py():
                    continue
                t = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
                yield t.filter(mask)

    def json(self, stage: str, rel: str, what: str) -> Any:
        st = self.need(stage, what)
        if st is None:
            return None
        if not st.exists(rel):
            self.miss(what, f"{stage}/{rel} does not exist")
            return None
        try:
            return json.loads(st.read_text(rel))
        except ValueError as e:
            self.miss(what, f"{stage}/{rel} is not valid JSON ({e})")
            return None

    def text(self, stage: str, rel: str) -> Optional[str]:
        if not self.exists(stage, rel):
            return None
        return self.stage(stage).read_text(rel)

    def manifest(self, stage: str) -> dict:
        if self.stage_state(stage) == "missing":
            return {}
        try:
            return self.stage(stage).manifest()
        except Exception:  # noqa: BLE001 - a partial stage has no manifest
            return {}


def stage_rows(inputs: RunInputs) -> list[dict]:
    """One row per upstream stage: its state, when it finished, how long it took."""
    rows = []
    unused = {s for g in OPTIONAL_GROUPS if not any(inputs.started(x) for x in g) for s in g}
    for name in UPSTREAM:
        if name in unused:
            continue
        state = inputs.stage_state(name)
        m = inputs.manifest(name) if state == "done" else {}
        rows.append({"stage": name, "state": state, "config_hash": m.get("config_hash", ""),
                     "seconds": m.get("seconds"), "finished_at": m.get("finished_at"),
                     "rows": m.get("rows", {}), "extra": m.get("extra", {})})
    return rows
