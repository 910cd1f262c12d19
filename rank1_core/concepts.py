"""Ground truth: token-level concept labels, and how well every feature detects each concept.

The synthetic traces *plant* behaviours (hesitations, double-checks, corrected slips, step
results, the final answer) and record where; lexical concepts (word lists, regular
expressions) and SQL concepts work on any data, s1K-1.1 included. With labels on every
token, a feature's meaning is measured instead of asked of an LLM:

- **AUROC** of the feature's activation over all tokens for each concept (both signs for
  adapter components and random directions: the negative sign scores ``-x``, so its AUROC
  is ``1 - AUROC``). Computed from histograms over the leading `hist_bits` bits of each
  float32 value (an order-preserving key), one column at a time, so nothing holds a table
  whole. Pairs of a positive and a negative token in one bin count one half; the exact
  AUROC differs by at most ``auroc_bound = 0.5 * sum_b pos_b * neg_b / (P * N)`` over the
  bins other than the zero bin (zero is one value: its ties are exact), written beside it.
- **Top-k precision**: the share of the feature's top-k contexts (at most `max_per_doc` per
  document, as topk) whose peak token carries the concept; for a concept with fewer than k
  tokens, of its top (token count) contexts, so that a perfect detector scores 1.
- **Best concept** (highest AUROC, over signs, `best_excludes` left out) and a class:
  *clean* (AUROC >= clean_auroc and precision >= clean_precision), *broad* (AUROC >=
  broad_auroc) or *unmatched*.
- **Controls**: random unit directions in the adapter's activation space (a component is a
  unit coordinate direction, so they have the same norm), scored like components
  (source ``random``); and every source scored again against *shuffled labels* (each
  document's labels circularly shifted by a random offset: same counts, same runs).
- **Bootstrap** over documents (documents in `bootstrap_blocks` random blocks, blocks drawn
  with replacement, the same draws for every feature) for the shares of clean / broad /
  unmatched features, each feature keeping its best concept and sign; replicate AUROCs come
  from coarser histograms (about 64 bins), shifted by the fine-minus-coarse difference.

Outputs of the `concepts` stage (`write_*` below; views in `rank1_core.sql`):

- ``labels.parquet`` (LABELS_SCHEMA): doc_id, pos, concept: one row per labelled token.
- ``catalogue.parquet`` (CATALOGUE_SCHEMA): concept, kind (planted | section | lexical |
  sql), definition, n_tokens, n_docs, share, empty (a concept that matched no token: kept,
  marked, not scored).
- ``scores.parquet`` (SCORES_SCHEMA): source, feature, sign, labels (true | shuffled),
  concept, auroc, auroc_bound, precision, n_top.
- ``features.parquet`` (FEATURES_SCHEMA): per source, feature and labels: the best concept,
  its sign, auroc, auroc_bound, precision and class.
- ``summary.parquet`` (SUMMARY_SCHEMA): the objective Figure 2: per source and labels, the
  shares of clean / broad / unmatched features with bootstrap intervals, and the thresholds.
- ``best.parquet`` (BEST_SCHEMA): per concept and source, the best feature with its AUROC,
  beside the best random direction and the best feature under shuffled labels (chance).
- ``explanations.parquet`` (EXPLAIN_SCHEMA, when autointerp ran): for every explained
  feature whose best concept is clean, does its explanation name that concept (`KEYWORDS`)?

No `ray` here.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from rank1_core import concept_kernels as CK
from rank1_core import sql as S
from rank1_core.config import ConceptsConfig
from rank1_core.lexicon import word_pattern
from rank1_core.rundir import RunDir, StageDir, atomic_output

SECTION_CONCEPTS = ("think", "answer")
LABEL_KINDS = ("true", "shuffled")

KEYWORDS: dict[str, list[str]] = {
    "hesitation": ["wait", "hmm", "hesitat", "pause", "uncertain", "reconsider", "doubt"],
    "verification": ["verif", "check", "confirm", "double-check", "re-check", "recheck"],
    "correction": ["correct", "mistake", "error", "wrong", "not right", "fix"],
    "slip_value": ["mistake", "error", "wrong", "incorrect", "slip"],
    "step_result": ["result", "sum", "total", "equals", "intermediate", "after =", "after the equal"],
    "operator": ["operator", "plus", "minus", "addition", "subtraction", "arithmetic sign", "+"],
    "final_answer": ["final answer", "answer", "final result", "conclusion"],
    "think": ["reasoning", "thinking", "thought"],
    "answer": ["answer", "response"],
    "hesitation_word": ["wait", "hmm", "hesitat"],
    "number": ["number", "digit", "numer", "numeral"],
    "newline": ["newline", "new line", "line break"],
    "after_equals": ["equal", "result", "after ="],
}
"""Words an explanation must contain (lower-cased substring) to name a concept; extend or
override with `concepts.keywords`."""

LABELS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("concept", pa.string())])
CATALOGUE_SCHEMA = pa.schema([
    ("concept", pa.string()), ("kind", pa.string()), ("definition", pa.string()), ("n_tokens", pa.int64()),
    ("n_docs", pa.int64()), ("share", pa.float64()), ("empty", pa.bool_()),
])
SCORES_SCHEMA = pa.schema([
    ("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()), ("labels", pa.string()),
    ("concept", pa.string()), ("auroc", pa.float32()), ("auroc_bound", pa.float32()), ("precision", pa.float32()),
    ("n_top", pa.int32()),
])
FEATURES_SCHEMA = pa.schema([
    ("source", pa.string()), ("feature", pa.string()), ("labels", pa.string()), ("concept", pa.string()),
    ("sign", pa.string()), ("auroc", pa.float64()), ("auroc_bound", pa.float64()), ("precision", pa.float64()),
    ("n_top", pa.int32()), ("class", pa.string()),
])
CLASSES = ("clean", "broad", "unmatched")
SUMMARY_SCHEMA = pa.schema(
    [("source", pa.string()), ("labels", pa.string()), ("n_features", pa.int64())]
    + [(f"{c}{s}", pa.float64()) for c in CLASSES for s in ("", "_lo", "_hi")]
    + [("clean_auroc", pa.float64()), ("clean_precision", pa.float64()), ("broad_auroc", pa.float64()),
       ("max_auroc_bound", pa.float64()), ("bootstrap", pa.int32())])
BEST_SCHEMA = pa.schema([
    ("concept", pa.string()), ("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()),
    ("auroc", pa.float64()), ("auroc_bound", pa.float64()), ("precision", pa.float64()),
    ("random_auroc", pa.float64()), ("shuffled_auroc", pa.float64()),
])
EXPLAIN_SCHEMA = pa.schema([
    ("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()), ("model", pa.string()),
    ("concept", pa.string()), ("auroc", pa.float64()), ("explanation", pa.string()), ("copied", pa.bool_()),
    ("names_concept", pa.bool_()),
])


COARSE_BINS = 32
"""Bootstrap histograms: about this many equal-mass bins of all tokens, and of the concept's."""
BLOCK_STRIDE = 2 * COARSE_BINS + 2
"""Cells per bootstrap block in the one (block, coarse bin) histogram of a dense column."""


class ConceptError(ValueError):
    """A concept cannot be labelled (bad query, positions outside the documents, a span
    outside its trace); the message names the concept and the file."""


# --------------------------------------------------------------------------- tokens


