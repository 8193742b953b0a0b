"""Rung 6: the full MARLIN kernel -- SM-striped partition with a no-wait global reduction.

s5's grid of one block per column slice leaves SMs idle whenever N / TILE_N does not
match the SM count. Here one block per SM (at most) takes an equal run of weight tiles
in the order "column slice by column slice, K innermost" (`reference.marlin_layout.
striped_schedule` is the exact model, and supplies `iters`). Blocks that share a column
slice store fp32 partial sums in a workspace and count themselves in the slice's
counter; the last to arrive adds the partials in block order and writes the output.
The original MARLIN instead adds them serially in the fp16 output, each block waiting for
the previous one, which on small layers costs as much as the weight stream. M is cut
into 64-row slabs, up to 16 per launch, which are simply more column slices to stripe.

The kernel is rung 5's pipeline with a cursor that runs across column slices and a k-warp
reduction buffer of its own (csrc/s6_stripes.cuh); it multiplies with `mma.sync` on every
GPU, as the MARLIN paper's kernel does (Hopper's own instructions are a rung of their own).

Error bound constant c = 10, as for s4 and s5: partial sums stay fp32 until the single
final rounding, and adding them is part of the fp32 sum over K. Like s5 it takes weights
with zero points (AWQ, asymmetric GPTQ): a second per-group stream beside the scales, and
fp16((q - z) * s) formed with one rounding, bit for bit the reference's
(reference.marlin_layout.dequantize_marlin models it).

The workspace (one int32 counter per column slice and slab, and two fp32 partial-sum
buffers per block) is one per stream and one per captured graph (steps/_workspace.py), so
launches on several streams and graphs replayed concurrently never share it; it is
allocated on first use (pack allocates the current stream's), and every launch leaves the
counters zeroed, so CUDA-graph capture and replay need nothing per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference import QuantizedWeight
from reference.marlin_layout import stripe_length

from ._cuda import sm_count
from ._workspace import ReductionWorkspace, WorkspaceCache
from .s4_marlin_layout import i32
from .s5_async_pipeline import (
    LARGE_BATCH_PLAN,
    SMALL_BATCH_PLAN,
    THREADS,
    PipelinedStep,
    TileConfig,
    TilePlan,
    common_tiles,
    zeros_or_scales,
)
from .step import Packed

MAX_SLABS = 16  # 64-row slabs per launch: M up to 1024 rows in one launch
MIN_TILE_N = 128
# Above 32 rows s6 can use wide 128 x 256 tiles (each A fragment feeds twice the weights)
# with a deep pipeline, as long as there are enough of them: with fewer than one 256-wide
# column slice per two SMs, several blocks share each slice and the last one's serial read
# of their 64 x 256 fp32 partials costs more than the wide tiles save (H100, docs/rungs.md).
LARGE_BATCH_WIDE_PLAN = TilePlan(((128, 256),) + LARGE_BATCH_PLAN.tiles, 200 * 1024, 8)
LARGE_BATCH_NARROW_PLAN = TilePlan(LARGE_BATCH_PLAN.tiles, 200 * 1024, 8)
# From 17 to 32 rows the same holds with rung 5's 4 stages: 128 x 256 first (mma.sync measured
# the same with 256 x 256 at M = 32 on the H100, docs/rungs.md). Up to 16 rows rung 5's tall
# 256 x 128 tiles beat 128 x 256 on every wide shape measured, within the noise on
# 4096 x 22016 at M = 1 (tune9 in docs/results/tuning).
TWO_BLOCK_WIDE_PLAN = TilePlan(((128, 256),) + SMALL_BATCH_PLAN.tiles, SMALL_BATCH_PLAN.smem_budget, 4)
MAX_PARTIAL_FLOATS = 64 * 256  # one block's partial sums of a slice: a 64-row slab x TILE_N <= 256


@dataclass(frozen=True)
class StripedTileConfig(TileConfig):
    """One compiled variant of s6's kernel (marlin::StripedPipeline): a block's fetches run on
    into its next column slice while it reduces this one, so the k-warp reduction has shared
    memory of its own after the stages."""

    @property
    def bytes_beside_stages(self) -> int:
        return self.reduce_bytes

    @property
    def smem_bytes(self) -> int:
        return self.stages * self.stage_bytes + self.reduce_bytes


class Marlin(PipelinedStep):
    name = "s6_marlin"
    title = "MARLIN: SM-striped tiles, no-wait fp32 global reduction"
    idea = (
        "Give each SM an equal run of weight tiles striped across column slices; blocks sharing a slice "
        "store fp32 partials and the last to arrive adds them in a fixed order."
    )
    error_c = 10.0
    config_type = StripedTileConfig
    shape_multiples = common_tiles(SMALL_BATCH_PLAN, TWO_BLOCK_WIDE_PLAN, LARGE_BATCH_WIDE_PLAN, LARGE_BATCH_NARROW_PLAN)
    sms: int | None = None  # blocks per launch; None = the device's SM count
    threads = THREADS  # per block
    # What sharing a column slice costs a block, in weight tiles (reference.marlin_layout.
    # stripe_length): storing its partials and counting itself, or reading everyone's.
    reduction_cost: float = 4.0
    partial_floats = MAX_PARTIAL_FLOATS  # a workspace slot: the largest partial sums a block stores

    def __init__(self) -> None:
        self._workspaces = WorkspaceCache()

    def tile_plan(self, M: int, N: int, sms: int | None) -> TilePlan:
        wide = sms is None or N >= 128 * (self.sms or sms)  # N / 256 column slices >= half the SMs
        if M <= 16:
            return SMALL_BATCH_PLAN
        if M <= 32:
            return TWO_BLOCK_WIDE_PLAN if wide else SMALL_BATCH_PLAN
        return LARGE_BATCH_WIDE_PLAN if wide else LARGE_BATCH_NARROW_PLAN

    def pack(self, qw: QuantizedWeight) -> Packed:
        packed = super().pack(qw)
        self.workspace(packed.device, qw.N)
        return packed

    def workspace(self, device: int, N: int) -> ReductionWorkspace:
        """The zeroed workspace of CuPy's current stream (or capture) on `device`, serving N columns."""
        counters = max(MAX_SLABS * (N // MIN_TILE_N), 4096)
        partials = 2 * max(self.sms or 0, sm_count(device)) * self.partial_floats
        return self._workspaces.get(device, counters, partials)

    def schedule(
        self, M: int, K: int, N: int, group_size: int, device: int, zero_points: bool = False, bf16: bool = False
    ):
        """(config, iters, blocks) of each launch's slab group, from the CPU model."""
        cfg = self.config(M, K, N, group_size, device, zero_points, bf16)
        if 16 * cfg.m_blocks * cfg.tile_n > self.partial_floats:  # neighbouring slots would overlap
            raise ValueError(
                f"{self.name}: a {16 * cfg.m_blocks} x {cfg.tile_n} tile's partial sums exceed the workspace slot "
                f"of {self.partial_floats} floats; use TILE_N <= {self.partial_floats // (16 * cfg.m_blocks)}"
            )
        slabs = -(-M // (16 * cfg.m_blocks))
        k_tiles, n_tiles = K // cfg.tile_k, N // cfg.tile_n
        sms = self.sms or sm_count(device)
        iters = stripe_length(slabs * k_tiles * n_tiles, k_tiles, sms, self.reduction_cost)
        return cfg, iters, -(-(slabs * k_tiles * n_tiles) // iters)

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        M, K, N = A.shape[0], packed.K, packed.N
        ws = self.workspace(packed.device, N)
        rows_per_launch = MAX_SLABS * 64
        for r0 in range(0, M, rows_per_launch):
            r1 = min(M, r0 + rows_per_launch)
            cfg, iters, blocks = self.schedule(
                r1 - r0, K, N, packed.group_size, packed.device, "zeros" in packed.arrays, packed.dtype == "bfloat16"
            )
            args = (A[r0:r1], packed.arrays["qweight"], packed.arrays["scales"], zeros_or_scales(packed), out[r0:r1],
                    i32(r1 - r0), i32(K), i32(N), ws.counters, ws.partials, i32(iters))
            self.start(self.kernel(cfg, packed.device), blocks, args, cfg)

    def start(self, kernel: Any, blocks: int, args: tuple, cfg: Any) -> None:
        """Launch one slab group's kernel (variant `cfg`) on CuPy's current stream."""
        kernel((blocks,), (self.threads,), args, shared_mem=cfg.smem_bytes)


