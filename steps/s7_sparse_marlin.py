"""Rung 7: Sparse-MARLIN -- 2:4-pruned weights, stored compressed, on sparse tensor cores.

s6 streams 4 bits per weight and is bound by that stream. Here the weight keeps 2 of every
4 values along K: the kernel streams the kept codes (2 bits per weight) and their 2-bit
positions (1 bit per weight), 3/4 of s6's bytes, and multiplies with `mma.sp.m16n8k32`,
which does twice the K of `mma.sync` per instruction. Sparse tensor cores take the sparse
operand as their left factor, so the kernel computes C^T = W^T A^T; csrc/s7_sparse_marlin.cu
opens with the data flow, and reference/sparse_marlin.py models it lane by lane.

What s7 computes: `pack` receives any QuantizedWeight and prunes it 2:4 along K by the
magnitude of the dequantized values, ties to the lower row (`reference.sparse_marlin.
prune_quantized_2_4`); the product is with that pruned weight, which `reference_weight`
returns, so the check is reference_gemm(A, step.reference_weight(qw)). A weight that is
already 2:4 sparse is unchanged by the pruning.

Everything else is s6: the SM-striped schedule, the no-wait fp32 global reduction with its
workspace, slabs of 64 rows for M > 64. The kernel runs rung 5's ring skeleton
(csrc/s5_pipeline.cuh: ring_start, ring_fetch, ring_consume) with its own streams and
fragments, and rung 6's cursor, walk and reduction (csrc/s6_stripes.cuh). Error bound constant c = 10 as for s6: the
accumulation runs over the K/2 kept products only, so the fp32 term 2 (K/2) 2**-24 stays
below 8u up to K = 65536.

Tiles (TILE_K x TILE_N): 256 x 128 for M <= 16, 128 x 256 above, so a stage holds the same
kept bytes as s6's 128 x 128 and 64 x 256 tiles while covering twice the K.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from reference import QuantizedWeight
from reference.sparse_marlin import pack_sparse_marlin, prune_quantized_2_4

from ._padding import pad_weight, round_up
from .s4_marlin_layout import i32, m_blocks_for
from .s5_async_pipeline import THREADS, TilePlan, common_tiles
from .s6_marlin import MAX_SLABS, Marlin, StripedTileConfig
from .step import Packed

SMALL_BATCH_TILE = (256, 128)  # (TILE_K, TILE_N): more column slices, finer balance across SMs
LARGE_BATCH_TILE = (128, 256)  # each A fragment feeds more weight tiles
# Up to 16 rows the small tile first, above it the large one; stages fill 160 KB, up to 8.
SPARSE_SMALL_BATCH_PLAN = TilePlan((SMALL_BATCH_TILE, LARGE_BATCH_TILE), 160 * 1024, 8)
SPARSE_LARGE_BATCH_PLAN = TilePlan((LARGE_BATCH_TILE, SMALL_BATCH_TILE), 160 * 1024, 8)
# With 256 x 128 tiles, 4 m-blocks of accumulators no longer fit in registers next to the
# pipeline state (ptxas spills), so batches above 48 rows use 48-row slabs there.
SMALL_TILE_MAX_M_BLOCKS = 3


@dataclass(frozen=True)
class SparseTileConfig(StripedTileConfig):
    """One compiled variant of the s7 kernel; a stage adds the metadata to s6's streams."""

    @property
    def stage_bytes(self) -> int:
        steps = self.tile_k // 32
        a = 16 * self.m_blocks * self.tile_k // 8
        codes = steps * self.tile_n // 2
        meta = steps * self.tile_n // 4
        return 16 * (a + codes + meta + self.scale_rows * self.tile_n // 8)


class SparseMarlin(Marlin):
    name = "s7_sparse_marlin"
    title = "Sparse-MARLIN: 2:4-pruned weights on sparse tensor cores (mma.sp)"
    idea = (
        "Prune the weights 2:4 along K, stream only the kept codes and their 2-bit positions, and "
        "multiply with mma.sp on the transposed product: 3/4 of the bytes and half the tensor-core work."
    )
    error_c = 10.0
    supports_zero_points = False
    activation_dtypes = ("float16",)
    config_type = SparseTileConfig
    shape_multiples = common_tiles(SPARSE_SMALL_BATCH_PLAN, SPARSE_LARGE_BATCH_PLAN)
    even_stages = False

    def tile_plan(self, M: int, N: int, sms: int | None) -> TilePlan:
        return SPARSE_SMALL_BATCH_PLAN if M <= 16 else SPARSE_LARGE_BATCH_PLAN

    def reference_weight(self, qw: QuantizedWeight) -> QuantizedWeight:
        if qw.K % 4 == 0:
            return prune_quantized_2_4(qw)
        # K not a multiple of 4 (group size -1 only): the rows pack pads with count as zeros.
        pruned = prune_quantized_2_4(pad_weight(qw, round_up(qw.K, 4), qw.N))
        return replace(pruned, codes=pruned.codes[: qw.K])

    def pack_host(self, qw: QuantizedWeight) -> dict[str, Any]:
        return pack_sparse_marlin(qw)

    def m_blocks(self, M: int, tile_k: int, tile_n: int) -> int:
        m_blocks = m_blocks_for(M)
        return min(m_blocks, SMALL_TILE_MAX_M_BLOCKS) if (tile_k, tile_n) == SMALL_BATCH_TILE else m_blocks

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        M, K, N = A.shape[0], packed.K, packed.N
        ws = self.workspace(packed.device, N)
        # At most MAX_SLABS slabs per launch (the workspace holds that many counters per slice).
        rows_per_launch = MAX_SLABS * 16 * self.config(M, K, N, packed.group_size, packed.device).m_blocks
        for r0 in range(0, M, rows_per_launch):
            r1 = min(M, r0 + rows_per_launch)
            cfg, iters, blocks = self.schedule(r1 - r0, K, N, packed.group_size, packed.device)
            arrays = packed.arrays
            args = (A[r0:r1], arrays["qweight"], arrays["meta"], arrays["scales"], out[r0:r1],
                    i32(r1 - r0), i32(K), i32(N), ws.counters, ws.partials, i32(iters))  # fmt: skip
            self.kernel(cfg, packed.device)((blocks,), (THREADS,), args, shared_mem=cfg.smem_bytes)
