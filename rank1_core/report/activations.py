"""Streaming passes over the activation Parquet for the dashboards and Figure 3.

- histograms of every feature over the first `sample_tokens` tokens (dense adapter and
  neuron columns over every token; sparse SAE and transcoder features over the tokens where
  they fire),
  with fixed per-feature bin edges (from topk's stats, else a min/max pass);
- the per-feature sum of SAE activations over the same sample (Figure 3's densities);
- whole-trace windows: the tokens of chosen documents and each feature's values on them,
  read in one pass that skips every file without a wanted document.

Nothing here holds a whole activation table in memory: files are read one at a time,
dense columns in row chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from rank1_core.report.loaders import RunInputs

CHUNK = 16_384


@dataclass
class Histograms:
    """Fixed-range histograms of many features: counts[i] over `bins` between lo[i], hi[i]."""

    lo: np.ndarray
    hi: np.ndarray
    bins: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lo = np.asarray(self.lo, dtype=np.float64)
        self.hi = np.asarray(self.hi, dtype=np.float64)
        same = ~(self.hi > self.lo)
        self.lo = np.where(same, self.lo - 0.5, self.lo)
        self.hi = np.where(same, self.hi + 0.5, self.hi)
        self.counts = np.zeros((len(self.lo), self.bins), dtype=np.int64)

    def _bin(self, rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
        t = (vals - self.lo[rows]) / (self.hi[rows] - self.lo[rows])
        return np.clip(np.floor(t * self.bins), 0, self.bins - 1).astype(np.int64)

    def add_dense(self, x: np.ndarray) -> None:
        """x: (tokens, features) in the order of lo/hi; NaNs are skipped."""
        n = x.shape[1]
        rows = np.broadcast_to(np.arange(n), x.shape)
        ok = np.isfinite(x)
        b = self._bin(rows[ok], x[ok].astype(np.float64))
        flat = rows[ok] * self.bins + b
        self.counts += np.bincount(flat, minlength=n * self.bins).reshape(n, self.bins)

    def add_sparse(self, rows: np.ndarray, vals: np.ndarray) -> None:
        ok = np.isfinite(vals)
        rows, vals = rows[ok], vals[ok].astype(np.float64)
        flat = rows * self.bins + self._bin(rows, vals)
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def edges(self, i: int) -> np.ndarray:
        return np.linspace(self.lo[i], self.hi[i], self.bins + 1)


def _dense_chunks(inputs: RunInputs, stage: str, rel_dir: str, columns: Sequence[str],
                  max_rows: int) -> Iterator[np.ndarray]:
    read = 0
    for t in inputs.iter_parts(stage, rel_dir, columns=list(columns)):
        if max_rows and read >= max_rows:
            return
        if max_rows:
            t = t.slice(0, max_rows - read)
        read += t.num_rows
        for s in range(0, t.num_rows, CHUNK):
            part = t.slice(s, CHUNK)
            yield np.column_stack([part.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                                   for c in columns]) if columns else np.zeros((part.num_rows, 0))


def dense_histograms(inputs: RunInputs, stage: str, rel_dir: str, columns: Sequence[str],
                     lo: np.ndarray, hi: np.ndarray, bins: int, max_rows: int) -> tuple[Histograms, int]:
    """Histograms of dense feature columns over the first `max_rows` tokens (0: all).
    NaN in lo/hi (no stats for that feature): a min/max pass over the same tokens first."""
    lo, hi = np.asarray(lo, dtype=np.float64).copy(), np.asarray(hi, dtype=np.float64).copy()
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        mn = np.full(len(columns), np.inf)
        mx = np.full(len(columns), -np.inf)
        for x in _dense_chunks(inputs, stage, rel_dir, columns, max_rows):
            mn = np.fmin(mn, np.nanmin(x, axis=0, initial=np.inf))
            mx = np.fmax(mx, np.nanmax(x, axis=0, initial=-np.inf))
        lo = np.where(np.isfinite(lo), lo, np.where(np.isfinite(mn), mn, 0.0))
        hi = np.where(np.isfinite(hi), hi, np.where(np.isfinite(mx), mx, 0.0))
    h = Histograms(lo, hi, bins)
    n = 0
    for x in _dense_chunks(inputs, stage, rel_dir, columns, max_rows):
        h.add_dense(x)
        n += x.shape[0]
    return h, n


@dataclass
class SparseSample:
    """What one pass over the SAE's sparse feature Parquet gives."""

    hist: Histograms
    sums: np.ndarray
    """Per feature: the sum of its activations over the sample (Figure 3)."""
    fired: np.ndarray
    """Per feature: tokens where it fired in the sample."""
    tokens: int
    """Distinct tokens in the sample that had any feature firing."""