@dataclass
class TokenIndex:
    """Every token of the extracted documents in one canonical order: documents by doc_id,
    positions 0..n-1 inside each. Token `i` is (doc_ids[doc[i]], i - starts[doc[i]])."""

    doc_ids: np.ndarray
    """Sorted distinct doc_ids (int64)."""
    starts: np.ndarray
    """First token of each document, plus the total at the end (int64, n_docs + 1)."""

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def doc_of_token(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.doc_ids), dtype=np.int32), self.lengths)

    def ordinals(self, doc_id: np.ndarray) -> np.ndarray:
        """Document ordinal of each doc_id; -1 for a doc_id not in the index."""
        o = np.searchsorted(self.doc_ids, doc_id)
        o = np.minimum(o, len(self.doc_ids) - 1)
        return np.where(self.doc_ids[o] == doc_id, o, -1)

    def index(self, doc_id: np.ndarray, pos: np.ndarray, where: str = "") -> np.ndarray:
        """Token index of each (doc_id, pos); raises ConceptError for one outside the documents."""
        doc_id = np.asarray(doc_id, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int64)
        o = self.ordinals(doc_id)
        bad = (o < 0) | (pos < 0) | (pos >= np.where(o >= 0, self.lengths[np.maximum(o, 0)], 0))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ConceptError(f"{where}: {int(bad.sum())} position(s) outside the documents, e.g. doc_id "
                               f"{int(doc_id[j])} pos {int(pos[j])}")
        return self.starts[o] + pos


def token_index(run: RunDir) -> TokenIndex:
    """The index of `extract/tokens` (every (doc_id, pos) once, positions 0..n-1 per document)."""
    files = S.matching_files(run, *S.VIEWS["tokens"])
    if not files:
        raise ConceptError(f"no token table in {run.stage('extract').uri}/tokens: run the extract stage first")
    t = pq.read_table(files, columns=["doc_id", "pos"], filesystem=run.fs) if len(files) > 1 else \
        pq.read_table(files[0], columns=["doc_id", "pos"], filesystem=run.fs)
    doc = t.column("doc_id").to_numpy().astype(np.int64)
    pos = t.column("pos").to_numpy().astype(np.int64)
    ids, counts = np.unique(doc, return_counts=True)
    maxpos = np.full(len(ids), -1, dtype=np.int64)
    np.maximum.at(maxpos, np.searchsorted(ids, doc), pos)
    if len(doc) == 0:
        raise ConceptError(f"the token table {run.stage('extract').uri}/tokens is empty")
    if (maxpos + 1 != counts).any() or pos.min() < 0:
        j = int(np.flatnonzero(maxpos + 1 != counts)[0]) if (maxpos + 1 != counts).any() else 0
        raise ConceptError(f"{run.stage('extract').uri}/tokens: document {int(ids[j])} does not hold positions "
                           f"0..n-1 exactly once ({int(counts[j])} rows, largest pos {int(maxpos[j])})")
    return TokenIndex(ids, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


# --------------------------------------------------------------------------- labels


@dataclass
class Concept:
    name: str
    kind: str  # planted | section | lexical | sql
    definition: str
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Sorted distinct token indices carrying the concept."""


@dataclass
class Labels:
    """The concepts of a run on its TokenIndex."""

    index: TokenIndex
    concepts: list[Concept]
    messages: list[str] = field(default_factory=list)

    @property
    def scored(self) -> list[Concept]:
        """Concepts with at least one token and at least one token without."""
        return [c for c in self.concepts if 0 < len(c.tokens) < self.index.n]

    def mask(self, concepts: list[Concept]) -> np.ndarray:
        """Bit mask per token, bit j set when the token carries concepts[j]: uint16 for up to
        16 concepts (2 bytes a token), uint32 up to 32, uint64 up to 64."""
        return token_mask(self.index.n, [c.tokens for c in concepts])


def mask_dtype(n_concepts: int) -> type:
    """The smallest unsigned integer with a bit per concept (at most 64 concepts)."""
    if n_concepts > 64:
        raise ConceptError(f"at most 64 scored concepts, got {n_concepts}")
    return np.uint16 if n_concepts <= 16 else np.uint32 if n_concepts <= 32 else np.uint64


def token_mask(n: int, token_lists: list[np.ndarray]) -> np.ndarray:
    """Per token of `n`, bit j set when it is in token_lists[j] (`mask_dtype` wide)."""
    dt = mask_dtype(len(token_lists))
    m = np.zeros(n, dtype=dt)
    for j, toks in enumerate(token_lists):
        m[toks] |= dt(1 << j)
    return m


def mask_bits(m: np.ndarray, n_concepts: int) -> np.ndarray:
    """[len(m), n_concepts] float64 0/1 matrix of the bits of bit masks `m`."""
    dt = m.dtype.type
    return ((m[:, None] >> np.arange(n_concepts, dtype=m.dtype)) & dt(1)).astype(np.float64)


def mask_bit(m: np.ndarray, c: int) -> np.ndarray:
    """Bit `c` of bit masks `m`, as bool."""
    dt = m.dtype.type
    return ((m >> dt(c)) & dt(1)).astype(bool)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for every pair."""
    lens = np.maximum(ends - starts, 0)
    if lens.sum() == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return offs + np.arange(int(lens.sum()), dtype=np.int64)


def planted_concepts(run: RunDir, index: TokenIndex) -> list[Concept]:
    """Concepts from prepare/spans.parquet (sections think/answer and planted spans), on the
    extracted documents; a span outside its document is an error."""
    st = run.stage("prepare")
    if not st.exists("spans.parquet"):
        return []
    path = st.path("spans.parquet")
    t = pq.read_table(path, filesystem=run.fs).to_pandas()
    if t.empty:
        return []
    o = index.ordinals(t["doc_id"].to_numpy(np.int64))
    keep = o >= 0
    t, o = t[keep], o[keep]
    lens = index.lengths[o]
    s, e = t["start"].to_numpy(np.int64), t["end"].to_numpy(np.int64)
    bad = (s < 0) | (e <= s) | (e > lens)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        r = t.iloc[j]
        raise ConceptError(f"{st.uri_of('spans.parquet')}: span of concept {r['concept']!r} in doc {int(r['doc_id'])} "
                           f"(tokens {int(r['start'])}..{int(r['end'])}) lies outside its trace ({int(lens[j])} tokens)")
    out = []
    names = list(dict.fromkeys(t["concept"]))
    # sections first, then the planted concepts in their documented order, then any other
    from rank1_core.data.synthetic import PLANTED_CONCEPTS

    names.sort(key=lambda n: (n not in SECTION_CONCEPTS, PLANTED_CONCEPTS.index(n) if n in PLANTED_CONCEPTS else 99, n))
    base = index.starts[o]
    for name in names:
        sel = (t["concept"] == name).to_numpy()
        toks = np.unique(_ranges(base[sel] + s[sel], base[sel] + e[sel]))
        kind = "section" if name in SECTION_CONCEPTS else "planted"
        out.append(Concept(name, kind, f"prepare/spans.parquet ({'section' if kind == 'section' else 'planted'})",
                           toks))
    return out


def lexical_patterns(cfg: ConceptsConfig) -> list[tuple[str, re.Pattern, str]]:
    out = []
    for lc in cfg.lexical:
        if lc.words:
            pat = word_pattern(lc.words)
            if lc.case_sensitive:
                pat = re.compile(pat.pattern)
            out.append((lc.name, pat, "words: " + ", ".join(lc.words)))
        else:
            pat = re.compile(lc.regex, 0 if lc.case_sensitive else re.IGNORECASE)
            out.append((lc.name, pat, f"regex: {lc.regex}"))
    return out


def lexical_concepts(run: RunDir, index: TokenIndex, cfg: ConceptsConfig) -> list[Concept]:
    """Words / regexes over each document's decoded text: the concatenation of its tokens'
    decoded text (extract/tokens.token), mapped back to the tokens that overlap a match."""
    pats = lexical_patterns(cfg)
    if not pats:
        return []
    found: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in pats}
    for f in S.matching_files(run, *S.VIEWS["tokens"]):
        t = pq.read_table(f, columns=["doc_id", "pos", "token"], filesystem=run.fs).sort_by(
            [("doc_id", "ascending"), ("pos", "ascending")])
        docs = t.column("doc_id").to_numpy()
        toks = t.column("token").to_pylist()
        cut = np.concatenate([[0], np.flatnonzero(np.diff(docs)) + 1, [len(docs)]])
        for a, b in zip(cut[:-1], cut[1:]):
            pieces = [x or "" for x in toks[a:b]]
            text = "".join(pieces)
            ends = np.cumsum([len(p) for p in pieces])
            base = index.starts[index.ordinals(np.array([docs[a]]))[0]]
            for name, pat, _ in pats:
                spans = [(m.start(), m.end()) for m in pat.finditer(text) if m.end() > m.start()]
                if not spans:
                    continue
                sp = np.array(spans, dtype=np.int64)
                first = np.searchsorted(ends, sp[:, 0], side="right")
                last = np.searchsorted(ends, sp[:, 1] - 1, side="right")
                found[name].append(_ranges(base + first, base + last + 1))
    return [Concept(name, "lexical", d, np.unique(np.concatenate(found[name])) if found[name] else
                    np.zeros(0, np.int64)) for name, _, d in pats]


