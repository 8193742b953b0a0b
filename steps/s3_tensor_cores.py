"""Rung 3: fp16 tensor cores through inline PTX `mma.sync` and `ldmatrix` (CUDA C++).

Rung 2 spent its time on fp32 FMAs and the shared-memory loads feeding them. Here each warp
multiplies with `mma.sync.aligned.m16n8k16` (fp16 in, fp32 accumulators), which does a
16x8x16 block product in one instruction, and lifts its operands from shared memory with
`ldmatrix`, which delivers 8x8 fp16 blocks directly in the register layout mma expects.
The weights still travel as in rung 2 (coalesced 16-byte loads, the next slice in flight,
dequantized once into shared memory, now as fp16). With the arithmetic nearly free, what is
left is streaming the weights, and the kernel becomes memory- and latency-bound. The kernel
is csrc/s3_tensor_cores.cu.

Any M works: A is tiled in blocks of 16, 32 or 64 rows, rows past M are zeros in shared
memory and are never written out. Error bound constant c = 4, as for s0 (fp32 accumulation).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from reference import QuantizedWeight

from ._cuda import CudaStep, get_kernel, sm_count
from .s0_numpy import plain_int4_layout
from .s2_smem_tiling import MAX_GRID_Y, VECTOR_LOAD_MULTIPLES, group_shift, vector_load_support
from .step import SUPPORTED, Packed, Support

THREADS = 128
WIDE_N, NARROW_N = 128, 64


def m_tiles(M: int) -> int:
    """16-row tiles of A per block: as few as cover a small batch, four once M is large."""
    return 1 if M <= 16 else 2 if M <= 32 else 4


def block_n(M: int, N: int, sms: int) -> int:
    """Columns per block: 64 unless 128-column blocks still give every SM two of them.

    Two blocks on an SM overlap one's dequantization with the other's wait for memory
    (on the H100 at M=16, K x N = 33792 x 16896: 64 columns 305 us, 128 columns 412 us);
    once there are blocks enough, 128 columns halve how often each block re-reads A.
    """
    blocks = -(-N // WIDE_N) * -(-M // (16 * m_tiles(M)))
    return WIDE_N if blocks >= 2 * sms else NARROW_N


def shared_bytes(tiles: int, bn: int) -> int:
    """Dynamic shared memory of one block: padded fp16 tiles of A and of the weights.

    K slices of 256 / tiles rows, each shared-memory row padded by 8 halves. Passed to the
    kernel as LAUNCH_SMEM_BYTES (see `defines`), where a static_assert checks it against its
    own SMEM_HALVES.
    """
    bk = 256 // tiles
    return 2 * (16 * tiles * (bk + 8) + bk * (bn + 8))


def defines(tiles: int, bn: int) -> tuple[tuple[str, int], ...]:
    """The kernel's compile-time configuration, with the launch figures it checks."""
    return (("S3_M_TILES", tiles), ("S3_BN", bn), ("LAUNCH_THREADS", THREADS), ("LAUNCH_SMEM_BYTES", shared_bytes(tiles, bn)))


@functools.cache
def _kernel(tiles: int, bn: int, device: int) -> Any:
    kernel = get_kernel("s3_tensor_cores", "s3_tensor_cores", defines(tiles, bn), device)
    kernel.max_dynamic_shared_size_bytes = shared_bytes(tiles, bn)
    return kernel


class TensorCores(CudaStep):
    name = "s3_tensor_cores"
    title = "CUDA C++: mma.sync tensor cores with ldmatrix"
    idea = "Replace the FP32 FMAs with fp16 tensor-core mma.sync m16n8k16 instructions fed by ldmatrix from shared memory, so the kernel becomes a weight stream."
    error_c = 4.0
    shape_multiples = (VECTOR_LOAD_MULTIPLES,)

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        vectors = vector_load_support(K, N)
        if not vectors:
            return vectors
        rows = MAX_GRID_Y * 16 * m_tiles(M)
        if M > rows:
            return Support(False, f"M={M} is above {rows}, the most rows one launch covers")
        return SUPPORTED

    def pack_host(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        return plain_int4_layout(qw)

    def config(self, M: int, N: int, device: int = 0) -> tuple[int, int]:
        """(16-row tiles of A, columns) per block that a product of M rows and N columns uses."""
        return m_tiles(M), block_n(M, N, sm_count(device))

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        M = A.shape[0]
        K, N = packed.K, packed.N
        tiles, bn = self.config(M, N, packed.device)
        grid = (-(-N // bn), -(-M // (16 * tiles)))
        args = (A, packed.arrays["qweight"], packed.arrays["scales"], out)
        sizes = (np.int32(M), np.int32(K), np.int32(N), np.int32(group_shift(K, packed.group_size)))
        _kernel(tiles, bn, packed.device)(grid, (THREADS,), args + sizes, shared_mem=shared_bytes(tiles, bn))
