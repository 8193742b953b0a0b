"""Rung 4: the MARLIN layout -- weights go from global memory straight into mma fragments.

The weights are re-laid out once, offline (`reference.marlin_layout`): each lane's
128-bit load of a k16 row of its warp's 64-column strip holds exactly the 32 codes of
its B fragments for four 16 x 16 tiles, nibble-interleaved so that lop3 with the 0x6400
exponent trick dequantizes two weights per instruction pair, and the scales are permuted
so one 128-bit load gives a lane the 8 scales it needs. No shared memory, no ldmatrix
for the weights, no shuffling at run time: every weight bit is loaded once by the lane
that multiplies it. Memory parallelism comes from plain loads only: four warps share a
strip, each taking every fourth k16 row with 16 weight loads in flight per lane, and add
their partial sums in shared memory. What remains slow is latency: each warp stalls on
every batch of loads, on A and on the scales (s5's pipeline fixes that).

Error bound constant c = 10: one fp16 rounding of the result and one of the reference
(2), plus fp32 accumulation over K <= 32768 products inside the tensor cores, whose
adder may truncate rather than round: at most 2 K 2**-24 <= 8 u. The dequantized weight
fp16((q - 8) * s) is bit-identical to the reference's, so it adds nothing.

The kernel is csrc/s4_marlin_layout.cu on top of csrc/s4_fragments.cuh (the fragment
layout, the lop3 dequantization and the mma, which s5-s7 reuse unchanged). This module also
holds what s4, s5 and s6 share on the host: the packing (the same layout for all three) and
the slab split of M.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import QuantizedWeight
from reference.marlin_layout import pack_marlin_weights, permute_scales

from ._cuda import CudaStep, get_kernel
from .step import SUPPORTED, Packed, Support

MAX_M_BLOCKS = 4  # a slab is at most 64 rows of A: 4 m16 blocks of accumulators per lane


def pack_marlin(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """The MARLIN layout of s4-s6: fragment-ordered int32 words (K/16, 2N), permuted scales
    and, for weights with zero points, the zero points in the scales' dtype (fp16 or bf16:
    small integers, exact in both) permuted like the scales."""
    arrays = {"qweight": pack_marlin_weights(qw), "scales": permute_scales(qw.scales)}
    if qw.zeros is not None:
        arrays["zeros"] = permute_scales(qw.zeros.astype(qw.dtype))
    return arrays


def m_blocks_for(M: int) -> int:
    """16-row blocks per slab: just enough for M <= 64, else full 64-row slabs."""
    return min(MAX_M_BLOCKS, -(-M // 16))


def i32(x: int) -> np.int32:
    return np.int32(x)


class MarlinLayout(CudaStep):
    name = "s4_marlin_layout"
    title = "MARLIN layout: 128-bit loads into fragments, lop3 dequant"
    idea = (
        "Re-lay the weights offline so each lane's 128-bit load is its mma B fragments and "
        "dequantize with lop3 and the 0x6400 trick: no shared memory or shuffles for the weights."
    )
    error_c = 10.0
    THREADS = 128  # per block: 4 warps on one strip, splitting K (the kernel's THREADS define)
    shape_multiples = ((16, 64),)  # one mma k-step of 16 rows; one warp per 64 columns

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        (k_multiple, n_multiple), = self.shape_multiples
        if K % k_multiple or N % n_multiple:
            return Support(False, f"{self.name} needs K divisible by {k_multiple} and N by {n_multiple} (one warp per 64 columns), got K={K}, N={N}")
        return SUPPORTED

    def pack_host(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        return pack_marlin(qw)

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        M, K, N = A.shape[0], packed.K, packed.N
        mb = m_blocks_for(M)
        kernel = get_kernel(self.name, self.name, self.defines(mb, packed.group_size), device=packed.device)
        grid = (N // 64, -(-M // (16 * mb)))
        args = (A, packed.arrays["qweight"], packed.arrays["scales"], out, i32(M), i32(K), i32(N))
        kernel(grid, (self.THREADS,), args)

    def defines(self, m_blocks: int, group_size: int) -> tuple[tuple[str, int], ...]:
        """The kernel's compile-time configuration; the group size as the reference has it."""
        return (("M_BLOCKS", m_blocks), ("GROUP_SIZE", group_size), ("THREADS", self.THREADS))
