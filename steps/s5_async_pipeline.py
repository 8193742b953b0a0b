"""Rung 5: a cp.async multi-stage pipeline, so the weights stream at full bandwidth.

s4 had each warp wait for its own loads. Here every block keeps STAGES - 1 tiles of A,
weights and scales in flight with cp.async (which holds no registers while it waits),
marks the weight copies L2 evict-first (read once; they should not evict A, scales and
outputs), double-buffers the register fragments so shared-memory reads overlap the
tensor cores, and gives each block 8 warps: TILE_N / 64 side by side along N, the rest
splitting K, their partial sums added in shared memory. The grid is still plain: one
block per (TILE_N-column slice, 64-row slab), each walking all of K -- N / TILE_N blocks
whether or not that matches the GPU's SM count (s6 fixes that).

Error bound constant c = 10, as for s4: the partial sums of the warps are added in
fp32, so the fp16 roundings are still just the result's and the reference's. Weights with
zero points stream them beside the scales (see s6). A weight quantized with bf16 scales
runs the same pipeline on bf16 activations and output (the BF16 define: bf16 mma and a
bf16 magic number for the dequantization, explained in s4_fragments.cuh); the bound is
then relative to bf16's unit roundoff.

The kernel is csrc/s5_async_pipeline.cu, a plain grid around the ring of
csrc/s5_pipeline.cuh (`marlin::Pipeline`), which multiplies with rung 4's fragments.

Tile configurations (the kernel's defines) are chosen by `tile_plan` from H100
measurements: 256 x 128 (TILE_K x TILE_N) with 4 stages up to 32 rows, 128 x 128 with the
stages that fit in 96 KB above.
"""

from __future__ import annotations

import contextvars
import functools
import math
from dataclasses import dataclass, replace
from typing import Any

from reference import QuantizedWeight
from reference.marlin_layout import scale_rows_per_tile

from ._cuda import CudaStep, get_kernel, sm_count
from .s4_marlin_layout import MAX_M_BLOCKS, i32, m_blocks_for, pack_marlin
from .step import SUPPORTED, Packed, Support

THREADS = 256


