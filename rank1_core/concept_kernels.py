"""Counting kernels of the concepts stage's metric pass (numba, compiled on first use).

A dense column's all-token histogram (`code_hist`) gives its non-empty bins; one pass over its
tokens then adds every token's true and shuffled label bits to its bin's row
(`concept_counts`); a last pass (only for the bootstrap, once the coarse bins are known)
counts the per-block histograms of all tokens and of one concept (`block_counts`). Integer
counts: the results are exactly those of the NumPy bincounts they replaced
(tests/test_concepts.py compares them).

The compiled code is cached next to this module (numba's default) or, where that is not
writable, under NUMBA_CACHE_DIR or the user's cache directory; where no cache location is
writable at all, the kernels compile in memory on each process's first call (~1 s).
"""

from __future__ import annotations

import numba
import numpy as np


def _jit(fn):
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba found no writable cache location: compile in memory
        return numba.njit(cache=False, nogil=True)(fn)


@_jit
def _concept_counts(codes, slot, mask_a, mask_b, H, n_concepts):
    """H[slot[code], j] += 1 for every concept bit j set in mask_a, and
    H[slot[code], n_concepts + j] for every bit j of mask_b. Branch-free: every bit of every
    token is added (0 or 1), both masks side by side in one 64-bit word when they fit."""
    one = np.uint64(1)
    C = np.uint64(n_concepts)
    if 2 * n_concepts <= 64:
        width = 2 * n_concepts
        for i in range(codes.shape[0]):
            row = slot[codes[i]]
            m = np.uint64(mask_a[i]) | (np.uint64(mask_b[i]) << C)
            for j in range(width):
                H[row, j] += np.int32((m >> np.uint64(j)) & one)
    else:
        for i in range(codes.shape[0]):
            row = slot[codes[i]]
            a = np.uint64(mask_a[i])
            b = np.uint64(mask_b[i])
            for j in range(n_concepts):
                H[row, j] += np.int32((a >> np.uint64(j)) & one)
                H[row, n_concepts + j] += np.int32((b >> np.uint64(j)) & one)
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


def concept_counts(codes: np.ndarray, slot: np.ndarray, masks: tuple[np.ndarray, np.ndarray], n_slots: int,
                   n_concepts: int) -> np.ndarray:
    """[n_slots, 2 x n_concepts] counts of the concepts of two labels kinds (see
    `_concept_counts`; int32 below 2**31 tokens). `masks`: two [tokens] bit masks; `slot`: the
    slot (row) of every code."""
    dt = np.int32 if codes.shape[0] < 2**31 else np.int64
    H = np.zeros((n_slots, 2 * n_concepts), dt)
    return _concept_counts(codes, slot, masks[0], masks[1], H, n_concepts)


def code_hist(codes: np.ndarray, n_codes: int) -> np.ndarray:
    return _code_hist(codes, n_codes)


def block_counts(codes: np.ndarray, cell_of_code: np.ndarray, tok_cell: np.ndarray, mask: np.ndarray, bit: int,
                 n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    return _block_counts(codes, cell_of_code, tok_cell, mask, bit, n_cells)
