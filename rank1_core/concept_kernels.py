"""Counting kernels of the concepts stage's metric pass (numba, compiled on first use).

One pass over a dense column's tokens counts them per code (the raw high bits of each float32
value, read in place: `codes >> shift`) and adds every token's true and shuffled label bits to
its code's row (`concept_counts`); a second pass selects the candidates of the column's top
contexts, both signs at once, and (for the bootstrap, once the coarse bins are known from the
first) counts the per-block histograms of all tokens and of one concept (`select_tokens`).
Integer counts and index sets: the results are exactly those of the NumPy code they replaced
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
def _concept_counts(codes, shift, mask_a, mask_b, H, n_concepts):
    """Row r = codes[i] >> shift of every token: H[r, 2 x n_concepts] += 1 (all tokens),
    H[r, j] += 1 for every concept bit j set in mask_a, and H[r, n_concepts + j] for every bit j
    of mask_b. Branch-free: every bit of every token is added (0 or 1), both masks side by side
    in one 64-bit word when they fit."""
    one = np.uint64(1)
    C = np.uint64(n_concepts)
    width = 2 * n_concepts
    if width <= 64:
        for i in range(codes.shape[0]):
            row = np.int64(codes[i]) >> shift
            m = np.uint64(mask_a[i]) | (np.uint64(mask_b[i]) << C)
            H[row, width] += 1
            for j in range(width):
                H[row, j] += np.int32((m >> np.uint64(j)) & one)
    else:
        for i in range(codes.shape[0]):
            row = np.int64(codes[i]) >> shift
            a = np.uint64(mask_a[i])
            b = np.uint64(mask_b[i])
            H[row, width] += 1
            for j in range(n_concepts):
                H[row, j] += np.int32((a >> np.uint64(j)) & one)
                H[row, n_concepts + j] += np.int32((b >> np.uint64(j)) & one)
    return H


@_jit
def _select_tokens(keys, shift, table, n_a, n_b, cell_of_code, tok_cell, mask, bit, n_cells):
    """In one pass over the tokens, key k = keys[i] >> shift: the tokens (ascending) with bit 0
    of table[k] set, and those with bit 1 set (both candidate sets of a column's top
    contexts: np.flatnonzero of each); and, when n_cells > 0, per (block, coarse bin) cell the
    tokens and those with bit `bit` of `mask` set, a token's cell being tok_cell[i] (its
    block's first cell) + cell_of_code[k] (the bootstrap's block histograms)."""
    a = np.empty(n_a, np.int64)
    b = np.empty(n_b, np.int64)
    T = np.zeros(n_cells, np.int64)
    P = np.zeros(n_cells, np.int64)
    cells = n_cells > 0
    ia = 0
    ib = 0
    c = np.uint64(bit)
    one = np.uint64(1)
    for i in range(keys.shape[0]):
        k = np.int64(keys[i]) >> shift
        w = table[k]
        if w & 1:
            a[ia] = i
            ia += 1
        if w & 2:
            b[ib] = i
            ib += 1
        if cells:
            cell = tok_cell[i] + cell_of_code[k]
            T[cell] += 1
            if (np.uint64(mask[i]) >> c) & one:
                P[cell] += 1
    return a[:ia], b[:ib], T, P


def concept_counts(codes: np.ndarray, shift: int, masks: tuple[np.ndarray, np.ndarray], n_codes: int,
                   n_concepts: int) -> np.ndarray:
    """[n_codes, 2 x n_concepts + 1] counts per code (`codes >> shift`) of the concepts of two
    labels kinds, and of all tokens in the last column (see `_concept_counts`; int32 below
    2**31 tokens). `masks`: two [tokens] bit masks."""
    dt = np.int32 if codes.shape[0] < 2**31 else np.int64
    H = np.zeros((n_codes, 2 * n_concepts + 1), dt)
    return _concept_counts(codes, np.int64(shift), masks[0], masks[1], H, n_concepts)


def select_tokens(keys: np.ndarray, shift: int, table: np.ndarray, n_a: int, n_b: int,
                  block: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]] = None):
    """(flatnonzero(table[keys >> shift] & 1), flatnonzero(table[keys >> shift] & 2), T, P):
    `n_a`, `n_b` the sizes of the first two (known from the histogram), `table` uint8 per key;
    with `block` = (cell_of_code, tok_cell, mask, bit, n_cells), T and P are the block
    histograms of `_select_tokens` (else empty)."""
    if block is None:
        block = (np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.uint16), 0, 0)
    return _select_tokens(keys, np.int64(shift), table, n_a, n_b, *block)