def sae_sample(inputs: RunInputs, index: Sequence[int], lo: np.ndarray, hi: np.ndarray, bins: int,
               max_tokens: int, stage: str = "sae", rel_dir: str = "features") -> SparseSample:
    """Sparse features (by index, in `index` order) over the first `max_tokens` tokens of
    `<stage>/<rel_dir>` (sae/features, or transcoder_extract/features: the same layout;
    files in order; a token counts once however many features fire)."""
    index = np.asarray(index, dtype=np.int64)
    pos_of = np.full(int(index.max(initial=-1)) + 1, -1, dtype=np.int64)
    pos_of[index] = np.arange(len(index))
    lo, hi = np.asarray(lo, dtype=np.float64).copy(), np.asarray(hi, dtype=np.float64).copy()
    tables: list[pa.Table] = []
    tokens = 0

    def sample() -> Iterator[pa.Table]:
        nonlocal tokens
        for t in inputs.iter_parts(stage, rel_dir, columns=["doc_id", "pos", "feature", "value"]):
            if max_tokens and tokens >= max_tokens:
                return
            key = t.column("doc_id").to_numpy().astype(np.int64) * (1 << 24) + t.column("pos").to_numpy()
            uniq, first = np.unique(key, return_index=True)
            if max_tokens and tokens + len(uniq) > max_tokens:
                keep = np.isin(key, uniq[np.argsort(first)][: max_tokens - tokens])
                t = t.filter(pa.array(keep))
                uniq = uniq[np.isin(uniq, key[keep])]
            tokens += len(uniq)
            yield t

    need_range = not (np.isfinite(lo).all() and np.isfinite(hi).all())
    src = list(sample()) if need_range else sample()
    if need_range:
        tables = src
        mn = np.full(len(index), np.inf)
        mx = np.full(len(index), -np.inf)
        for t in tables:
            f = t.column("feature").to_numpy().astype(np.int64)
            v = t.column("value").to_numpy().astype(np.float64)
            ok = (f < len(pos_of)) & (f >= 0)
            rows = np.where(ok, pos_of[np.clip(f, 0, len(pos_of) - 1)], -1)
            m = rows >= 0
            np.fmin.at(mn, rows[m], v[m])
            np.fmax.at(mx, rows[m], v[m])
        lo = np.where(np.isfinite(lo), lo, np.where(np.isfinite(mn), np.minimum(mn, 0.0), 0.0))
        hi = np.where(np.isfinite(hi), hi, np.where(np.isfinite(mx), mx, 1.0))
    h = Histograms(lo, hi, bins)
    sums = np.zeros(len(index))
    fired = np.zeros(len(index), dtype=np.int64)
    for t in src:
        f = t.column("feature").to_numpy().astype(np.int64)
        v = t.column("value").to_numpy().astype(np.float64)
        ok = (f < len(pos_of)) & (f >= 0)
        rows = np.where(ok, pos_of[np.clip(f, 0, len(pos_of) - 1)], -1)
        m = rows >= 0
        h.add_sparse(rows[m], v[m])
        sums += np.bincount(rows[m], weights=v[m], minlength=len(index))
        fired += np.bincount(rows[m], minlength=len(index))
    return SparseSample(h, sums, fired, tokens)


# --------------------------------------------------------------------------- traces


@dataclass
class Window:
    """The part of a document shown as a feature's whole trace."""

    doc: int
    start: int
    end: int
    hit: int
    total: int


