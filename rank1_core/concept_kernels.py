"""Counting kernels of the concepts stage's metric pass (numba, compiled on first use).

A dense column's tokens are counted per code (`codes >> shift`: its bin before the -0.0 / +0.0
merge; `high_bits` makes them once per column, 2 bytes a token): all tokens in one pass, then
each concept's tokens from its list of positions (`concept_counts`; the labels are sparse, so
this adds about one count per label instead of one per concept and token; a concept covering
more than half the tokens is listed by its complement). `bins_of_codes` merges the codes into
the ordered non-empty bins, `auroc_counts` takes every concept's AUROC and error bound from
them; a second pass selects the candidates of the column's top contexts, both signs at once,
and (for the bootstrap, once the coarse bins are known from the first) counts the per-block
histograms of all tokens and of one concept (`select_tokens`). Integer counts, index sets and
sums of exact half-integers: the results are exactly those of the NumPy code they replaced
(tests/test_concepts.py compares them).

The compiled code is cached next to this module (numba's default) or, where that is not
writable, under NUMBA_CACHE_DIR or the user's cache directory; where no cache location is
writable at all, the kernels compile in memory on each process's first call (~1 s).
"""

from __future__ import annotations

from typing import Optional

import numba
import numpy as np


def _jit(fn):
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba found no writable cache location: compile in memory
        return numba.njit(cache=False, nogil=True)(fn)


@_jit
def _high_bits(raw, shift, out):
    for i in range(raw.shape[0]):
        out[i] = raw[i] >> shift
    return out


