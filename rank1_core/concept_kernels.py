"""Counting kernels of the concepts stage's metric pass (numba, compiled on first use).

One pass over a dense column's tokens counts, for every token, its code's bin in the all-token
histogram and in the histogram of every concept bit set in its true and shuffled label masks;
a second pass (only for the bootstrap, once the coarse bins are known) counts the per-block
histograms of all tokens and of one concept. Integer counts: the results are exactly those of
the NumPy bincounts they replace (tests/test_concepts.py compares them).

The compiled code is cached next to this module (numba's default) or, where that is not
writable, under NUMBA_CACHE_DIR or the user's cache directory; where no cache location is
writable at all, the kernels compile in memory on each process's first call (~1 s).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros


def _jit(fn):
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba found no writable cache location: compile in memory
        return numba.njit(cache=False, nogil=True)(fn)


@_jit
def _concept_counts(codes, slot, masks, flips, n_slots, n_concepts):
    """H[slot[code], kind * n_concepts + j]: tokens per slot of the codes of every concept bit
    j set in masks[kind] ^ flips[kind] (a set bit of `flips`: the concept's complement is
    counted, the fewer look-ups when it covers more than half the tokens)."""
    n_kinds = masks.shape[0]
    width = n_kinds * n_concepts
    H = np.zeros((n_slots, width), np.int64)
    one = np.uint64(1)
    for i in range(codes.shape[0]):
        row = slot[codes[i]]
        for kind in range(n_kinds):
            m = np.uint64(masks[kind, i] ^ flips[kind])
            base = kind * n_concepts
            while m:
                H[row, base + trailing_zeros(m)] += 1
                m &= m - one
    return H


@_jit
def _code_hist(codes, n_codes):
    """Tokens per code (np.bincount with minlength n_codes)."""
    h = np.zeros(n_codes, np.int64)
    for i in range(codes.shape[0]):
        h[codes[i]] += 1
    return h


@_jit
def _block_counts(codes, cell_of_code, tok_cell, mask, bit, n_cells):
    """Per (block, coarse bin) cell: all tokens, and the tokens with bit `bit` of `mask` set.
    A token's cell is tok_cell[token] (its block's first cell) + cell_of_code[its code]."""
    T = np.zeros(n_cells, np.int64)
    P = np.zeros(n_cells, np.int64)
    b = np.uint64(bit)
    one = np.uint64(1)
    for i in range(codes.shape[0]):
        cell = tok_cell[i] + cell_of_code[codes[i]]
        T[cell] += 1
        if (np.uint64(mask[i]) >> b) & one:
            P[cell] += 1
    return T, P


def concept_counts(codes: np.ndarray, slot: np.ndarray, masks: np.ndarray, flips: np.ndarray, n_slots: int,
                   n_concepts: int) -> np.ndarray:
    """[n_slots, kinds x n_concepts] int64 counts (see `_concept_counts`). `masks`: [kinds, tokens]
    bit masks; `flips`: [kinds] of the same dtype; `slot`: int64 slot of every code."""
    return _concept_counts(codes, slot, masks, flips, n_slots, n_concepts)


def code_hist(codes: np.ndarray, n_codes: int) -> np.ndarray:
    return _code_hist(codes, n_codes)


def block_counts(codes: np.ndarray, cell_of_code: np.ndarray, tok_cell: np.ndarray, mask: np.ndarray, bit: int,
                 n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    return _block_counts(codes, cell_of_code, tok_cell, mask, bit, n_cells)