def sql_text(query: str) -> tuple[str, str]:
    """(SQL, file) of a concept query: a name in queries/ or a path to a .sql file."""
    p = Path(query).expanduser()
    if query.endswith(".sql") or "/" in query:
        if not p.exists():
            raise ConceptError(f"{query}: no such SQL file")
        return p.read_text().strip().rstrip(";"), str(p)
    try:
        return S.load_query(query), str(S.query_path(query))
    except S.QueryError as e:
        raise ConceptError(str(e)) from None


def sql_concepts(run: RunDir, index: TokenIndex, cfg: ConceptsConfig) -> list[Concept]:
    """Each SQL concept's query over the run's views; its rows must be (doc_id, pos) of tokens."""
    if not cfg.sql:
        return []
    con = S.connect(run, memory_limit="1GB")
    out = []
    try:
        for sc in cfg.sql:
            sql, where = sql_text(sc.query)
            try:
                t = con.sql(sql).arrow()
            except Exception as e:  # duckdb raises its own error types
                raise ConceptError(f"{where}: SQL concept {sc.name!r} failed: {e}") from None
            t = t.read_all() if hasattr(t, "read_all") else t
            if not {"doc_id", "pos"} <= set(t.column_names):
                raise ConceptError(f"{where}: SQL concept {sc.name!r} must return columns doc_id, pos; got "
                                   f"{t.column_names}")
            doc = t.column("doc_id").to_numpy(zero_copy_only=False)
            pos = t.column("pos").to_numpy(zero_copy_only=False)
            toks = index.index(doc, pos, f"{where}: SQL concept {sc.name!r}") if len(doc) else np.zeros(0, np.int64)
            out.append(Concept(sc.name, "sql", f"sql: {where}", np.unique(toks)))
    finally:
        con.close()
    return out


