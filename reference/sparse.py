"""2:4 structured sparsity along K: in every 4 consecutive rows of a column, at most 2
are non-zero. Sparse tensor cores store only those 2 values plus a 2-bit index for each,
halving the values streamed and the multiply work.

`prune_2_4` keeps the 2 largest magnitudes of every 4; `compress_2_4` splits a 2:4
matrix into its kept values (K/2 x N) and their positions 0..3 inside the group
(K/2 x N, uint8); `decompress_2_4` puts them back. For a 2:4 matrix the round trip is
exact. Indices within a group are increasing, as the hardware's metadata requires.
"""

from __future__ import annotations

import numpy as np


def _groups_of_4(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2 or x.shape[0] % 4:
        raise ValueError(f"expected a (K, N) matrix with K divisible by 4, got shape {x.shape}")
    K, N = x.shape
    return x.reshape(K // 4, 4, N)


def keep_mask_2_4(W: np.ndarray) -> np.ndarray:
    """Boolean (K, N) mask of the 2 largest |w| in every group of 4 along K (ties: lower row).

    An entry is kept when fewer than 2 entries of its group rank above it, where j ranks
    above i if |w_j| > |w_i|, or |w_j| == |w_i| and j < i. Exactly 2 entries per group are
    kept. (Pairwise comparisons, rather than a sort, so large layers prune in seconds.)
    """
    W = np.asarray(W)
    mag = np.abs(W if np.issubdtype(W.dtype, np.floating) else W.astype(np.float64))
    if not np.all(np.isfinite(mag)):
        raise ValueError("2:4 pruning needs finite weights; W has NaN or inf")
    g = _groups_of_4(mag)
    above = np.zeros(g.shape, dtype=np.uint8)
    for i in range(4):
        for j in range(4):
            if i != j:
                beats = g[:, j, :] > g[:, i, :] if j > i else g[:, j, :] >= g[:, i, :]
                above[:, i, :] += beats
    return (above < 2).reshape(W.shape)


def prune_2_4(W: np.ndarray) -> np.ndarray:
    """W with the 2 smallest magnitudes of every 4 along K set to zero."""
    W = np.asarray(W)
    return np.where(keep_mask_2_4(W), W, np.zeros((), dtype=W.dtype))


def is_2_4(W: np.ndarray) -> bool:
    return bool(np.all(np.count_nonzero(_groups_of_4(np.asarray(W)), axis=1) <= 2))


def compress_2_4(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a 2:4 matrix into values (K/2, N) and increasing indices 0..3 (K/2, N)."""
    W = np.asarray(W)
    if not is_2_4(W):
        raise ValueError("W is not 2:4 sparse along K: some group of 4 rows has more than 2 non-zeros")
    g = _groups_of_4(W)
    # Non-zeros first, keeping row order; the padding of groups with < 2 non-zeros then
    # takes the lowest unused rows, which hold zeros, so values stay exact.
    order = np.argsort(g == 0, axis=1, kind="stable")[:, :2, :]
    idx = np.sort(order, axis=1)
    vals = np.take_along_axis(g, idx, axis=1)
    K, N = W.shape
    return vals.reshape(K // 2, N), idx.astype(np.uint8).reshape(K // 2, N)


def decompress_2_4(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Inverse of compress_2_4: a (K, N) matrix with the values at their indices."""
    if values.shape != indices.shape or values.ndim != 2 or values.shape[0] % 2:
        raise ValueError("values and indices must be (K/2, N) matrices of the same shape")
    K2, N = values.shape
    out = np.zeros((K2 // 2, 4, N), dtype=values.dtype)
    np.put_along_axis(out, indices.reshape(K2 // 2, 2, N).astype(np.intp), values.reshape(K2 // 2, 2, N), axis=1)
    return out.reshape(2 * K2, N)