def read_doc_tokens(inputs: RunInputs, docs: Iterable[int]) -> dict[int, list[str]]:
    """doc_id -> its tokens in position order, from extract/tokens (token strings, or
    '#<id>' where only token ids were stored)."""
    schema = inputs.parts_schema("extract", "tokens")
    if schema is None:
        return {}
    text_col = "token" if "token" in schema.names else "token_id"
    pieces: dict[int, list[tuple[np.ndarray, list]]] = {}
    for t in inputs.parts_where("extract", "tokens", "doc_id", docs, ["doc_id", "pos", text_col]):
        d = t.column("doc_id").to_numpy()
        p = t.column("pos").to_numpy()
        txt = t.column(text_col).to_pylist()
        if text_col == "token_id":
            txt = [f"#{x}" for x in txt]
        for doc in np.unique(d):
            m = np.nonzero(d == doc)[0]
            pieces.setdefault(int(doc), []).append((p[m], [txt[i] for i in m]))
    out = {}
    for doc, parts in pieces.items():
        pos = np.concatenate([a for a, _ in parts])
        toks = [x for _, b in parts for x in b]
        order = np.argsort(pos, kind="stable")
        n = int(pos.max()) + 1 if len(pos) else 0
        seq = [""] * n
        for i in order:
            seq[int(pos[i])] = toks[i]
        out[doc] = seq
    return out


def window_for(doc: int, hit: int, total: int, max_tokens: int) -> Window:
    if total <= max_tokens:
        return Window(doc, 0, total, hit, total)
    start = min(max(0, hit - max_tokens // 2), total - max_tokens)
    return Window(doc, start, start + max_tokens, hit, total)


def dense_window_values(inputs: RunInputs, stage: str, rel_dir: str,
                        windows: dict[str, Window]) -> dict[str, np.ndarray]:
    """Each feature (a dense column named by its key) on its window, in one pass."""
    out = {k: np.zeros(w.end - w.start, dtype=np.float32) for k, w in windows.items()}
    by_doc: dict[int, list[str]] = {}
    for k, w in windows.items():
        by_doc.setdefault(w.doc, []).append(k)
    schema = inputs.parts_schema(stage, rel_dir)
    if schema is None:
        return out
    cols = sorted({k for k in windows if k in schema.names})
    for t in inputs.parts_where(stage, rel_dir, "doc_id", by_doc, ["doc_id", "pos", *cols]):
        d = t.column("doc_id").to_numpy()
        p = t.column("pos").to_numpy().astype(np.int64)
        for doc in np.unique(d):
            m = d == doc
            for k in by_doc.get(int(doc), []):
                if k not in t.column_names:
                    continue
                w = windows[k]
                sel = m & (p >= w.start) & (p < w.end)
                out[k][p[sel] - w.start] = t.column(k).to_numpy(zero_copy_only=False)[sel]
    return out


def sae_window_values(inputs: RunInputs, windows: dict[str, Window], index: dict[str, int],
                      stage: str = "sae", rel_dir: str = "features") -> dict[str, np.ndarray]:
    """Each sparse feature (key -> its index) on its window, from `<stage>/<rel_dir>`."""
    out = {k: np.zeros(w.end - w.start, dtype=np.float32) for k, w in windows.items()}
    want: dict[tuple[int, int], str] = {(w.doc, index[k]): k for k, w in windows.items() if k in index}
    docs = {d for d, _ in want}
    wanted = np.array([(d << 32) | f for d, f in want], dtype=np.int64)
    for t in inputs.parts_where(stage, rel_dir, "doc_id", docs, ["doc_id", "pos", "feature", "value"]):
        d = t.column("doc_id").to_numpy()
        p = t.column("pos").to_numpy().astype(np.int64)
        f = t.column("feature").to_numpy()
        v = t.column("value").to_numpy()
        keys = (d.astype(np.int64) << 32) | f.astype(np.int64)
        hits = np.nonzero(np.isin(keys, wanted))[0]
        for i in hits:
            k = want[(int(d[i]), int(f[i]))]
            w = windows[k]
            if w.start <= p[i] < w.end:
                out[k][p[i] - w.start] = v[i]
    return out