def build_labels(run: RunDir | str, cfg: ConceptsConfig, log: Callable[[str], None] = print) -> Labels:
    """Every concept of the run (planted and sections when prepare wrote spans, lexical, SQL)."""
    run = run if isinstance(run, RunDir) else RunDir(str(run))
    index = token_index(run)
    concepts = (planted_concepts(run, index) if cfg.planted else []) + lexical_concepts(run, index, cfg) \
        + sql_concepts(run, index, cfg)
    names = [c.name for c in concepts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConceptError(f"concept name(s) {dup} defined twice (prepare/spans.parquet and concepts.lexical / "
                           "concepts.sql): rename the lexical or SQL one")
    labels = Labels(index, concepts)
    for c in concepts:
        if len(c.tokens) == 0:
            msg = f"concept {c.name!r} ({c.definition}) matches no token: marked empty, not scored"
            warnings.warn(msg, stacklevel=2)
            labels.messages.append(msg)
            log(f"[concepts] warning: {msg}")
    return labels


def catalogue_table(labels: Labels) -> pa.Table:
    doc = labels.index.doc_of_token()
    rows = []
    for c in labels.concepts:
        rows.append({"concept": c.name, "kind": c.kind, "definition": c.definition, "n_tokens": len(c.tokens),
                     "n_docs": int(len(np.unique(doc[c.tokens]))), "share": len(c.tokens) / labels.index.n,
                     "empty": len(c.tokens) == 0})
    return pa.Table.from_pylist(rows, schema=CATALOGUE_SCHEMA)


def write_labels(stage: StageDir, labels: Labels) -> int:
    """labels.parquet, one row group per concept; returns the rows written."""
    ix = labels.index
    doc = ix.doc_of_token()
    n = 0
    with atomic_output(stage.fs, stage.path("labels.parquet")) as out, \
            pq.ParquetWriter(out, LABELS_SCHEMA, compression="zstd") as w:
        for c in labels.concepts:
            d = doc[c.tokens]
            w.write_table(pa.table({"doc_id": pa.array(ix.doc_ids[d], pa.int64()),
                                    "pos": pa.array(c.tokens - ix.starts[d], pa.int32()),
                                    "concept": pa.array([c.name] * len(c.tokens), pa.string())},
                                   schema=LABELS_SCHEMA))
            n += len(c.tokens)
    return n


# --------------------------------------------------------------------------- AUROC


def _key_lut(bits: int) -> np.ndarray:
    """Order-preserving key of every `bits`-bit prefix of a float32 bit pattern (bits <= 16):
    negatives reversed below positives; the prefix of -0.0 shares the key of +0.0."""
    if bits not in _KEY_LUTS:
        raw = np.arange(1 << bits, dtype=np.uint32)
        half = np.uint32(1 << (bits - 1))
        key = np.where(raw & half, ~raw & np.uint32((1 << bits) - 1), raw | half)
        key[half] = key[0]
        _KEY_LUTS[bits] = key.astype(np.uint16)
    return _KEY_LUTS[bits]


_KEY_LUTS: dict[int, np.ndarray] = {}


def value_bins(x: np.ndarray, bits: int) -> np.ndarray:
    """Order-preserving histogram bin of each float32 value: its leading `bits` bits after
    mapping the float's bit pattern to an unsigned key that sorts like the float. -0.0 is
    +0.0 (and so is any value within one bin width of it: |x| < 2**-133 at 16 bits, a
    denormal). uint16 up to 16 bits (one table look-up per value), else int64."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if bits <= 16:
        if bits == 16 and sys.byteorder == "little":
            raw = x.view(np.uint16)[1::2]  # the high half of each value, no arithmetic
        else:
            raw = x.view(np.uint32) >> np.uint32(32 - bits)
        return _key_lut(bits)[raw]
    u = x.view(np.uint32)
    key = np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
    key = (key >> np.uint32(32 - bits)).astype(np.int64)
    half = 1 << (bits - 1)
    key[key == half - 1] = half  # -0.0 (and the denormals of its bin) counts as +0.0
    return key


def zero_bin(bits: int) -> int:
    return int(value_bins(np.zeros(1, np.float32), bits)[0])


def auroc_from_counts(total: np.ndarray, pos: np.ndarray, zero: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """AUROC of every concept (columns of `pos`, counts per ordered bin; `total` all tokens per
    bin) and its error bound. Ties within a bin count one half; the bound is half the share of
    (positive, negative) pairs sharing a bin other than bin `zero` (a bin of one value)."""
    total = np.ascontiguousarray(total, dtype=np.float64)
    posT = np.ascontiguousarray(np.asarray(pos, dtype=np.float64).reshape(len(total), -1).T)
    return CK.auroc_counts(total, posT, zero)  # one loop per concept (sums of exact half-integers)


def exact_auroc(x: np.ndarray, y: np.ndarray) -> float:
    """The exact AUROC (mid-ranks for ties): the reference the histogram is tested against."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    p, n = int(y.sum()), int((~y).sum())
    if p == 0 or n == 0:
        return float("nan")
    return float((ranks[y].sum() - p * (p + 1) / 2) / (p * n))


def top_contexts(values: np.ndarray, docs: np.ndarray, k: int, cap: int, depth: int = 1,
                 n_docs: Optional[int] = None) -> np.ndarray:
    """Positions (into `values`) of the highest values, at most `cap` per document (docs), in
    descending order (ties: lower position first), `k * depth` of them at most (`n_docs`: the
    number of distinct documents in `docs`, when known)."""
    n_docs = len(np.unique(docs)) if n_docs is None else n_docs
    want = min(k * depth, cap * n_docs)
    n = len(values)
    t = min(n, max(want * 2, want + 16))
    while True:
        cand = np.argpartition(-values, t - 1)[:t] if t < n else np.arange(n)
        cand = cand[np.lexsort((cand, -values[cand]))]
        d = docs[cand]
        o = np.argsort(d, kind="stable")
        ds = d[o]
        first = np.concatenate([[0], np.flatnonzero(np.diff(ds)) + 1])
        rank = np.arange(len(ds)) - np.repeat(first, np.diff(np.concatenate([first, [len(ds)]])))
        r = np.empty(len(cand), np.int64)
        r[o] = rank
        elig = cand[r < cap]
        if len(elig) >= want or t >= n:
            return elig[:want]
        t = min(n, t * 4)


# --------------------------------------------------------------------------- scoring


@dataclass
class FeatureScore:
    source: str
    feature: str
    signs: tuple[str, ...]
    auroc: dict  # (labels, sign) -> array[C]
    bound: dict
    precision: dict
    n_top: dict  # sign -> int
    best: dict = field(default_factory=dict)  # labels -> (c, sign)
    reps: dict = field(default_factory=dict)  # labels -> (auroc[R], precision[R])


@dataclass
class _DenseBins:
    """The histogram of one dense column. Each token's code (`codes >> shift`: up to 16 bits,
    the raw high bits of its float32) goes through one look-up table, `key_of`, to its
    order-preserving bin, so that no per-token bin array is built: the histograms are counted
    over codes and merged into bins afterwards."""

    codes: np.ndarray
    shift: int
    key_of: np.ndarray
    full: np.ndarray  # tokens per bin (every bin)
    nz: np.ndarray  # the non-empty bins, ascending
    total: np.ndarray  # full[nz]
    bin_of_code: np.ndarray  # index into nz of each code's bin, -1 for the codes absent
    pos: dict  # labels -> [len(nz), C] concept tokens per bin
    posT: np.ndarray  # [len(LABEL_KINDS) x C, len(nz)]: the same, transposed (pos's base)
    zero: int  # index into nz of the zero bin, -1 if empty

    @property
    def code_nz(self) -> np.ndarray:
        """The codes present, ascending."""
        return np.flatnonzero(self.bin_of_code >= 0)

    @property
    def compact(self) -> np.ndarray:
        """The index into nz of each of code_nz."""
        return self.bin_of_code[self.code_nz]


class Scorer:
    """Scores features (dense columns or sparse entries) against the labels of a run.

    Labels are held as one bit mask per token and labels kind (`mask_dtype`: 2 bytes a token
    for up to 16 concepts), and for the counting kernels (`concept_kernels`) as a list of
    positions per concept and labels kind (`concept_kernels.label_lists`: the true labels'
    concepts first, then the shuffled; at most half the tokens each)."""

    def __init__(self, labels: Labels, cfg: ConceptsConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.index = labels.index
        self.n = labels.index.n
        self.concepts = labels.scored
        self.names = [c.name for c in self.concepts]
        self.C = len(self.concepts)
        rng = np.random.default_rng([cfg.seed, 11])
        self.doc = labels.index.doc_of_token()
        # shuffled labels: each document's labels circularly shifted by a random offset
        lens = labels.index.lengths
        shift = (rng.random(len(lens)) * lens).astype(np.int64)
        pos = np.arange(self.n) - labels.index.starts[self.doc]
        moved = labels.index.starts[self.doc] + (pos + shift[self.doc]) % lens[self.doc]
        del pos
        tokens = {"true": [c.tokens for c in self.concepts],
                  "shuffled": [np.sort(moved[c.tokens]) for c in self.concepts]}
        del moved
        self.mask = {lab: token_mask(self.n, tokens[lab]) for lab in LABEL_KINDS}
        self.lists = CK.label_lists(self.n, [t for lab in LABEL_KINDS for t in tokens[lab]])
        self.P = {k: np.array([len(t) for t in v], np.float64) for k, v in tokens.items()}
        self.rankable = np.array([c.name not in cfg.best_excludes for c in self.concepts])
        # bootstrap: documents in random blocks, blocks drawn with replacement
        self.G = max(2, min(cfg.bootstrap_blocks, len(lens)))
        self.block = rng.permutation(len(lens)) % self.G
        self.block_tokens = np.bincount(self.block, weights=lens, minlength=self.G).astype(np.int64)
        self.pos_block = {lab: np.array([np.bincount(self.block[self.doc[t]], minlength=self.G) for t in tokens[lab]],
                                        np.int64).reshape(self.C, self.G) for lab in LABEL_KINDS}
        # per document: its block's first cell in a (block, coarse bin) histogram of BLOCK_STRIDE bins per block
        self.doc_cell = (self.block * BLOCK_STRIDE).astype(np.int32)
        self.starts = np.ascontiguousarray(labels.index.starts, np.int64)  # documents: consecutive runs of tokens
        del tokens
        self.R = cfg.bootstrap
        self.W = rng.multinomial(self.G, np.full(self.G, 1.0 / self.G), size=self.R).astype(np.float64) \
            if self.R else np.zeros((0, self.G))
        self.bits = cfg.hist_bits
        self.zero = zero_bin(self.bits)
        self.n_docs = len(lens)
        # the codes in ascending bin order (up to 16 bits; above, codes are numbered in bin order)
        self.code_order = np.argsort(_key_lut(self.bits), kind="stable") if self.bits <= 16 else None
        self._buffers = threading.local()  # per thread: the codes of a column, `concept_kernels.counts_buffer`

    # ---- counts

    def _bits_matrix(self, toks: np.ndarray, labels: str) -> np.ndarray:
        return mask_bits(self.mask[labels][toks], self.C)

    def _codes(self, x: np.ndarray, reuse: bool = False) -> tuple[np.ndarray, int, np.ndarray]:
        """(codes, shift, key_of): each value's code is `codes >> shift` and `key_of[code]` its
        order-preserving bin (`_DenseBins`). Up to 16 bits the codes are the float32 values'
        raw high bits (uint16, one pass; with `reuse`, into this thread's buffer, valid until
        its next call); above, the bins present, numbered in order."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.bits <= 16:
            out = getattr(self._buffers, "codes", None) if reuse else None
            if out is None or len(out) != len(x):
                out = np.empty(len(x), np.uint16)
                if reuse:
                    self._buffers.codes = out
            return CK.high_bits(x.view(np.uint32), 32 - self.bits, out), 0, _key_lut(self.bits)
        bins = value_bins(x, self.bits)
        present = np.flatnonzero(np.bincount(bins))
        number = np.zeros(int(present[-1]) + 1, np.int32)
        number[present] = np.arange(len(present), dtype=np.int32)
        return number[bins], 0, present

    def _counts_dense(self, x: np.ndarray) -> _DenseBins:
        """Histograms of one dense column: all tokens per bin, and per labels kind the
        concepts' tokens per bin (`concept_kernels.concept_counts` over the codes, from each
        concept's positions, then merged into the non-empty bins), on the non-empty bins."""
        codes, shift, key_of = self._codes(x, reuse=True)
        H = getattr(self._buffers, "counts", None)
        if H is None or H.shape[1] != len(key_of):  # one per thread, handed back zeroed
            H = self._buffers.counts = CK.counts_buffer(2 * self.C, len(key_of), self.n)
        order = self.code_order if self.code_order is not None else np.arange(len(key_of))
        try:
            bin_of_code, total, posT = CK.bins_of_codes(CK.concept_counts(codes, shift, self.lists, H),
                                                        self.lists[2], order, key_of)
        except BaseException:  # the buffer may hold counts: never reuse it
            self._buffers.counts = None
            raise
        pos = {lab: posT[i * self.C:(i + 1) * self.C].T for i, lab in enumerate(LABEL_KINDS)}
        present = np.flatnonzero(bin_of_code >= 0)
        nz = np.zeros(len(total), np.int64)
        nz[bin_of_code[present]] = key_of[present]
        K = len(nz)
        nb = 1 << self.bits if self.bits <= 16 else int(key_of[-1]) + 1
        full = np.zeros(nb, np.int64)
        full[nz] = total
        z = int(np.searchsorted(nz, self.zero))
        zero = z if z < K and nz[z] == self.zero else -1
        return _DenseBins(codes, shift, key_of, full, nz, total, bin_of_code, pos, posT, zero)

    def _block_args(self, d: _DenseBins, cmap: np.ndarray, lab: str, c: int) -> tuple:
        """`concept_kernels.select_tokens`'s `block`: the (block, coarse bin) histograms of all
        tokens and of concept c's, given the coarse bin of every non-empty fine bin (`cmap`)."""
        cm = np.zeros(len(d.key_of), np.int32)
        present = d.bin_of_code >= 0
        cm[present] = cmap[d.bin_of_code[present]]
        flat, offs, comp = self.lists
        j = LABEL_KINDS.index(lab) * self.C + c
        return (cm, self.starts, self.doc_cell, flat[offs[j]:offs[j + 1]], bool(comp[j]),
                self.G * BLOCK_STRIDE)

    def _block_hists_dense(self, d: _DenseBins, cmap: np.ndarray, lab: str, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, coarse bin) histograms ([G, BLOCK_STRIDE]) of all tokens and of concept c's
        alone (the scorer counts them in `_top_dense`'s pass)."""
        *_, Tg, Pg = CK.select_tokens(d.codes, d.shift, np.zeros(len(d.key_of), np.uint8), 0, 0,
                                      self._block_args(d, cmap, lab, c))
        return Tg.reshape(self.G, BLOCK_STRIDE), Pg.reshape(self.G, BLOCK_STRIDE)

    def _counts_sparse(self, v: np.ndarray, t: np.ndarray):
        bins = np.concatenate([value_bins(v, self.bits), [self.zero]])
        u, inv = np.unique(bins, return_inverse=True)
        K = len(u)
        n_implicit = self.n - len(v)
        total = np.bincount(inv, weights=np.concatenate([np.ones(len(v)), [n_implicit]]), minlength=K)
        zero = int(np.searchsorted(u, self.zero))
        pos = {}
        for lab in LABEL_KINDS:
            B = self._bits_matrix(t, lab) if self.C else np.zeros((len(t), 0))
            p = np.zeros((K, self.C))
            if len(t):
                order = np.argsort(inv[:-1], kind="stable")
                iv = inv[:-1][order]
                starts = np.concatenate([[0], np.flatnonzero(np.diff(iv)) + 1])
                p[iv[starts]] = np.add.reduceat(B[order], starts, axis=0)
            p[zero] += self.P[lab] - B.sum(0)
            pos[lab] = p
        return total, pos, zero, u, inv[:-1]

    def _kc(self, lab: str) -> np.ndarray:
        """Contexts the precision is taken over, per concept: k, or the concept's token count when smaller."""
        return np.minimum(self.cfg.k, self.P[lab]).astype(np.int64)

    def _precision(self, top: np.ndarray, lab: str) -> np.ndarray:
        """Per concept: the share of the first min(k, concept tokens) of `top` carrying it."""
        if not len(top) or not self.C:
            return np.full(self.C, np.nan)
        hits = np.cumsum(self._bits_matrix(top, lab), 0)
        n = np.minimum(self._kc(lab), len(top))
        return hits[n - 1, np.arange(self.C)] / n

    # ---- one feature

    def score(self, source: str, feature: str, x: np.ndarray, t: Optional[np.ndarray], signed: bool) -> FeatureScore:
        """Score one feature: dense values `x` over every token (t None) or sparse values `x`
        at tokens `t` (every other token 0)."""
        cfg = self.cfg
        if t is None:
            d = self._counts_dense(x)
            full, total, pos, zero = d.full, d.total, d.pos, d.zero
            auc2, bound2 = CK.auroc_counts(total.astype(np.float64), d.posT, zero)
        else:
            total, pos, zero, nz, inv = self._counts_sparse(x, t)
            auc2, bound2 = auroc_from_counts(total, np.concatenate([pos[lab] for lab in LABEL_KINDS], 1), zero)
        signs = ("pos", "neg") if signed else ("pos",)
        fs = FeatureScore(source, feature, signs, {}, {}, {}, {})
        for i, lab in enumerate(LABEL_KINDS):
            auc, bound = auc2[i * self.C:(i + 1) * self.C], bound2[i * self.C:(i + 1) * self.C]
            fs.auroc[(lab, "pos")], fs.bound[(lab, "pos")] = auc, bound
            if signed:
                fs.auroc[(lab, "neg")], fs.bound[(lab, "neg")] = 1.0 - auc, bound
        for lab in LABEL_KINDS:  # the best concept first: the bootstrap's block histograms share a pass
            best = None
            for sign in signs:
                a = np.where(self.rankable, np.nan_to_num(fs.auroc[(lab, sign)], nan=-1.0), -1.0)
                j = int(np.argmax(a)) if self.C else -1
                if j >= 0 and a[j] >= 0 and (best is None or a[j] > best[2]):
                    best = (j, sign, a[j])
            if best is not None:
                fs.best[lab] = best[:2]
        rep = bool(self.R) and "true" in fs.best  # intervals for the real labels; shuffled: point values
        if rep:
            c, best_sign = fs.best["true"]
            cmap = self._coarse_bins(total, pos["true"][:, c])
        cands = {}
        depth = 4 if self.R else 1
        if t is None:
            top_dense, hists = self._top_dense(x, d.codes, full, signs, depth, d.key_of, d.shift,
                                               self._block_args(d, cmap, "true", c) if rep else None)
        for sign in signs:
            if t is None:
                toks = top_dense[sign]
            else:
                vals = x if sign == "pos" else -x
                keep = np.flatnonzero(vals > 0)
                top = top_contexts(vals[keep], self.doc[t[keep]], cfg.k, cfg.max_per_doc, depth=depth) \
                    if len(keep) else np.zeros(0, np.int64)
                toks = t[keep[top]]
            cands[sign] = toks
            fs.n_top[sign] = min(len(toks), cfg.k)
            for lab in LABEL_KINDS:
                fs.precision[(lab, sign)] = self._precision(toks[:cfg.k], lab)
        if rep:
            fs.reps["true"] = self._replicates(t, cmap, hists if t is None else cmap[inv].astype(np.int32), zero, c,
                                               best_sign, "true", cands[best_sign], fs.auroc[("true", best_sign)][c])
        return fs

    def _top_dense(self, x: np.ndarray, keys: np.ndarray, hist: np.ndarray, signs: tuple[str, ...], depth: int,
                   key_of: Optional[np.ndarray] = None, shift: int = 0,
                   block: Optional[tuple] = None) -> tuple[dict[str, np.ndarray], Optional[tuple]]:
        """`top_contexts` of a dense column for each sign (sign "neg": of -x) without sorting
        it: the candidates are the tokens of the highest (lowest) bins holding a few times the
        tokens wanted, a set closed upwards in value, so its top contexts are the column's;
        widened until the per-document cap leaves enough of them. `keys`: each token's bin, or
        its code (`keys >> shift`) when `key_of` (code -> bin) is given. The candidates of both
        signs come from one pass over the tokens (`concept_kernels.select_tokens`, through a
        table of every key), which with `block` (`_block_args`) also counts the bootstrap's
        block histograms, returned second ([G, BLOCK_STRIDE] each; else None)."""
        k, cap = self.cfg.k, self.cfg.max_per_doc
        want = min(k * depth, cap * self.n_docs)
        cum = {"pos": np.cumsum(hist[::-1]), "neg": np.cumsum(hist)}
        key_bin = key_of if key_of is not None else np.arange(len(hist))
        need = dict.fromkeys(signs, max(want * 2, want + 16))
        out: dict[str, np.ndarray] = {}
        hists = None
        while len(out) < len(signs):
            todo = [s for s in signs if s not in out]
            table = np.zeros(len(key_bin), np.uint8)
            sizes = [0, 0]
            for b, sign in enumerate(todo):
                i = min(int(np.searchsorted(cum[sign], need[sign])), len(hist) - 1)
                table |= ((key_bin >= len(hist) - 1 - i) if sign == "pos" else (key_bin <= i)).astype(np.uint8) << b
                sizes[b] = int(cum[sign][i])
            *cands, Tg, Pg = CK.select_tokens(keys, shift, table, *sizes, block)
            if block is not None:
                hists = Tg.reshape(self.G, BLOCK_STRIDE), Pg.reshape(self.G, BLOCK_STRIDE)
                block = None
            for sign, cand in zip(todo, cands):
                vals = x[cand] if sign == "pos" else -x[cand]
                top = top_contexts(vals, self.doc[cand], k, cap, depth, n_docs=self.n_docs)
                if len(top) >= want or len(cand) >= self.n:
                    out[sign] = cand[top[:want]]
                else:
                    need[sign] *= 4
        return {s: out[s] for s in signs}, hists

    @staticmethod
    def _coarse_bins(tot: np.ndarray, posc: np.ndarray) -> np.ndarray:
        """The bootstrap's coarse bin of every non-empty fine bin: at most 2 x COARSE_BINS + 1
        bins of about equal mass of all tokens (`tot` per fine bin) and of the concept's (`posc`)."""
        g = np.floor(COARSE_BINS * np.cumsum(tot) / max(tot.sum(), 1)) \
            + np.floor(COARSE_BINS * np.cumsum(posc) / max(posc.sum(), 1))
        return np.unique(g, return_inverse=True)[1]

    def _replicates(self, t, cmap, coarse, zero, c, sign, lab, cand, auc_fine):
        """Bootstrap replicates (R) of the AUROC and top-k precision of concept c, sign. The
        per-block histograms merge the fine bins into the coarse bins `cmap` (`_coarse_bins`;
        the bias this adds is removed by shifting each replicate by the fine-minus-coarse AUROC
        of the full data). `coarse`: the (block, coarse bin) histograms of all tokens and of
        the concept's (dense, from `_top_dense`'s pass) or the coarse bin of every entry
        (sparse)."""
        Kc = int(cmap.max()) + 1
        zc = int(cmap[zero]) if zero >= 0 else -1
        if t is None:
            # (block, coarse bin) cells: BLOCK_STRIDE >= the 2 x COARSE_BINS + 1 bins
            Tg, Pg = coarse
            Tg, Pg = Tg[:, :Kc].astype(np.float64), Pg[:, :Kc].astype(np.float64)
        else:
            cbin = coarse
            blk = self.block[self.doc[t]]
            Tg = np.bincount(blk * Kc + cbin, minlength=self.G * Kc).reshape(self.G, Kc).astype(np.float64)
            Tg[:, zc] += self.block_tokens - np.bincount(blk, minlength=self.G)
            lab_bit = mask_bit(self.mask[lab][t], c)
            Pg = np.bincount(blk[lab_bit] * Kc + cbin[lab_bit], minlength=self.G * Kc).reshape(self.G, Kc) \
                .astype(np.float64)
            Pg[:, zc] += self.pos_block[lab][c] - np.bincount(blk[lab_bit], minlength=self.G)
        full, _ = auroc_from_counts(Tg.sum(0), Pg.sum(0)[:, None], zc)
        Tr, Pr = self.W @ Tg, self.W @ Pg
        neg = Tr - Pr
        below = np.cumsum(neg, 1) - neg
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (Pr * (below + 0.5 * neg)).sum(1) / (Pr.sum(1) * neg.sum(1))
        auc = auc - full[0] + (auc_fine if sign == "pos" else 1.0 - auc_fine)
        if sign == "neg":
            auc = 1.0 - auc
        auc = np.clip(auc, 0.0, 1.0)
        # precision: each document of a drawn block counts as many times as the block was drawn
        if len(cand):
            w = self.W[:, self.block[self.doc[cand]]]
            hit = mask_bit(self.mask[lab][cand], c).astype(np.float64)
            before = np.cumsum(w, 1) - w
            take = np.clip(self._kc(lab)[c] - before, 0, w)
            with np.errstate(invalid="ignore", divide="ignore"):
                prec = (take * hit).sum(1) / take.sum(1)
        else:
            prec = np.full(self.R, np.nan)
        return auc, prec


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    name: str
    layout: str  # wide | sparse
    files: list[str]
    columns: list[str] = field(default_factory=list)
    signed: bool = False


def feature_sources(run: RunDir, cfg: ConceptsConfig, sae_done: bool, transcoder_done: bool) -> list[Source]:
    """The feature sources to score (the same rule and names as topk)."""
    from rank1_core import topk as T

    views = {name: len(S.matching_files(run, *S.VIEWS[name])) for name in
             ("activations", "neurons", "sae_features", "transcoder_features")}
    views = {k: v for k, v in views.items() if v}
    try:
        found = T.available_sources(run, views, cfg, sae_done, transcoder_done)
    except T.TopkError as e:
        raise ConceptError(str(e).replace("topk.sources", "concepts.sources")) from None
    out = []
    for s in found:
        files = S.matching_files(run, *S.VIEWS[s.view])
        out.append(Source(s.name, s.layout, files, list(s.features), signed=s.name == "adapter"))
    return out


def _classify(auc: float, prec: float, cfg: ConceptsConfig) -> str:
    if auc >= cfg.clean_auroc and prec >= cfg.clean_precision:
        return "clean"
    if auc >= cfg.broad_auroc:
        return "broad"
    return "unmatched"


@dataclass
class ConceptsResult:
    scores: list[FeatureScore] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


PROJECT_CHUNK = 1 << 18
"""Tokens per step of the random-direction projections."""


def _wide_pass_columns(n_tokens: int, columns: list[str], memory_mb: int, reserved: int = 0) -> list[list[str]]:
    """Columns of each pass: as many float32 columns as fit in `memory_mb` beside `reserved`
    bytes held through every pass (the random-direction projections), at least half of it."""
    budget = max((memory_mb << 20) - reserved, (memory_mb << 20) // 2)
    per = max(1, budget // max(1, 4 * n_tokens))
    return [columns[i:i + per] for i in range(0, len(columns), per)]


def scoring_threads() -> int:
    """Threads that score columns side by side (NumPy releases the GIL in the heavy loops):
    the usable cores, at most 4 (each holds a few column-sized temporaries)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def score_columns(scorer: Scorer, source: str, names: list[str], columns, signed: bool,
                  threads: Optional[int] = None) -> list[FeatureScore]:
    """`scorer.score` of every dense column (`columns[j]` the values of feature `names[j]`
    over every token), on `threads` threads, in order."""
    threads = scoring_threads() if threads is None else threads
    one = lambda j: scorer.score(source, names[j], columns[j], None, signed)  # noqa: E731
    if threads <= 1 or len(names) < 2:
        return [one(j) for j in range(len(names))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(one, range(len(names))))


def score_wide(run: RunDir, scorer: Scorer, src: Source, cfg: ConceptsConfig, out: list[FeatureScore],
               directions: Optional[np.ndarray] = None, log: Callable[[str], None] = print) -> Optional[np.ndarray]:
    """Score every column of a wide source, a pass of columns at a time (as many as fit in
    `memory_mb`, each pass reading only its columns, pyarrow decoding on its threads), the
    columns of a pass scored side by side (`score_columns`); with `directions` ([columns, d])
    also return the projections of every token on them ([d, n_tokens])."""
    ix = scorer.index
    files = [pq.ParquetFile(f, filesystem=run.fs) for f in src.files]
    where = []  # per file: a slice of the token order when its rows are consecutive tokens, else their indices
    seen = np.zeros(ix.n, bool)
    rows = 0
    for f, pf in zip(src.files, files):
        t = pf.read(columns=["doc_id", "pos"])
        idx = ix.index(t.column("doc_id").to_numpy(), t.column("pos").to_numpy(), f)
        seen[idx] = True
        rows += len(idx)
        run_of = len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx) and bool((np.diff(idx) == 1).all())
        where.append(slice(int(idx[0]), int(idx[-1]) + 1) if run_of else idx)
    if rows != ix.n or not seen.all():  # n rows covering n tokens: each exactly once
        raise ConceptError(f"{src.name}: {src.files[0].rsplit('/', 2)[0]} does not hold every token of "
                           f"extract/tokens exactly once ({rows} rows for {ix.n} tokens)")
    del seen
    proj = np.zeros((directions.shape[1], ix.n), np.float32) if directions is not None else None
    col_pos = {c: i for i, c in enumerate(src.columns)}
    passes = _wide_pass_columns(ix.n, src.columns, cfg.memory_mb, proj.nbytes if proj is not None else 0)
    X = np.empty((max(map(len, passes), default=0), ix.n), np.float32)  # one column per row
    t0, c0 = time.perf_counter(), time.process_time()
    spent = {"read": 0.0, "project": 0.0, "score": 0.0}
    for p, cols in enumerate(passes):
        t1 = time.perf_counter()
        for pf, w in zip(files, where):
            t = pf.read(columns=cols)
            for j, c in enumerate(cols):
                if isinstance(w, slice):
                    off = w.start
                    for chunk in t.column(c).chunks:
                        X[j, off:off + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
                        off += len(chunk)
                else:
                    X[j, w] = t.column(c).to_numpy()
            del t
        t2 = time.perf_counter()
        if proj is not None:  # in token slices: no [directions, tokens] temporary
            A = directions[[col_pos[c] for c in cols]].astype(np.float32).T
            # one BLAS thread: a [d, columns] x [columns, slice] product is memory-bound, and
            # OpenBLAS's other threads mostly spin (~2x the CPU time); the products are the same
            # (threads split the output, never a sum: test_projection_threads_change_no_bit)
            with threadpool_limits(1, user_api="blas"):
                for a in range(0, ix.n, PROJECT_CHUNK):
                    proj[:, a:a + PROJECT_CHUNK] += A @ X[:len(cols), a:a + PROJECT_CHUNK]
        t3 = time.perf_counter()
        out.extend(score_columns(scorer, src.name, cols, X, src.signed))
        for k, dt in zip(spent, (t2 - t1, t3 - t2, time.perf_counter() - t3)):
            spent[k] += dt
        if len(passes) > 1 and (p + 1) % max(1, len(passes) // 10) == 0 or p + 1 == len(passes):
            log(f"[concepts] {src.name}: {p + 1}/{len(passes)} passes, {time.perf_counter() - t0:.1f}s, "
                f"{time.process_time() - c0:.1f} CPU-s (" + ", ".join(f"{k} {v:.1f}s" for k, v in spent.items()) + ")")
    return proj


def score_sparse(run: RunDir, scorer: Scorer, src: Source, cfg: ConceptsConfig, out: list[FeatureScore]) -> None:
    """Score every feature of a sparse source (doc_id, pos, feature, value; absent = 0), a
    range of features at a time so that a pass holds about `memory_mb` of rows."""
    import pyarrow.dataset as ds

    d = ds.dataset(src.files, filesystem=run.fs, format="parquet")
    n_rows = d.count_rows()
    fmax = d.to_table(columns=["feature"]).column("feature")
    fmax = int(pa.compute.max(fmax).as_py()) if n_rows else -1
    per_pass = max(1, (cfg.memory_mb << 20) // 40)
    n_pass = max(1, -(-n_rows // per_pass))
    width = -(-(fmax + 1) // n_pass) if fmax >= 0 else 1
    for lo in range(0, fmax + 1, width):
        t = d.to_table(columns=["doc_id", "pos", "feature", "value"],
                       filter=(ds.field("feature") >= lo) & (ds.field("feature") < lo + width))
        feat = t.column("feature").to_numpy()
        tok = scorer.index.index(t.column("doc_id").to_numpy(), t.column("pos").to_numpy(), src.files[0])
        val = t.column("value").to_numpy().astype(np.float32)
        order = np.argsort(feat, kind="stable")
        feat, tok, val = feat[order], tok[order], val[order]
        cut = np.concatenate([[0], np.flatnonzero(np.diff(feat)) + 1, [len(feat)]])
        for a, b in zip(cut[:-1], cut[1:]):
            if b > a:
                out.append(scorer.score(src.name, f"F{int(feat[a]):05d}", val[a:b], tok[a:b], src.signed))


def random_directions(n_columns: int, n: int, seed: int) -> np.ndarray:
    """`n` random unit directions in the space of `n_columns` adapter components ([n_columns, n])."""
    rng = np.random.default_rng([seed, 23])
    u = rng.normal(size=(n_columns, n))
    return u / np.linalg.norm(u, axis=0, keepdims=True)


def score_run(run: RunDir | str, labels: Labels, cfg: ConceptsConfig, *, sae_done: bool = False,
              transcoder_done: bool = False, log: Callable[[str], None] = print) -> ConceptsResult:
    """Score every feature of every source, and the random-direction control."""
    run = run if isinstance(run, RunDir) else RunDir(str(run))
    res = ConceptsResult()
    scorer = Scorer(labels, cfg, log)
    if not scorer.C:
        raise ConceptError("no concept to score: every concept is empty (or covers every token)")
    sources = feature_sources(run, cfg, sae_done, transcoder_done)
    if not sources:
        raise ConceptError("no feature source to score (no adapter activations, neurons, SAE or transcoder features)")
    for src in sources:
        t0 = time.perf_counter()
        n0 = len(res.scores)
        proj = None
        if src.layout == "wide":
            dirs = random_directions(len(src.columns), cfg.random_directions, cfg.seed) \
                if src.name == "adapter" and cfg.random_directions else None
            proj = score_wide(run, scorer, src, cfg, res.scores, dirs, log)
        else:
            score_sparse(run, scorer, src, cfg, res.scores)
        res.sources.append(src.name)
        res.rows[f"features:{src.name}"] = len(res.scores) - n0
        res.timings[src.name] = round(time.perf_counter() - t0, 3)
        log(f"[concepts] {src.name}: {len(res.scores) - n0} features x {scorer.C} concepts "
            f"({time.perf_counter() - t0:.1f}s)")
        if proj is not None:
            t0 = time.perf_counter()
            res.scores.extend(score_columns(scorer, "random", [f"R{j:03d}" for j in range(len(proj))], proj, True))
            res.sources.append("random")
            res.rows["features:random"] = len(proj)
            res.timings["random"] = round(time.perf_counter() - t0, 3)
            del proj
    return res


# --------------------------------------------------------------------------- tables


def scores_table(scores: list[FeatureScore], names: list[str]) -> pa.Table:
    cols = {f.name: [] for f in SCORES_SCHEMA}
    C = len(names)
    for fs in scores:
        for sign in fs.signs:
            for lab in LABEL_KINDS:
                cols["source"] += [fs.source] * C
                cols["feature"] += [fs.feature] * C
                cols["sign"] += [sign] * C
                cols["labels"] += [lab] * C
                cols["concept"] += names
                cols["auroc"] += list(fs.auroc[(lab, sign)])
                cols["auroc_bound"] += list(fs.bound[(lab, sign)])
                cols["precision"] += list(fs.precision[(lab, sign)])
                cols["n_top"] += [fs.n_top[sign]] * C
    return pa.table(cols, schema=SCORES_SCHEMA)


def features_table(scores: list[FeatureScore], names: list[str], cfg: ConceptsConfig) -> pa.Table:
    rows = []
    for fs in scores:
        for lab in LABEL_KINDS:
            if lab not in fs.best:
                rows.append({"source": fs.source, "feature": fs.feature, "labels": lab, "concept": None,
                             "sign": None, "auroc": float("nan"), "auroc_bound": float("nan"),
                             "precision": float("nan"), "n_top": 0, "class": "unmatched"})
                continue
            c, sign = fs.best[lab]
            auc, prec = float(fs.auroc[(lab, sign)][c]), float(fs.precision[(lab, sign)][c])
            rows.append({"source": fs.source, "feature": fs.feature, "labels": lab, "concept": names[c], "sign": sign,
                         "auroc": auc, "auroc_bound": float(fs.bound[(lab, sign)][c]), "precision": prec,
                         "n_top": fs.n_top[sign], "class": _classify(auc, np.nan_to_num(prec), cfg)})
    return pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA)


def _interval(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    return float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))


def summary_table(scores: list[FeatureScore], features: pa.Table, sources: list[str], cfg: ConceptsConfig) -> pa.Table:
    """Per source and labels: shares of clean / broad / unmatched features, with 95% bootstrap
    intervals (each replicate classifies every feature by its replicate AUROC and precision)."""
    df = features.to_pandas()
    rows = []
    for src in sources:
        mine = [fs for fs in scores if fs.source == src]
        for lab in LABEL_KINDS:
            sub = df[(df["source"] == src) & (df["labels"] == lab)]
            n = len(sub)
            row = {"source": src, "labels": lab, "n_features": n, "clean_auroc": cfg.clean_auroc,
                   "clean_precision": cfg.clean_precision, "broad_auroc": cfg.broad_auroc,
                   "max_auroc_bound": float(np.nanmax(sub["auroc_bound"])) if n and sub["auroc_bound"].notna().any()
                   else float("nan"), "bootstrap": cfg.bootstrap}
            for cl in CLASSES:
                row[cl] = float((sub["class"] == cl).mean()) if n else float("nan")
            reps = [fs.reps[lab] for fs in mine if lab in fs.reps]
            if cfg.bootstrap and reps:
                A = np.stack([r[0] for r in reps])
                Pm = np.nan_to_num(np.stack([r[1] for r in reps]))
                clean = (A >= cfg.clean_auroc) & (Pm >= cfg.clean_precision)
                broad = ~clean & (A >= cfg.broad_auroc)
                unmatched = ~clean & ~broad
                # features without a best concept are unmatched in every replicate
                extra = n - len(reps)
                for cl, m in (("clean", clean), ("broad", broad), ("unmatched", unmatched)):
                    share = (m.sum(0) + (extra if cl == "unmatched" else 0)) / n
                    row[f"{cl}_lo"], row[f"{cl}_hi"] = _interval(share)
            else:
                for cl in CLASSES:
                    row[f"{cl}_lo"] = row[f"{cl}_hi"] = float("nan")
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def best_table(scores: list[FeatureScore], names: list[str], sources: list[str]) -> pa.Table:
    """Per concept and (non-random) source: the feature with the highest AUROC (over signs),
    beside the best random direction and the source's best under shuffled labels."""
    rows = []
    for c, name in enumerate(names):
        rand = [max(fs.auroc[("true", s)][c] for s in fs.signs) for fs in scores if fs.source == "random"]
        rand_best = float(np.nanmax(rand)) if rand and np.isfinite(rand).any() else float("nan")
        for src in sources:
            if src == "random":
                continue
            best = None
            shuf = -np.inf
            for fs in scores:
                if fs.source != src:
                    continue
                for s in fs.signs:
                    a = fs.auroc[("true", s)][c]
                    if np.isfinite(a) and (best is None or a > best[0]):
                        best = (a, fs, s)
                    b = fs.auroc[("shuffled", s)][c]
                    if np.isfinite(b):
                        shuf = max(shuf, b)
            if best is None:
                continue
            a, fs, s = best
            rows.append({"concept": name, "source": src, "feature": fs.feature, "sign": s, "auroc": float(a),
                         "auroc_bound": float(fs.bound[("true", s)][c]),
                         "precision": float(fs.precision[("true", s)][c]), "random_auroc": rand_best,
                         "shuffled_auroc": float(shuf) if np.isfinite(shuf) else float("nan")})
    return pa.Table.from_pylist(rows, schema=BEST_SCHEMA)


# --------------------------------------------------------------------------- explanations


def keywords(cfg: ConceptsConfig) -> dict[str, list[str]]:
    out = {k: list(v) for k, v in KEYWORDS.items()}
    for k, v in cfg.keywords.items():
        out[k] = list(dict.fromkeys(out.get(k, []) + [w.lower() for w in v]))
    return out


def names_concept(explanation: str, concept: str, words: dict[str, list[str]]) -> bool:
    """Does the explanation contain one of the concept's keywords (lower-cased substring)?
    A concept without keywords matches its own name (underscores as spaces)."""
    text = (explanation or "").lower()
    kws = words.get(concept) or [concept.replace("_", " ")]
    return any(k in text for k in kws)


def explanation_check(explanations, features: pa.Table, cfg: ConceptsConfig) -> pa.Table:
    """For every explained feature whose best concept (true labels) is clean: does the
    explanation name it? `copied` marks explanations that repeat the prompt's wording
    (`rank1_core.autointerp.prompts.copied_from`): they never name anything."""
    from rank1_core.autointerp import prompts as P

    f = features.to_pandas()
    f = f[(f["labels"] == "true") & (f["class"] == "clean")].set_index(["source", "feature"])
    words = keywords(cfg)
    rows = []
    for r in explanations.itertuples(index=False):
        key = (r.source, r.feature)
        if key not in f.index or not isinstance(r.explanation, str) or not r.explanation.strip():
            continue
        b = f.loc[key]
        copied = bool(P.copied_from(r.explanation, P.EXPLAIN_INSTRUCTIONS))
        rows.append({"source": r.source, "feature": r.feature, "sign": r.sign, "model": r.model or "",
                     "concept": b["concept"], "auroc": float(b["auroc"]), "explanation": r.explanation,
                     "copied": copied, "names_concept": (not copied) and names_concept(r.explanation, b["concept"], words)})
    return pa.Table.from_pylist(rows, schema=EXPLAIN_SCHEMA)


def explanation_accuracy(check: pa.Table) -> list[dict]:
    """Per explainer model: clean features explained, how many explanations name the concept."""
    df = check.to_pandas()
    out = []
    for model, g in df.groupby("model"):
        out.append({"model": model, "clean_explained": len(g), "names_concept": int(g["names_concept"].sum()),
                    "accuracy": float(g["names_concept"].mean()), "copied": int(g["copied"].sum())})
    return out


# --------------------------------------------------------------------------- text


def format_summary(summary: pa.Table, best: pa.Table, cfg: ConceptsConfig) -> str:
    """The stage's printed tables: shares per source (with intervals) and the best feature per concept."""
    s = summary.to_pandas()
    lines = [f"Ground truth: clean = best-concept AUROC >= {cfg.clean_auroc} and top-{cfg.k} precision >= "
             f"{cfg.clean_precision}; broad = AUROC >= {cfg.broad_auroc}; else unmatched. 95% bootstrap intervals "
             f"over documents ({cfg.bootstrap} replicates).",
             f"{'source':<12} {'labels':<9} {'n':>6}  {'clean':>20}  {'broad':>20}  {'unmatched':>20}"]

    def cell(r, c):
        if np.isfinite(r[f"{c}_lo"]):
            return f"{r[c]:.3f} [{r[f'{c}_lo']:.3f}, {r[f'{c}_hi']:.3f}]"
        return f"{r[c]:.3f}"

    for r in s.to_dict("records"):
        lines.append(f"{r['source']:<12} {r['labels']:<9} {r['n_features']:>6}  {cell(r, 'clean'):>20}  "
                     f"{cell(r, 'broad'):>20}  {cell(r, 'unmatched'):>20}")
    b = best.to_pandas()
    if len(b):
        lines.append("")
        lines.append("Best feature per concept (AUROC; random direction / shuffled labels = chance):")
        for concept, g in b.groupby("concept", sort=False):
            parts = [f"{r['source']} {r['feature']}{'-' if r['sign'] == 'neg' else ''} {r['auroc']:.3f}"
                     for r in g.to_dict("records")]
            r0 = g.iloc[0]
            lines.append(f"  {concept:<16} " + "; ".join(parts) +
                         f"  | random {r0['random_auroc']:.3f}, shuffled {g['shuffled_auroc'].max():.3f}")
    return "\n".join(lines)

