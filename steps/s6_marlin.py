"""Rung 6: the full MARLIN kernel -- SM-striped partition with in-output global reduction.

s5's grid of one block per column slice leaves SMs idle whenever N / TILE_N does not
match the SM count. Here one block per SM (at most) takes an equal run of weight tiles
in the order "column slice by column slice, K innermost" (`reference.marlin_layout.
striped_schedule` is the exact model, and supplies `iters`); blocks that share a column
slice add their partial sums into the fp16 output in a fixed serial order, sequenced by
per-slice counters in a zeroed workspace that the kernel leaves zeroed. M is cut into
64-row slabs, up to 16 per launch, which are simply more column slices to stripe.

Error bound constant c = 17: the 10 of s4/s5 (result and reference roundings, fp32
accumulation over K) plus the fp16 roundings of partial sums in the output: a slice is
shared by at most MAX_SLICE_BLOCKS = 8 blocks, so a result passes through at most 7
fp16 partial sums, each rounding off at most u times |A| @ |W| (the partial sums of
|a w| never exceed the full one).

The workspace (one int32 counter per column slice and slab) is allocated once per
device, when weights are first packed there, and cached here; every launch leaves it
zeroed, so CUDA-graph capture and replay need nothing per call. Launches that share a
device must not run concurrently on different streams (they would share counters).
"""

from __future__ import annotations

from typing import Any

from reference import QuantizedWeight
from reference.marlin_layout import stripe_length

from ._cuda import sm_count
from .s4_marlin_layout import i32
from .s5_async_pipeline import THREADS, PipelinedStep
from .step import Packed

MAX_SLABS = 16  # 64-row slabs per launch: M up to 1024 rows in one launch
MIN_TILE_N = 128


class Marlin(PipelinedStep):
    name = "s6_marlin"
    title = "MARLIN: SM-striped tiles, serial in-output reduction"
    idea = (
        "Give each SM an equal run of weight tiles striped across column slices, and add the partial "
        "sums of shared slices in the output in a fixed order under per-slice locks."
    )
    error_c = 17.0
    sms: int | None = None  # blocks per launch; None = the device's SM count

    def __init__(self) -> None:
        self._workspaces: dict[int, Any] = {}

    def pack(self, qw: QuantizedWeight) -> Packed:
        packed = super().pack(qw)
        self.workspace(packed.device, MAX_SLABS * (qw.N // MIN_TILE_N))
        return packed

    def workspace(self, device: int, counters: int) -> Any:
        """This device's zeroed lock counters, grown (outside the hot path) to `counters`."""
        ws = self._workspaces.get(device)
        if ws is None or ws.size < counters:
            import cupy

            with cupy.cuda.Device(device):
                ws = cupy.zeros(max(counters, 4096), dtype=cupy.int32)
                cupy.cuda.Device(device).synchronize()
            self._workspaces[device] = ws
        return ws

    def schedule(self, M: int, K: int, N: int, group_size: int, device: int):
        """(config, iters, blocks) of each launch's slab group, from the CPU model."""
        cfg = self.config(M, K, N, group_size, device)
        slabs = -(-M // (16 * cfg.m_blocks))
        k_tiles, n_tiles = K // cfg.tile_k, N // cfg.tile_n
        sms = self.sms or sm_count(device)
        iters = stripe_length(slabs * k_tiles * n_tiles, k_tiles, sms)
        return cfg, iters, -(-(slabs * k_tiles * n_tiles) // iters)

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        M, K, N = A.shape[0], packed.K, packed.N
        locks = self.workspace(packed.device, MAX_SLABS * (N // MIN_TILE_N))
        rows_per_launch = MAX_SLABS * 64
        for r0 in range(0, M, rows_per_launch):
            r1 = min(M, r0 + rows_per_launch)
            cfg, iters, blocks = self.schedule(r1 - r0, K, N, packed.group_size, packed.device)
            args = (A[r0:r1], packed.arrays["qweight"], packed.arrays["scales"], out[r0:r1],
                    i32(r1 - r0), i32(K), i32(N), locks, i32(iters))
            self.kernel(cfg, packed.device)((blocks,), (THREADS,), args, shared_mem=cfg.smem_bytes)


