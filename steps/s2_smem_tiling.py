"""Rung 2: thread blocks tile A and the packed weights through shared memory (CUDA C++).

Rung 1 fetched every weight word once per row of A and every activation once per column,
one scalar at a time. Here a block of threads owns a tile of C: it loads a slice of A and
of the packed int4 weights once, with coalesced 16-byte loads, dequantizes each weight once
into shared memory, and every thread then reuses those values for a small block of outputs
it keeps in fp32 registers. Global traffic drops by the tile sizes and the loop becomes
shared-memory loads and FMAs. The kernel is csrc/s2_smem_tiling.cu, compiled by NVRTC at
first use.

Error bound constant c = 4, as for s0: fp32 accumulation of the exact fp16 weights, one
rounding to fp16 at the end.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from reference import QuantizedWeight, group_rows

from ._cuda import CudaStep, get_kernel
from .s0_numpy import plain_int4_layout
from .step import SUPPORTED, Packed, Support

THREADS = 128
BLOCK_N = 128
MAX_GRID_Y = 65535


def group_shift(K: int, group_size: int) -> int:
    """log2 of the rows of K that share a scale, as the plain-layout kernels take it.

    Per-column scales (group_size -1) are one group as tall as K: any shift with
    2**shift >= K sends every row to group 0.
    """
    return max(group_rows(group_size, K) - 1, 1).bit_length()


def block_m(M: int) -> int:
    """Rows of A per block: 16 covers a decode-sized batch without idle rows, 64 reuses weights more."""
    return 16 if M <= 16 else 64


VECTOR_LOAD_MULTIPLES = (8, 4)  # (K, N): the 16-byte loads of the plain layout


def vector_load_support(K: int, N: int) -> Support:
    """The shapes the 16-byte loads of the plain layout allow (shared with rung 3)."""
    k_multiple, n_multiple = VECTOR_LOAD_MULTIPLES
    if K % k_multiple:
        return Support(False, f"K={K} must be divisible by {k_multiple} (eight 4-bit codes per int32 word; rows of A load as 16-byte vectors)")
    if N % n_multiple:
        return Support(False, f"N={N} must be divisible by {n_multiple} (weights and scales load as 16- and 8-byte vectors of 4 columns)")
    return SUPPORTED


@functools.cache
def _kernel(bm: int, device: int) -> Any:
    return get_kernel("s2_smem_tiling", "s2_smem_tiling", (("S2_BM", bm),), device)


class SmemTiling(CudaStep):
    name = "s2_smem_tiling"
    title = "CUDA C++: shared-memory tiling, FP32 FMA"
    idea = "Blocks stage tiles of A and the int4 weights in shared memory with coalesced 16-byte loads, dequantize each weight once, and reuse it from registers across many FP32 FMAs."
    error_c = 4.0
    shape_multiples = (VECTOR_LOAD_MULTIPLES,)
    out_vector_bytes = 8  # four fp16 outputs per store

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        vectors = vector_load_support(K, N)
        if not vectors:
            return vectors
        if M > MAX_GRID_Y * block_m(M):
            return Support(False, f"M={M} is above {MAX_GRID_Y * block_m(M)}, the most rows one launch covers")
        return SUPPORTED

    def pack_host(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        return plain_int4_layout(qw)

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        M = A.shape[0]
        K, N = packed.K, packed.N
        bm = block_m(M)
        grid = (-(-N // BLOCK_N), -(-M // bm))
        args = (A, packed.arrays["qweight"], packed.arrays["scales"], out)
        sizes = (np.int32(M), np.int32(K), np.int32(N), np.int32(group_shift(K, packed.group_size)))
        _kernel(bm, packed.device)(grid, (THREADS,), args + sizes)
