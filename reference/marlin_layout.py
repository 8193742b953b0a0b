"""CPU models of the layout tricks the MARLIN rungs (s4, s5, s6) rely on.

A tensor-core kernel that streams 4-bit weights at full memory bandwidth cannot afford
to shuffle them once they arrive: every byte should go from global memory into the
registers of the thread that multiplies it, in the order the `mma.m16n8k16` instruction
wants, with one 128-bit load. So the shuffling is done once, offline, here:

* `pack_marlin_weights` puts the codes of each 16 x 64 block of W (16 rows of K, the
  64 columns one warp owns) into 32 x 16 bytes, one 128-bit word per lane. Word j of
  lane l holds the eight codes lane l needs as its B fragments for the 16 x 16 tile j,
  with the nibbles interleaved so the two-instruction `lop3` / 0x6400 dequantization
  (0x4300 for bf16; modelled bit for bit by `lop3_dequantize_word`) yields them in
  fragment order.
* `permute_scales` orders each 64-column chunk of the scales so one 128-bit load gives
  a lane the scales of exactly the eight columns its fragments cover.
* `striped_schedule` is the SM-striped partition of s6: which block computes which
  k-range of which column slice, which of its two partial-sum buffers it uses there,
  and which blocks' partials the slice's last block adds (in ascending block order).

Every function has an exact inverse or an exhaustive check in tests/test_marlin_layout.py,
and the kernels' `pack_host` calls these very functions.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .quant import BFLOAT16, FLOAT16, QuantizedWeight, element_dtype, group_rows

# -- the fragment geometry ---------------------------------------------------------
# mma.m16n8k16 (row.col, fp16): lane l = 4*g + c holds, of the 16 x 8 B operand,
# rows 2c, 2c+1 (register b0) and 2c+8, 2c+9 (register b1) of column g. A 16 x 16 tile
# of W is two such operands side by side (columns 0..7 and 8..15), so each lane needs
# 8 codes per tile: `FRAGMENT_ROWS[e]`, `FRAGMENT_HALF[e]` for e = 0..7 in the order the
# two dequantized B operands use them.
TILE = 16
WARP_COLUMNS = 64  # one warp's strip: four 16 x 16 tiles side by side
LANES = 32
TILES_PER_WARP = WARP_COLUMNS // TILE
FRAGMENT_ROWS = np.array([0, 1, 8, 9, 0, 1, 8, 9])  # + 2c
FRAGMENT_HALF = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # which 8-column half of the tile

# The dequantization masks one nibble of each 16-bit half at a time: bits 0-3 and 16-19
# first, then bits 4-7 and 20-23, then (after a shift by 8) 8-11 / 24-27 and 12-15 /
# 28-31. Each step produces one fp16 pair = one register of a B operand, so fragment
# value e must sit in nibble NIBBLE_OF_VALUE[e]: pairs (0,1) -> nibbles (0,4),
# (2,3) -> (1,5), (4,5) -> (2,6), (6,7) -> (3,7).
NIBBLE_OF_VALUE = np.array([0, 4, 1, 5, 2, 6, 3, 7])
VALUE_OF_NIBBLE = np.argsort(NIBBLE_OF_VALUE)  # 0, 2, 4, 6, 1, 3, 5, 7


def _fragment_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """(row, column) inside a 16 x 64 block of the code held by (lane, word j, nibble n)."""
    lane = np.arange(LANES)[:, None, None]
    j = np.arange(TILES_PER_WARP)[None, :, None]
    value = VALUE_OF_NIBBLE[None, None, :]
    g, c = lane // 4, lane % 4
    rows = 2 * c + FRAGMENT_ROWS[value]
    cols = TILE * j + 8 * FRAGMENT_HALF[value] + g
    return np.broadcast_to(rows, (LANES, TILES_PER_WARP, 8)), np.broadcast_to(cols, (LANES, TILES_PER_WARP, 8))


FRAGMENT_ROW_OF, FRAGMENT_COL_OF = _fragment_coordinates()


def check_marlin_shape(K: int, N: int) -> None:
    if K % TILE or N % WARP_COLUMNS:
        raise ValueError(f"the MARLIN layout needs K divisible by {TILE} and N by {WARP_COLUMNS}, got K={K}, N={N}")


def pack_marlin_weights(qw: QuantizedWeight) -> np.ndarray:
    """Codes (K, N) -> int32 words (K/16, 2N) in fragment order.

    Row r of the result holds k-rows 16r..16r+15. Inside it, 64-column chunk b occupies
    words 128b .. 128b+127, lane l's 128-bit load is words 128b + 4l .. 128b + 4l + 3,
    and word 128b + 4l + j packs, nibble n at bits 4n..4n+3, the code at (row, column)
    (FRAGMENT_ROW_OF[l, j, n], FRAGMENT_COL_OF[l, j, n]) of the 16 x 64 block.
    """
    K, N = qw.codes.shape
    check_marlin_shape(K, N)
    blocks = qw.codes.reshape(K // TILE, TILE, N // WARP_COLUMNS, WARP_COLUMNS)
    # gathered[kr, chunk, lane, j, n]
    gathered = blocks[:, FRAGMENT_ROW_OF, :, FRAGMENT_COL_OF].astype(np.uint32)  # (32,4,8, K/16, N/64)
    gathered = np.moveaxis(gathered, (3, 4), (0, 1))
    shifts = 4 * np.arange(8, dtype=np.uint32)
    words = np.bitwise_or.reduce(gathered << shifts, axis=-1)
    return np.ascontiguousarray(words.reshape(K // TILE, 2 * N)).view(np.int32)


def unpack_marlin_weights(words: np.ndarray) -> np.ndarray:
    """Exact inverse of pack_marlin_weights: int32 (K/16, 2N) -> uint8 codes (K, N)."""
    words = np.asarray(words)
    if words.ndim != 2 or words.shape[1] % (2 * WARP_COLUMNS):
        raise ValueError(f"expected int32 words of shape (K/16, 2N) with N divisible by 64, got {words.shape}")
    R, N = words.shape[0], words.shape[1] // 2
    w = words.view(np.uint32).reshape(R, N // WARP_COLUMNS, LANES, TILES_PER_WARP, 1)
    nibbles = ((w >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.uint8)  # (R, chunks, 32, 4, 8)
    blocks = np.empty((R, TILE, N // WARP_COLUMNS, WARP_COLUMNS), dtype=np.uint8)
    blocks[:, FRAGMENT_ROW_OF, :, FRAGMENT_COL_OF] = np.moveaxis(nibbles, (0, 1), (3, 4))
    return blocks.reshape(R * TILE, N)


# -- scales --------------------------------------------------------------------------
# Lane l = 4g + c multiplies columns 16j + 8h + g (tile j, half h) of its warp's strip.
# Ordering each 64-column chunk as position 8g + 2j + h <- column 8(2j + h) + g puts
# those eight scales side by side: one 128-bit load, and the fp16 pair (j, h=0..1) is
# exactly the two scales of tile j's two B operands. The map is an 8 x 8 transpose,
# hence its own inverse.


def permute_scales(scales: np.ndarray) -> np.ndarray:
    """fp16 (groups, N) in column order -> the same values in the kernels' lane order."""
    scales = np.asarray(scales)
    G, N = scales.shape
    if N % WARP_COLUMNS:
        raise ValueError(f"N must be divisible by {WARP_COLUMNS}, got {N}")
    return np.ascontiguousarray(scales.reshape(G, N // WARP_COLUMNS, 8, 8).transpose(0, 1, 3, 2).reshape(G, N))


def unpermute_scales(permuted: np.ndarray) -> np.ndarray:
    """Inverse of permute_scales (the 8 x 8 transpose undoes itself)."""
    return permute_scales(permuted)


def scale_rows_per_tile(group_size: int, tile_k: int) -> int:
    """Rows of scales (and zero points) a pipeline stage of tile_k rows of K holds: one unless
    the tile spans several groups (group size -1 is one group of all K rows)."""
    return 1 if group_size == -1 or group_size >= tile_k else tile_k // group_size


# -- the lop3 / 0x6400 (bf16: 0x4300) dequantization, bit for bit ---------------------
# fp16 0x6400 is 1024.0 and its 10 mantissa bits count units of 1 for values in
# [1024, 2048). OR-ing a nibble v into the low mantissa bits therefore gives exactly the
# fp16 1024 + v; OR-ing it in 4 bits higher gives 1024 + 16 v. A subtraction of 1032
# (0x6408) or a fused multiply-add x * 1/16 - 72 (0x2C00, 0xD480) then yields v - 8,
# the symmetric code, exactly. One `lop3` instruction does each (q AND mask) OR 0x6400
# for both fp16 halves of a register at once. With zero points the offset is the
# weight's own: subtracting 1024 (0x6400), or x * 1/16 - 64 (0xD400), yields v itself,
# and the kernels subtract the fp16 zero point z (v - z is a small integer: exact)
# before scaling, so fp16((v - z) * s) is again one rounding, as in the reference.
#
# bf16 has only 7 mantissa bits, so its magic number is 0x4300 = 128.0: in [128, 256) the
# mantissa counts units of 1, and OR-ing a nibble v into bits 0-3 gives exactly 128 + v.
# The fp16 shortcut for the second nibble does not fit: bits 4-7 of a bf16 half are its top
# three mantissa bits and the lowest exponent bit, so 16 v cannot be OR-ed in there. The
# kernel instead shifts the word right by 4 and applies the same mask, bringing nibbles
# 1 and 5 down to bits 0-3 / 16-19. A single __hsub2 of 136 (0x4308) then leaves v - 8,
# or of 128 (0x4300) leaves v for weights with zero points; the pairs come out in the
# fp16 order, so the fragment layout and everything after it are shared.
MAGIC_EXPONENT = 0x64006400
BF16_MAGIC_EXPONENT = 0x43004300
LOW_NIBBLES = 0x000F000F
HIGH_NIBBLES = 0x00F000F0
FP16_1032 = np.uint16(0x6408)
FP16_1024 = np.uint16(0x6400)
FP16_ONE_SIXTEENTH = np.uint16(0x2C00)
FP16_MINUS_72 = np.uint16(0xD480)
FP16_MINUS_64 = np.uint16(0xD400)
BF16_136 = np.uint16(0x4308)
BF16_128 = np.uint16(0x4300)


def _halves(word: np.ndarray, dtype: np.dtype = FLOAT16) -> np.ndarray:
    """uint32 words -> their (low, high) 16-bit halves read as `dtype`, shape (..., 2)."""
    return np.asarray(word, dtype=np.uint32)[..., None].view(np.uint16).view(dtype).reshape(*np.shape(word), 2)


def _fp16_register_pairs(q: np.ndarray, zero_points: bool) -> list[np.ndarray]:
    """The two fp16 pairs of nibbles (0, 4) and (1, 5) of q: lop3 + __hsub2, lop3 + __hfma2."""
    offset, fma_offset = (FP16_1024, FP16_MINUS_64) if zero_points else (FP16_1032, FP16_MINUS_72)
    lo = _halves((q & LOW_NIBBLES) | MAGIC_EXPONENT)
    hi = _halves((q & HIGH_NIBBLES) | MAGIC_EXPONENT)
    sub = lo - offset.view(np.float16)  # __hsub2: one fp16 rounding
    fma = (
        hi.astype(np.float64) * float(FP16_ONE_SIXTEENTH.view(np.float16)) + float(fma_offset.view(np.float16))
    ).astype(np.float16)  # __hfma2: one rounding of the exact result
    return [sub, fma]


def _bf16_register_pairs(q: np.ndarray, zero_points: bool) -> list[np.ndarray]:
    """The two bf16 pairs of nibbles (0, 4) and (1, 5) of q: lop3 + __hsub2, shift + lop3 + __hsub2."""
    offset = np.float32((BF16_128 if zero_points else BF16_136).view(BFLOAT16))
    lo = _halves((q & LOW_NIBBLES) | BF16_MAGIC_EXPONENT, BFLOAT16)
    hi = _halves(((q >> np.uint32(4)) & LOW_NIBBLES) | BF16_MAGIC_EXPONENT, BFLOAT16)
    # __hsub2: the float32 difference of these small integers is exact, so the cast to bf16
    # is the instruction's one rounding
    return [(pair.astype(np.float32) - offset).astype(BFLOAT16) for pair in (lo, hi)]


def lop3_dequantize_word(word: np.ndarray, zero_points: bool = False, dtype: npt.DTypeLike = np.float16) -> np.ndarray:
    """What the kernels' `dequantize_pairs` computes: uint32 word -> 8 values (q - 8), or q
    itself for weights with zero points, in fragment order, as float16 or bfloat16.

    Output (..., 8): values e = 0..3 form the first B operand (tile half 0), e = 4..7 the
    second (half 1). Emulates every instruction with its rounding in `dtype` (all exact here).
    """
    register_pairs = _bf16_register_pairs if element_dtype(dtype) == BFLOAT16 else _fp16_register_pairs
    word = np.asarray(word, dtype=np.uint32)
    out = []
    for q in (word, word >> np.uint32(8)):
        out += register_pairs(q, zero_points)
    return np.concatenate(out, axis=-1)


def scale_fragment(values: np.ndarray, scale_pair: np.ndarray) -> np.ndarray:
    """__hmul2 of each B operand by its scale: values (..., 8), scales (..., 2) for halves 0, 1.

    The result has the scales' element type. The values are small integers, so their float32
    product with a scale is exact and the cast is the instruction's one rounding.
    """
    scale_pair = np.asarray(scale_pair)
    dtype = element_dtype(scale_pair.dtype)
    s = np.repeat(scale_pair, 4, axis=-1)
    with np.errstate(over="ignore"):  # beyond float32's range is beyond bf16's too: inf either way
        return (values.astype(np.float32) * s.astype(np.float32)).astype(dtype)


def dequantize_marlin(
    words: np.ndarray, permuted_scales: np.ndarray, group_size: int, permuted_zeros: np.ndarray | None = None
) -> np.ndarray:
    """The weights (K, N) exactly as the kernels form them from the packed arrays.

    The element type (float16 or bfloat16) is the scales'; zero points are converted to
    it (small integers: exact). Goes through the same steps as a lane: its 128-bit word,
    lop3 dequantization, the scale pair (and zero-point pair) from its 128-bit loads,
    __hsub2 of the zero points, __hmul2 of the scales; then puts each value back at its
    (row, column). Equal to reference.dequantize bit for bit.
    """
    dtype = element_dtype(np.asarray(permuted_scales).dtype)
    R, N = words.shape[0], words.shape[1] // 2
    K = R * TILE
    g = group_rows(group_size, K)
    w = words.view(np.uint32).reshape(R, N // WARP_COLUMNS, LANES, TILES_PER_WARP)
    values = lop3_dequantize_word(w, permuted_zeros is not None, dtype)  # (R, chunks, 32, 4, 8) in fragment order
    lane_g = np.arange(LANES) // 4
    # The group of k16-row r: groups never straddle a 16-row tile (sizes are multiples of 16).
    group_of_row = (np.arange(R) * TILE) // g

    def lane_pairs(permuted: np.ndarray) -> np.ndarray:
        """Each lane's pair (tile j's halves 0, 1) of a permuted per-group array: (R, chunks, 32, 4, 2)."""
        p = np.asarray(permuted, dtype=dtype).reshape(-1, N // WARP_COLUMNS, 8, TILES_PER_WARP, 2)
        return p[group_of_row][:, :, lane_g]

    if permuted_zeros is not None:
        values = values - np.repeat(lane_pairs(permuted_zeros), 4, axis=-1)  # __hsub2 of small integers: exact
    scaled = scale_fragment(values, lane_pairs(permuted_scales))
    # Fragment order e -> nibble order n (nibble n holds value VALUE_OF_NIBBLE[n]), then
    # scatter to (row, column) exactly like unpack_marlin_weights.
    scaled = scaled[..., VALUE_OF_NIBBLE]
    blocks = np.empty((R, TILE, N // WARP_COLUMNS, WARP_COLUMNS), dtype=dtype)
    blocks[:, FRAGMENT_ROW_OF, :, FRAGMENT_COL_OF] = np.moveaxis(scaled, (0, 1), (3, 4))
    return blocks.reshape(K, N)


# -- the SM-striped schedule of s6 ---------------------------------------------------
# The (M-slab, column slice, k-tile) tiles are numbered column slice by column slice,
# k-tiles innermost: t = (slab * n_tiles + col) * k_tiles + row. Block b takes the
# contiguous run [b * iters, (b + 1) * iters): a "stripe" that walks down a column slice
# and may continue at the top of the next one. Every block streams the same number of
# weight tiles, whatever the shape. A column slice shared by several blocks is summed
# without waiting: each stores fp32 partials in one of its two workspace slots (0 for the
# first segment of its run, 1 for a later one) and the last to arrive adds them all, in
# ascending block order, into the output.
MAX_SLICE_BLOCKS = 8  # bounds the partials the last block of a slice reads and adds


@dataclass(frozen=True)
class Segment:
    """One block's share of one column slice."""

    block: int
    slab: int  # which 16*m_blocks-row slab of A / C
    col: int  # column slice (tile_n columns)
    row0: int  # first k-tile
    rows: int  # number of k-tiles
    slot: int  # which of the block's two partial-sum buffers holds this share
    first_block: int  # the slice's contributors: first_block .. first_block + contributors - 1
    contributors: int

    @property
    def blocks(self) -> range:
        """The blocks sharing this slice, in the order their partials are added."""
        return range(self.first_block, self.first_block + self.contributors)


def partial_slot(block: int, iters: int, slice_t0: int) -> int:
    """The slot block `block` used for the slice whose first tile is `slice_t0`: 0 when its
    run starts inside the slice (the slice is its run's first segment), else 1."""
    return 0 if block * iters >= slice_t0 else 1


@functools.lru_cache(maxsize=4096)
def stripe_length(total_tiles: int, k_tiles: int, sms: int, reduction_cost: float = 0.0) -> int:
    """Tiles per block: an even share over the SMs, lengthened until no column slice has more
    than MAX_SLICE_BLOCKS contributors (max_slice_contributors counts them exactly: a run
    length that divides k_tiles gives each slice k_tiles / iters, one that does not may give
    one more).

    With reduction_cost > 0, a longer run (up to twice that share) may win: each block is
    charged its tiles plus reduction_cost tiles for every column slice it shares with
    another block, and the length whose dearest block is cheapest is taken, the shortest of
    equals. E.g. 96 slices of 16 tiles on 132 SMs: 12 tiles a block, two of them shared, or
    16 tiles and none."""
    share = max(1, -(-total_tiles // sms))
    while max_slice_contributors(total_tiles, k_tiles, share) > MAX_SLICE_BLOCKS:
        share += 1
    if reduction_cost <= 0:
        return share
    candidates = range(share, 2 * share + 1)
    costs = [_dearest_block(total_tiles, k_tiles, iters, reduction_cost) for iters in candidates]
    return candidates[int(np.argmin(costs))]


def max_slice_contributors(total_tiles: int, k_tiles: int, iters: int) -> int:
    """The most blocks that share one column slice when each block takes `iters` tiles
    (the kernel's first_block .. last block of a slice, marlin::stripe_segment)."""
    first_tile = np.arange(0, total_tiles, k_tiles)
    last_tile = np.minimum(first_tile + k_tiles, total_tiles) - 1
    return int(np.max(last_tile // iters - first_tile // iters + 1))


def _dearest_block(total_tiles: int, k_tiles: int, iters: int, reduction_cost: float) -> float:
    """max over blocks of (tiles + reduction_cost * slices shared with other blocks)."""
    start = np.arange(0, total_tiles, iters)
    end = np.minimum(start + iters, total_tiles)
    head = start % k_tiles != 0  # the run starts below the top of a slice: shared
    tail = end % k_tiles != 0  # the run stops above the bottom of a slice: shared
    one_slice = start // k_tiles == (end - 1) // k_tiles
    shared = np.where(one_slice, head | tail, head.astype(int) + tail.astype(int))
    return float(np.max(end - start + reduction_cost * shared))


def striped_schedule(
    slabs: int, k_tiles: int, n_tiles: int, sms: int, reduction_cost: float = 0.0
) -> tuple[int, list[list[Segment]]]:
    """(iters, segments per block) of the s6 kernel; the number of blocks launched is len(...).

    Mirrors the kernel's arithmetic exactly (marlin::stripe_segment): block b walks t from
    b*iters to min((b+1)*iters, T); for the slice cs containing t, its contributors are the
    blocks cs*k_tiles // iters .. ((cs+1)*k_tiles - 1) // iters, and the block's slot is 0
    only when t is the start of its run.
    """
    total = slabs * n_tiles * k_tiles
    iters = stripe_length(total, k_tiles, sms, reduction_cost)
    blocks = -(-total // iters)
    schedule = []
    for b in range(blocks):
        segments, t, end = [], b * iters, min((b + 1) * iters, total)
        while t < end:
            cs, row0 = divmod(t, k_tiles)
            rows = min(k_tiles - row0, end - t)
            first, last = (cs * k_tiles) // iters, ((cs + 1) * k_tiles - 1) // iters
            slab, col = divmod(cs, n_tiles)
            slot = 0 if t == b * iters else 1
            segments.append(Segment(b, slab, col, row0, rows, slot, first, last - first + 1))
            t += rows
        schedule.append(segments)
    return iters, schedule
