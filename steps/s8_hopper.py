"""Rung 8: Hopper-native -- stop issuing copies and start specializing warps.

s6 is the MARLIN paper's kernel: every thread copies, waits at the block barrier,
dequantizes and multiplies. On an H200 that one role cannot keep enough bytes in flight
per SM nor issue few enough instructions per weight (s6 streams at ~70 % of the read
bandwidth there, against ~98 % on an H100). This rung keeps s4's weight layout and
dequantization and s6's striped schedule and no-wait global reduction, and changes who
does what (csrc/s8_hopper.cu draws it):

* a producer warpgroup feeds a ring of 128 x 256 weight tiles: one thread hands each tile's
  weights (one tensor-map copy of its eight 2 KB rows), scales and activations (one tensor-map
  copy per 64 k, in wgmma's swizzled atoms) to the copy engine, completion counted in bytes on
  an mbarrier (at 49-64 rows all 128 threads copy the activation tile with cp.async); it never
  multiplies;
* two consumer warpgroups (with the producer's spare registers, `setmaxnreg`) take the
  tiles in turn, dequantize into registers and multiply the transposed product -- the
  weights as the register operand, the activations from shared memory -- with `mma.sync`
  m16n8k16 for launches of up to 16 rows and `wgmma` above, and hand each slot back on
  another mbarrier as soon as they are done with it (docs/rungs.md says why the instruction
  depends on the batch); a warpgroup keeps four k16 steps of wgmma in flight;
* from 65 rows a slab is 128 rows and both consumer warpgroups multiply every tile, each half
  its columns, with wgmma n128: the weights are read and dequantized once per 128 rows, and
  the part of a wgmma's cost that does not grow with n is spread over twice the tokens;
* the ring is as deep as shared memory allows (up to 8 slots, an even number so that each
  serves one consumer warpgroup, ~130 KB of weights in flight per SM), which is what the
  H200's bandwidth-latency product asks for;
* each launch is a programmatic dependent launch (steps/_dependent_launch.py): the kernel
  starts while the previous one in the stream finishes and requests its first ring of
  weights, which no kernel writes, before it waits for that one; on a 4096 x 4096 layer
  that is most of the fixed cost of a launch (docs/rungs.md, round 4);
* the blocks sharing a column slice store and read only the partial sums of the tokens the
  launch has (1 KB a block at M = 1, not 16: docs/rungs.md, round 7).
* at a slice's end a block waits only for what it needs now: at its run's first slice it
  counts in and goes on, looking at the answer when the run is done; at its last, if every
  other block is in already, it adds the slice without counting (docs/rungs.md, round 8).

Numerics: fp32 accumulation and fp32 partial sums added in block order, so results are
bit-identical run to run. The wgmma path multiplies s6's dequantized weights (one rounding of
(q - z) * s); the mma.sync path, where a scale group spans whole tiles, multiplies the exact
codes q - z and applies each column's scale to the tile's fp32 sums. Those weights are then
not the reference's rounded fp16((q - z) * s) but the exact product, which differs from it by
at most one rounding per weight: one u more than s4's c = 10, so c = 11. Compiled for
sm_90a, so the rung runs on compute capability 9.0 (H100, H200) only; there `MarlinLinear` takes it
by default (elsewhere s6).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ._cuda import get_kernel, gpu_support, has_wgmma
from . import _tensor_map as tensor_map
from ._dependent_launch import launch_dependent
from .s4_marlin_layout import m_blocks_for
from .s5_async_pipeline import _PROBED_VARIANT, max_dynamic_smem
from .s6_marlin import Marlin
from .step import SUPPORTED, Handover, Support

TILE_K, TILE_N = 128, 256  # one ring slot: 8 k16 rows x 256 columns of weights
THREADS = 384  # consumer warpgroups 0 and 1, producer warpgroup 2
MAX_STAGES = 8
SPLIT_COLUMNS_MIN_ROWS = 65  # from here a slab is 128 rows, both consumer warpgroups on every tile (csrc/s8_hopper.cu)
MMA_SYNC_MAX_ROWS = 16  # launches of up to this many rows multiply with mma.sync, larger with wgmma (docs/rungs.md, s8: measured)
REDUCE_BYTES = 4 * 32 * 32 * 4  # the warpgroups' hand-over buffer: one m-block of 4 warps


@dataclass(frozen=True)
class HopperConfig:
    """One compiled variant of s8_hopper.cu. The threads and shared memory are passed to the
    kernel (LAUNCH_THREADS, LAUNCH_SMEM_BYTES), which checks them against its own layout."""

    m_blocks: int
    stages: int
    group_size: int  # as reference.QuantizedWeight: -1 is one group of all K rows
    zero_points: bool
    bf16: bool
    wgmma: bool = True  # the consumers' instruction: wgmma, or mma.sync m16n8k16
    tma_weights: bool = True  # a tile's weights in one tensor-map copy (else eight bulk copies)
    tma_activations: bool = True  # thread 0 copies the activations by tensor map (else 128 threads' cp.async)
    tile_k = TILE_K
    tile_n = TILE_N

    @staticmethod
    def stage_bytes(m_blocks: int, group_size: int, zero_points: bool) -> int:
        a = 16 * m_blocks * TILE_K * 2
        w = TILE_K * TILE_N // 2
        s_rows = 1 if group_size == -1 or group_size >= TILE_K else TILE_K // group_size
        s = (2 if zero_points else 1) * s_rows * TILE_N * 2
        return -(-(a + w + s) // 1024) * 1024

    @staticmethod
    def fixed_bytes(stages: int) -> int:
        """Alignment slack, the hand-over buffer, the mbarriers (two per slot) and two words."""
        return 1024 + REDUCE_BYTES + 16 * stages + 16

    @property
    def smem_bytes(self) -> int:
        return self.fixed_bytes(self.stages) + self.stages * self.stage_bytes(self.m_blocks, self.group_size, self.zero_points)

    def defines(self) -> tuple[tuple[str, int], ...]:
        return (
            ("M_BLOCKS", self.m_blocks),
            ("STAGES", self.stages),
            ("GROUP_SIZE", self.group_size),
            ("ZERO_POINTS", int(self.zero_points)),
            ("BF16", int(self.bf16)),
            ("WGMMA", int(self.wgmma)),
            ("TMA_WEIGHTS", int(self.tma_weights)),
            ("TMA_ACTIVATIONS", int(self.tma_activations)),
            ("LAUNCH_THREADS", THREADS),
            ("LAUNCH_SMEM_BYTES", self.smem_bytes),
        )


class Hopper(Marlin):
    """s6's weight layout, schedule, launches and reduction workspace; Hopper's copies, barriers
    and MMA in the kernel (config and kernel are its own)."""

    name = "s8_hopper"
    title = "Hopper: bulk copies on mbarriers, a producer warpgroup, two consumer warpgroups"
    idea = (
        "Stop issuing copies and start specializing warps: a producer warpgroup streams weight tiles "
        "with the bulk copy engine into a deep mbarrier ring, two warpgroups dequantize and multiply."
    )
    # MarlinLinear takes it on Hopper: with the dependent launch it is ahead of s6 or within 2 % on
    # every measured H200 layer up to 16 rows, and behind only on narrow layers at 64 rows
    # (docs/rungs.md, round 4). Elsewhere available() refuses it and s6 runs.
    chosen_by_default = True
    error_c = 11.0  # s6's 10, plus the reference's rounding of each weight (module docstring)
    shape_multiples = ((TILE_K, TILE_N),)  # other shapes are padded once, in pack (steps/_padding.py)
    threads = THREADS
    max_stages: int | None = MAX_STAGES  # tuning override of the ring depth
    mma_sync_max_rows: int = MMA_SYNC_MAX_ROWS  # tuning override of the instruction choice
    split_columns_min_rows: int = SPLIT_COLUMNS_MIN_ROWS  # tuning override: from how many rows slabs are 128 rows
    partial_floats = 128 * TILE_N  # a 128-row slab's partial sums
    dependent_launch: bool = True  # programmatic dependent launch (tuning override: False launches plainly)
    tma_weights: bool = True  # tuning override: False copies a tile's weights in eight bulk copies
    # Tuning override: False copies the activations with the producer's 128 threads. With 4 m-blocks
    # (49-64 rows) they always do: with the tensor map ptxas spilled 32 bytes in those consumers.
    tma_activations: bool = True
    # From 9 to 16 rows the mma.sync path multiplies both halves of a slab's tokens (twice the
    # tensor instructions and scale folds of 8 rows), and after another kernel, as in a model, no
    # dependent launch hides rung 8's fixed cost. Over 17 layer shapes of 8-235 MB at 9 and 16 rows
    # (docs/rungs.md, round 11; scripts/after_other_kernels.py --fit): rung 6 6.1-6.2 us + 0.306
    # us/MB, rung 8 8.8-9.1 us + 0.240 us/MB, level at 41-43 MB; measured, rung 6 was ahead or level
    # up to 35 MB and rung 8 from 42 MB. Rung 6 reads these arrays unchanged.
    hands_rows_to = Handover("s6_marlin", 9, 16, below_bytes=36 << 20)

    def available(self) -> Support:
        base = gpu_support()
        if not base:
            return base
        import cupy

        if not has_wgmma(cupy.cuda.Device().id):
            return Support(False, "needs a Hopper GPU (compute capability 9.0: bulk copies, mbarriers, wgmma)")
        return SUPPORTED

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        if K % TILE_K or N % TILE_N:
            return Support(False, f"{self.name} needs K divisible by {TILE_K} and N by {TILE_N}, got K={K}, N={N}")
        return SUPPORTED

    def config(
        self, M: int, K: int, N: int, group_size: int, device: int, zero_points: bool = False, bf16: bool = False
    ) -> HopperConfig:
        """The variant for an M-row launch: slabs of up to 64 rows, or of 128 from 65 rows, the
        deepest even ring that fits (or the variant a first-run check is probing)."""
        probed = _PROBED_VARIANT.get()
        if probed is not None:
            return probed
        m_blocks = 8 if M >= self.split_columns_min_rows else m_blocks_for(M)
        stage = HopperConfig.stage_bytes(m_blocks, group_size, zero_points)
        limit = max_dynamic_smem(device)
        stages = max(4, self.max_stages or MAX_STAGES)  # the kernel's ring needs four slots
        while stages > 4 and HopperConfig.fixed_bytes(stages) + stages * stage > limit:
            stages -= 1
        stages -= stages % 2  # each slot serves one of the two consumer warpgroups (csrc/s8_hopper.cu)
        wgmma = M > self.mma_sync_max_rows
        cfg = HopperConfig(m_blocks, stages, group_size, zero_points, bf16, wgmma, self.tma_weights,
                           self.tma_activations and m_blocks != 4)
        if cfg.smem_bytes > limit:
            raise ValueError(f"{self.name}: a 4-slot ring needs {cfg.smem_bytes} bytes of shared memory, this GPU has {limit}")
        return cfg

    def start(self, kernel: Any, blocks: int, args: tuple, cfg: HopperConfig) -> None:
        """Launch as a programmatic dependent launch: the kernel requests its first weight tiles
        while the kernel before it in the stream finishes, and waits for that one before it reads
        the activations or writes the output (csrc/s8_hopper.cu, produce). The kernel's last two
        arguments are the tensor maps of the activations (boxes of a slab's rows x 64 k, 128-byte
        swizzle) and of the weights (a tile's 8 k16 rows x 2 KB), steps/_tensor_map.py. A variant
        that copies without one gets empty bytes there, which it never reads, and saves the
        driver call an encoding costs for a buffer not seen before."""
        A, qweight, M, K, N = args[0], args[1], int(args[5]), int(args[6]), int(args[7])
        a_map, w_map = tensor_map.TensorMap(), tensor_map.TensorMap()
        if cfg.tma_activations:
            a_map = tensor_map.tiled(tensor_map.UINT16, A.data.ptr, M, K, 2 * K, (16 * cfg.m_blocks, 64), tensor_map.SWIZZLE_128B)
        if cfg.tma_weights:
            w_map = tensor_map.tiled(tensor_map.UINT64, qweight.data.ptr, K // 16, N, 8 * N, (8, TILE_N), tensor_map.SWIZZLE_NONE)
        launch_dependent(kernel, blocks, self.threads, (*args, a_map, w_map), cfg.smem_bytes, self.dependent_launch)

    def kernel(self, cfg: HopperConfig, device: int) -> Any:
        """The compiled variant `cfg`, checked against the reference the first time it runs on
        this kind of GPU, as s5-s7's are."""
        self.first_run_check(cfg, device, functools.partial(self._probe_variant, cfg))
        return _load(self.name, cfg, device)


@functools.cache
def _load(source: str, cfg: HopperConfig, device: int) -> Any:
    kernel = get_kernel(source, source, cfg.defines(), device=device, arch_specific=True)
    kernel.max_dynamic_shared_size_bytes = cfg.smem_bytes
    return kernel
