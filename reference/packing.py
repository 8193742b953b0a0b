"""Packing 4-bit codes into 32-bit words, eight codes along K per word.

This is the plain layout the early rungs stream, and the one GPTQ checkpoints use for
`qweight`: word (r, n) holds the codes of rows 8r..8r+7 of column n, row 8r+i in bits
4i..4i+3. Unpacking is the exact inverse.
"""

from __future__ import annotations

import numpy as np


def pack_int4_along_k(codes: np.ndarray) -> np.ndarray:
    """uint8 codes (K, N) in 0..15 -> int32 words (K/8, N)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] % 8:
        raise ValueError(f"codes must be (K, N) with K divisible by 8, got shape {codes.shape}")
    if codes.size and codes.max() > 15:
        raise ValueError("codes must lie in 0..15")
    K, N = codes.shape
    nibbles = codes.reshape(K // 8, 8, N).astype(np.uint32)
    shifts = (4 * np.arange(8, dtype=np.uint32))[None, :, None]
    return np.bitwise_or.reduce(nibbles << shifts, axis=1).view(np.int32)


def unpack_int4_along_k(words: np.ndarray) -> np.ndarray:
    """int32 words (K/8, N) -> uint8 codes (K, N)."""
    words = np.asarray(words).view(np.uint32)
    R, N = words.shape
    shifts = (4 * np.arange(8, dtype=np.uint32))[None, :, None]
    return ((words[:, None, :] >> shifts) & 0xF).astype(np.uint8).reshape(8 * R, N)