@dataclass(frozen=True)
class TileConfig:
    """One compiled variant of rung 5's kernel (marlin::Pipeline's template arguments).

    The launch figures (threads, shared memory) are computed here, once, and passed to the
    kernel as LAUNCH_THREADS / LAUNCH_SMEM_BYTES, where a static_assert checks them against
    the pipeline's own: a host that disagrees with the kernel does not compile."""

    m_blocks: int
    tile_n: int
    tile_k: int
    stages: int
    group_size: int  # as reference.QuantizedWeight: -1 is one group of all K rows
    evict_first: bool = True
    zero_points: bool = False  # w = (q - z) * s: a stream of zero points beside the scales
    bf16: bool = False  # bf16 activations, scales, zero points and output instead of fp16

    @property
    def scale_rows(self) -> int:
        return scale_rows_per_tile(self.group_size, self.tile_k)

    @property
    def stage_bytes(self) -> int:
        a = 16 * self.m_blocks * self.tile_k // 8
        b = (self.tile_k // 16) * self.tile_n // 2
        per_group_streams = 2 if self.zero_points else 1
        return 16 * (a + b + per_group_streams * self.scale_rows * self.tile_n // 8)

    @property
    def reduce_bytes(self) -> int:
        """The in-block reduction's buffer: (K_WARPS - 1) x N_STRIPS warps' 32 x 32 floats."""
        strips = self.tile_n // 64
        return (THREADS // 32 // strips - 1) * strips * 32 * 32 * 4

    @property
    def bytes_beside_stages(self) -> int:
        """Shared memory besides the stages: none, the k-warp reduction reuses them once idle."""
        return 0

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory (LAUNCH_SMEM_BYTES, checked against the kernel's SMEM_BYTES)."""
        return max(self.stages * self.stage_bytes, self.reduce_bytes)

    def defines(self) -> tuple[tuple[str, int], ...]:
        return (
            ("M_BLOCKS", self.m_blocks),
            ("TILE_N", self.tile_n),
            ("TILE_K", self.tile_k),
            ("STAGES", self.stages),
            ("GROUP_SIZE", self.group_size),
            ("EVICT_FIRST", int(self.evict_first)),
            ("ZERO_POINTS", int(self.zero_points)),
            ("BF16", int(self.bf16)),
            ("LAUNCH_THREADS", THREADS),
            ("LAUNCH_SMEM_BYTES", self.smem_bytes),
        )


@dataclass(frozen=True)
class TilePlan:
    """How a rung picks its configuration for a batch: tile shapes (TILE_K, TILE_N) in order
    of preference (the first that divides K and N wins), the shared memory the stages may
    use (a reduction buffer of its own comes on top), and the most stages worth having."""

    tiles: tuple[tuple[int, int], ...]
    smem_budget: int
    max_stages: int


# Measured on an H100 (33792 x 16896, docs/rungs.md). Up to 32 rows: tall 256 x 128 tiles
# (twice the bytes per stage and per barrier of MARLIN's 128 x 128), 4 stages (deeper
# pipelines were 1-3 % slower). For 33-64 rows, whose accumulators fill the registers,
# 128 x 128 with a short pipeline. 64 x 256 is the fallback for K divisible by 64 only.
SMALL_BATCH_PLAN = TilePlan(((256, 128), (128, 128), (64, 256)), 200 * 1024, 4)
LARGE_BATCH_PLAN = TilePlan(((128, 128), (64, 256)), 96 * 1024, 8)


def common_tiles(*plans: TilePlan) -> tuple[tuple[int, int], ...]:
    """The (TILE_K, TILE_N) every one of `plans` offers: shapes a rung runs at any batch size."""
    return tuple(tile for tile in plans[0].tiles if all(tile in plan.tiles for plan in plans))


def dividing_tiles(K: int, N: int, tiles) -> list[tuple[int, int]]:
    """The (TILE_K, TILE_N) of `tiles` that divide K and N, in their order."""
    return [(tk, tn) for tk, tn in tiles if K % tk == 0 and N % tn == 0]


def tile_shapes_for(K: int, N: int, plan: TilePlan) -> tuple[int, int] | None:
    """The plan's first (TILE_K, TILE_N) that divides K and N, or None."""
    return next(iter(dividing_tiles(K, N, plan.tiles)), None)


@functools.cache
def max_dynamic_smem(device: int) -> int:
    import cupy

    with cupy.cuda.Device(device):
        return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device)


class PipelinedStep(CudaStep):
    """Host side of the pipelined kernels: configuration choice and kernel loading."""

    checks_each_variant = True  # many compiled variants: each is checked where it is loaded

    error_c = 10.0
    evict_first = True
    supports_zero_points = True
    activation_dtypes = ("float16", "bfloat16")
    config_type = TileConfig
    even_stages = True  # odd pipeline depths above 4 measured slower (s5, s6)
    # Tuning overrides of the plan (None: use tile_plan's value).
    smem_budget: int | None = None
    max_stages: int | None = None
    tile_override: tuple[int, int] | None = None  # (TILE_K, TILE_N)
    shape_multiples = common_tiles(SMALL_BATCH_PLAN, LARGE_BATCH_PLAN)  # the plans of tile_plan

    def tile_plan(self, M: int, N: int, sms: int | None) -> TilePlan:
        """The plan for an M x N output on a GPU with `sms` SMs; sms=None stands for any GPU
        (supports() must not depend on the device), which a plan may only widen."""
        return SMALL_BATCH_PLAN if M <= 32 else LARGE_BATCH_PLAN

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        plan = self.tile_plan(M, N, None)
        if tile_shapes_for(K, N, plan) is None:
            shapes = ", ".join(f"K by {tk} and N by {tn}" for tk, tn in plan.tiles)
            return Support(False, f"{self.name} needs K and N divisible by one of its tile shapes ({shapes}), got K={K}, N={N}")
        return SUPPORTED

    def pack_host(self, qw: QuantizedWeight) -> dict[str, Any]:
        return pack_marlin(qw)

    def m_blocks(self, M: int, tile_k: int, tile_n: int) -> int:
        """16-row blocks of A per slab for an M-row batch with this tile."""
        return m_blocks_for(M)

    def config(
        self, M: int, K: int, N: int, group_size: int, device: int, zero_points: bool = False, bf16: bool = False
    ) -> TileConfig:
        """The compiled variant for this call: the plan's first tile shape that divides K and
        N and whose stages (at least 3) fit the device's shared memory (or the variant a
        first-run check is probing)."""
        probed = _PROBED_VARIANT.get()
        if probed is not None:
            return probed
        plan = self.tile_plan(M, N, sm_count(device))
        tiles = dividing_tiles(K, N, plan.tiles)
        if zero_points and m_blocks_for(M) == MAX_M_BLOCKS:
            # 64-row slabs of 128 x 256 tiles with zero points fill all 255 registers and spill
            # at group size 32 (two scale and zero-point rows per tile); kept off them at every
            # group size, as measured-safe. A narrower tile of the plan always divides K and N then.
            tiles = [t for t in tiles if t != (128, 256)]
        tiles = dividing_tiles(K, N, [self.tile_override] if self.tile_override else []) or tiles
        limit = max_dynamic_smem(device)
        for tk, tn in tiles:
            probe = self.config_type(self.m_blocks(M, tk, tn), tn, tk, 1, group_size, self.evict_first, zero_points, bf16)
            stages = min(self.max_stages or plan.max_stages, self.stage_budget(probe, plan, device) // probe.stage_bytes)
            if self.even_stages and stages > 4:
                stages -= stages % 2
            cfg = replace(probe, stages=max(3, stages))
            if cfg.smem_bytes <= limit:
                return cfg
        raise ValueError(
            f"{self.name}: no tile shape for M={M}, K={K}, N={N}, group size {group_size} fits 3 pipeline stages "
            f"in this GPU's {limit} bytes of shared memory per block; use a rung below or a GPU with more"
        )

    def stage_budget(self, probe: TileConfig, plan: TilePlan, device: int) -> int:
        """Shared memory the stages may fill: the plan's budget, within what the device allows
        next to whatever the configuration needs besides its stages."""
        return min(self.smem_budget or plan.smem_budget, max_dynamic_smem(device) - probe.bytes_beside_stages)

    def kernel(self, cfg: TileConfig, device: int) -> Any:
        """The compiled variant `cfg`, checked against the reference the first time it runs
        on this kind of GPU (steps/_first_run.py); VariantRefused if it failed."""
        self.first_run_check(cfg, device, functools.partial(self._probe_variant, cfg))
        return _load(self.name, cfg, device)

    def check_first_run(self, K: int, N: int, group_size: int, zero_points: bool, dtype: str, device: int) -> None:
        K, N = self.padded_shape(K, N, group_size)  # the shape the kernel runs (steps/_padding.py)
        self.kernel(self.config(1, K, N, group_size, device, zero_points, dtype == "bfloat16"), device)

    def _probe_variant(self, cfg: TileConfig, device: int) -> str:
        """Run variant `cfg` on the smallest problem it serves: two tiles each way, one row
        short of its slab (so the row masking runs too)."""
        K = 2 * math.lcm(cfg.tile_k, max(cfg.group_size, 1))
        token = _PROBED_VARIANT.set(cfg)
        try:
            dtype = "bfloat16" if cfg.bf16 else "float16"
            return self.probe(max(1, 16 * cfg.m_blocks - 1), K, 2 * cfg.tile_n, cfg.group_size, cfg.zero_points, dtype, device)
        finally:
            _PROBED_VARIANT.reset(token)


# The variant a first-run check runs: config() returns it for the probe's product.
_PROBED_VARIANT: contextvars.ContextVar[TileConfig | None] = contextvars.ContextVar("probed_variant", default=None)


@functools.cache
def _load(source: str, cfg: TileConfig, device: int) -> Any:
    kernel = get_kernel(source, source, cfg.defines(), device=device)
    if cfg.smem_bytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = cfg.smem_bytes
    return kernel


class AsyncPipeline(PipelinedStep):
    name = "s5_async_pipeline"
    title = "cp.async multi-stage pipeline, evict-first weights, 8 warps"
    idea = (
        "Keep several tiles in flight with a cp.async shared-memory pipeline (weights L2 evict-first), "
        "double-buffer the register fragments and split K among a block's warps."
    )

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        M, K, N = A.shape[0], packed.K, packed.N
        cfg = self.config(M, K, N, packed.group_size, packed.device, "zeros" in packed.arrays, packed.dtype == "bfloat16")
        grid = (N // cfg.tile_n, -(-M // (16 * cfg.m_blocks)))
        args = (A, packed.arrays["qweight"], packed.arrays["scales"], zeros_or_scales(packed), out, i32(M), i32(K), i32(N))
        self.kernel(cfg, packed.device)(grid, (THREADS,), args, shared_mem=cfg.smem_bytes)


def zeros_or_scales(packed: Packed) -> Any:
    """The kernels' Z argument: the permuted zero points, or (never read) the scales."""
    return packed.arrays.get("zeros", packed.arrays["scales"])