def high_bits(raw: np.ndarray, shift: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """`raw >> shift` as uint16 (the shift leaves at most 16 bits; into `out` if given): the
    codes of a column."""
    out = np.empty(raw.shape[0], np.uint16) if out is None else out
    return _high_bits(raw, raw.dtype.type(shift), out)


def label_lists(n: int, token_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat, offs, comp): list j of `token_lists` (ascending positions in [0, n)) as
    flat[offs[j]:offs[j + 1]], or, where it holds more than half the tokens, its complement
    (comp[j] True), so that no list is longer than n / 2. int32 positions below 2**31 tokens."""
    dt = np.int32 if n < 2**31 else np.int64
    parts, comp = [], []
    for toks in token_lists:
        toks = np.asarray(toks)
        if 2 * len(toks) > n:
            keep = np.ones(n, bool)
            keep[toks] = False
            parts.append(np.flatnonzero(keep).astype(dt))
            comp.append(True)
        else:
            parts.append(toks.astype(dt))
            comp.append(False)
    offs = np.zeros(len(parts) + 1, np.int64)
    offs[1:] = np.cumsum([len(p) for p in parts])
    flat = np.concatenate(parts) if parts else np.zeros(0, dt)
    return flat, offs, np.array(comp, bool)


@_jit
def _concept_counts(codes, shift, flat, offs, HT):
    width = HT.shape[0] - 1
    tot = HT[width]
    for i in range(codes.shape[0]):
        tot[np.int64(codes[i]) >> shift] += 1
    for j in range(width):
        h = HT[j]
        for q in range(offs[j], offs[j + 1]):
            h[np.int64(codes[flat[q]]) >> shift] += 1
    return HT


def counts_buffer(n_lists: int, n_codes: int, n_tokens: int) -> np.ndarray:
    """A zeroed [n_lists + 1, n_codes] buffer for `concept_counts` (int32 below 2**31 tokens);
    `bins_of_codes` hands it back zeroed, so that one serves every column of a thread."""
    return np.zeros((n_lists + 1, n_codes), np.int32 if n_tokens < 2**31 else np.int64)


def concept_counts(codes: np.ndarray, shift: int, lists: tuple[np.ndarray, np.ndarray, np.ndarray],
                   HT: np.ndarray) -> np.ndarray:
    """Tokens per code (`codes >> shift`) into the zeroed `HT` (`counts_buffer`): row j those
    of list j of `lists` (`label_lists`), the last row all tokens'."""
    flat, offs, _ = lists
    return _concept_counts(codes, np.int64(shift), flat, offs, HT)


@_jit
def _bins_of_codes(HT, comp, order, key_of, bin_of_code, total):
    width = HT.shape[0] - 1
    tot = HT[width]
    K = 0
    last = np.int64(-1)
    present = np.empty(order.shape[0], np.int64)
    m = 0
    for r in range(order.shape[0]):
        code = order[r]
        t = tot[code]
        if t == 0:
            continue
        b = np.int64(key_of[code])
        if b != last:
            K += 1
            last = b
            total[K - 1] = 0
        bin_of_code[code] = K - 1
        total[K - 1] += t
        present[m] = code
        m += 1
    posT = np.zeros((width, K))
    for j in range(width):
        row = posT[j]
        h = HT[j]
        for r in range(m):
            code = present[r]
            v = h[code]
            row[bin_of_code[code]] += (tot[code] - v) if comp[j] else v
            h[code] = 0
    for r in range(m):
        tot[present[r]] = 0
    return K, posT


def bins_of_codes(HT: np.ndarray, comp: np.ndarray, order: np.ndarray, key_of: np.ndarray):
    """Counts per code (`concept_counts`; row j counted from a complement where comp[j]) to
    counts per non-empty bin, ascending: (bin_of_code [n_codes] int32, the index of each
    present code's bin, -1 where none; total [K] int64; posT [width, K] float64, row j list
    j's), `order` the codes in ascending bin order (`key_of[code]` the bin). Leaves `HT` zeroed."""
    n_codes = HT.shape[1]
    bin_of_code = np.full(n_codes, -1, np.int32)
    total = np.empty(n_codes, np.int64)
    K, posT = _bins_of_codes(HT, comp, order, key_of, bin_of_code, total)
    return bin_of_code, total[:K], posT


@_jit
def _auroc_counts(total, posT, zero, auc, bound):
    W, K = posT.shape
    for j in range(W):
        row = posT[j]
        P = 0.0
        N = 0.0
        below = 0.0
        s = 0.0
        tie = 0.0
        for b in range(K):
            p = row[b]
            n = total[b] - p
            s += p * (below + 0.5 * n)
            if b != zero:
                tie += p * n
            below += n
            P += p
            N += n
        pairs = P * N
        if pairs == 0:
            auc[j] = np.nan
            bound[j] = np.nan
        else:
            auc[j] = s / pairs
            bound[j] = 0.5 * tie / pairs
    return auc, bound


def auroc_counts(total: np.ndarray, posT: np.ndarray, zero: int) -> tuple[np.ndarray, np.ndarray]:
    """`concepts.auroc_from_counts` on float64 [K] totals and [W, K] positives per bin (row j
    concept j's)."""
    W = posT.shape[0]
    return _auroc_counts(total, posT, np.int64(zero), np.empty(W), np.empty(W))


@_jit
def _select_tokens(keys, shift, table, n_a, n_b, cell_of_code, starts, doc_cell, plist, pcomp, n_cells):
    a = np.empty(n_a, np.int64)
    b = np.empty(n_b, np.int64)
    T = np.zeros(n_cells, np.int64)
    P = np.zeros(n_cells, np.int64)
    cells = n_cells > 0
    ia = 0
    ib = 0
    for d in range(starts.shape[0] - 1):
        base = doc_cell[d]
        for i in range(starts[d], starts[d + 1]):
            k = np.int64(keys[i]) >> shift
            w = table[k]
            if w & 1:
                a[ia] = i
                ia += 1
            if w & 2:
                b[ib] = i
                ib += 1
            if cells:
                T[base + cell_of_code[k]] += 1
    if cells:
        d = 0
        for q in range(plist.shape[0]):
            i = plist[q]
            while starts[d + 1] <= i:
                d += 1
            P[doc_cell[d] + cell_of_code[np.int64(keys[i]) >> shift]] += 1
        if pcomp:
            for q in range(n_cells):
                P[q] = T[q] - P[q]
    return a[:ia], b[:ib], T, P


def select_tokens(keys: np.ndarray, shift: int, table: np.ndarray, n_a: int, n_b: int,
                  block: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool, int]] = None):
    """In one pass over the tokens, key k = keys[i] >> shift: (the tokens, ascending, with bit
    0 of table[k] set; those with bit 1 set; T; P): both candidate sets of a column's top
    contexts (np.flatnonzero of each; `n_a`, `n_b` their sizes, known from the histogram).
    With `block` = (cell_of_code, starts, doc_cell, plist, pcomp, n_cells), T and P count per
    (block, coarse bin) cell all tokens and those of one concept (positions `plist`,
    ascending, or all but those when `pcomp`), a token's cell being doc_cell[d] (the first cell
    of its document's block; document d the tokens starts[d]:starts[d + 1]) + cell_of_code[k]
    (the bootstrap's block histograms); else they are empty."""
    if block is None:
        block = (np.zeros(1, np.int32), np.array([0, keys.shape[0]], np.int64), np.zeros(1, np.int32),
                 np.zeros(0, np.int32), False, 0)
    cell_of_code, starts, doc_cell, plist, pcomp, n_cells = block
    return _select_tokens(keys, np.int64(shift), table, n_a, n_b, cell_of_code, starts, doc_cell, plist,
                          bool(pcomp), n_cells)
