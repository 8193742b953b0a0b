"""CPU model of Sparse-MARLIN (rung s7): 2:4-pruned 4-bit weights on sparse tensor cores.

Rung 7 multiplies by a weight that keeps only 2 of every 4 consecutive values along K.
`prune_quantized_2_4` defines that weight: in every group of 4 rows of a column, the 2
dequantized values of largest magnitude stay, ties going to the lower row, and the other
2 become the zero code. That pruned QuantizedWeight is the specification of s7: the
kernel must equal reference_gemm(A, prune_quantized_2_4(qw)).

Sparse tensor cores (`mma.sp.m16n8k32`) only accept the sparse operand as A, the 16-row
left factor, so s7 computes the transposed product C^T = W^T A^T: a 16 x 32 block of W^T
(16 output columns n, 32 rows of K) holds 16 kept codes per n, and its partner is a
32 x 8 block of A^T, that is 8 rows of A -- exactly what `ldmatrix` already gives from
the row-major A tile of the dense rungs. The layout below puts each lane's operands
where that instruction wants them:

* `pack_sparse_weights`: for every 32 rows of K ("a k32 step") and every 64 columns,
  one 128-bit word per lane holds its kept codes of the four 16-column mma tiles, with
  the nibbles placed so that s4's lop3 dequantization of one 32-bit word yields the
  four registers of that tile's A fragment, and s4's scale permutation still applies.
* `pack_sparse_metadata`: the 2-bit positions of the kept values, as mma.sp reads them:
  for one mma, lanes 4g and 4g+1 (selector 0) or 4g+2 and 4g+3 (selector 1) supply a
  32-bit register each; lane 4g + 2s + h covers the K half h (16 rows) with row g of
  the tile in bits 0-15 and row g + 8 in bits 16-31, 4 bits per group of 4 rows (the
  lower kept position in the low 2 bits). One register per lane therefore serves two
  tiles: tile 2p through selector 0 and tile 2p + 1 through selector 1.
* `emulate_kernel` runs the kernel's data flow lane by lane -- which thread copies which
  16 bytes, what each register holds, which fragments meet in which mma.sp, the k-warp
  reduction, the striped in-output reduction and the pairwise output stores -- so that
  the CUDA code is checked against the reference without a GPU.

Bytes streamed per weight: 2 bits of kept codes plus 1 bit of metadata, 3/4 of dense
MARLIN's 4 bits; the tensor-core work halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .marlin_layout import (
    LANES,
    TILES_PER_WARP,
    WARP_COLUMNS,
    lop3_dequantize_word,
    permute_scales,
    scale_rows_per_tile,
    striped_schedule,
)
from .quant import QuantizedWeight, dequantize, expand_groups, group_rows
from .sparse import keep_mask_2_4

K_STEP = 32  # rows of K per mma.sp.m16n8k32
KEPT_PER_STEP = K_STEP // 2  # kept codes per column and k32 step: the compressed A tile is 16 x 16


# -- pruning: the specification -------------------------------------------------------
def keep_mask_quantized_2_4(qw: QuantizedWeight) -> np.ndarray:
    """(K, N) bool: the 2 dequantized values of largest magnitude in each group of 4 along K
    (ties: lower row). Magnitudes are those of the fp16 weights the kernels multiply by."""
    if qw.K % 4:
        raise ValueError(f"2:4 pruning along K needs K divisible by 4, got K={qw.K}")
    return keep_mask_2_4(dequantize(qw))


def prune_quantized_2_4(qw: QuantizedWeight) -> QuantizedWeight:
    """The weight s7 multiplies by: qw with the 2 smallest of every 4 along K set to the zero code."""
    zero_codes = expand_groups(qw.zeros_or_default(), qw)
    codes = np.where(keep_mask_quantized_2_4(qw), qw.codes, zero_codes).astype(np.uint8)
    return QuantizedWeight(codes=codes, scales=qw.scales, group_size=qw.group_size, zeros=qw.zeros)


def compress_quantized_2_4(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Prune, then keep only the kept codes: codes (K/2, N) and their positions 0..3 (K/2, N).

    Row 2q + i of either array is the i-th kept value (i = 0, 1; positions increasing) of
    rows 4q..4q+3 of the original.
    """
    mask = keep_mask_quantized_2_4(qw).reshape(qw.K // 4, 4, qw.N)  # exactly 2 per group
    first, last = np.argmax(mask, axis=1), 3 - np.argmax(mask[:, ::-1, :], axis=1)
    positions = np.stack([first, last], axis=1)
    codes = np.take_along_axis(qw.codes.reshape(qw.K // 4, 4, qw.N), positions, axis=1)
    return codes.reshape(qw.K // 2, qw.N), positions.astype(np.uint8).reshape(qw.K // 2, qw.N)


def decompress_quantized_2_4(codes: np.ndarray, positions: np.ndarray, zero_code: int = 8) -> np.ndarray:
    """Inverse of compress_quantized_2_4 for symmetric weights: full (K, N) codes, zero code elsewhere."""
    K2, N = codes.shape
    full = np.full((K2 // 2, 4, N), zero_code, dtype=np.uint8)
    np.put_along_axis(full, positions.reshape(K2 // 2, 2, N).astype(np.intp), codes.reshape(K2 // 2, 2, N), axis=1)
    return full.reshape(2 * K2, N)


# -- the kept codes in fragment order -------------------------------------------------
# mma.sp's A fragment (16 x 16 kept values of one tile) gives lane 4g + c the values
# (row, kept column) = (g, 2c..2c+1) in register 0, (g+8, 2c..2c+1) in 1, (g, 2c+8..2c+9)
# in 2 and (g+8, 2c+8..2c+9) in 3. s4's dequantizer turns nibbles (0,4) and (1,5) of a
# word into its first two fp16 pairs, scaled by the low scale, and nibbles (2,6), (3,7)
# into the next two, scaled by the high scale. So nibble e of word j holds
# (kept column 2c + KEPT_OFFSET[e], tile column 16j + g + ROW_OFFSET[e]), and the A
# fragment is {pair 0, pair 2, pair 1, pair 3}; the two scales of the pair are those of
# tile rows g and g + 8 -- columns 16j + g + 8h of W, which is s4's scale permutation.
KEPT_OFFSET = np.array([0, 8, 0, 8, 1, 9, 1, 9])
ROW_OFFSET = np.array([0, 0, 8, 8, 0, 0, 8, 8])


def _value_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """(kept row within a k32 step, column within 64) of the code at (lane, word j, nibble e)."""
    lane = np.arange(LANES)[:, None, None]
    j = np.arange(TILES_PER_WARP)[None, :, None]
    e = np.arange(8)[None, None, :]
    g, c = lane // 4, lane % 4
    rows = 2 * c + KEPT_OFFSET[e]
    cols = 16 * j + g + ROW_OFFSET[e]
    shape = (LANES, TILES_PER_WARP, 8)
    return np.broadcast_to(rows, shape), np.broadcast_to(cols, shape)


VALUE_ROW_OF, VALUE_COL_OF = _value_coordinates()


def check_sparse_shape(K: int, N: int) -> None:
    if K % K_STEP or N % WARP_COLUMNS:
        raise ValueError(f"the Sparse-MARLIN layout needs K divisible by {K_STEP} and N by {WARP_COLUMNS}, got K={K}, N={N}")


def pack_sparse_weights(codes: np.ndarray) -> np.ndarray:
    """Kept codes (K/2, N) -> int32 (K/32, 2N): row r is k32 step r; 64-column chunk b is
    words 128b..128b+127, lane l's 128-bit load words 128b + 4l .. +3."""
    K2, N = codes.shape
    check_sparse_shape(2 * K2, N)
    blocks = codes.reshape(K2 // KEPT_PER_STEP, KEPT_PER_STEP, N // WARP_COLUMNS, WARP_COLUMNS)
    gathered = blocks[:, VALUE_ROW_OF, :, VALUE_COL_OF].astype(np.uint32)  # (32, 4, 8, steps, chunks)
    gathered = np.moveaxis(gathered, (3, 4), (0, 1))
    words = np.bitwise_or.reduce(gathered << (4 * np.arange(8, dtype=np.uint32)), axis=-1)
    return np.ascontiguousarray(words.reshape(K2 // KEPT_PER_STEP, 2 * N)).view(np.int32)


def unpack_sparse_weights(words: np.ndarray) -> np.ndarray:
    """Exact inverse of pack_sparse_weights: int32 (K/32, 2N) -> kept codes (K/2, N)."""
    R, N = words.shape[0], words.shape[1] // 2
    w = np.asarray(words).view(np.uint32).reshape(R, N // WARP_COLUMNS, LANES, TILES_PER_WARP, 1)
    nibbles = ((w >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.uint8)
    blocks = np.empty((R, KEPT_PER_STEP, N // WARP_COLUMNS, WARP_COLUMNS), dtype=np.uint8)
    blocks[:, VALUE_ROW_OF, :, VALUE_COL_OF] = np.moveaxis(nibbles, (0, 1), (3, 4))
    return blocks.reshape(R * KEPT_PER_STEP, N)


# -- metadata in the registers mma.sp reads ---------------------------------------------
# Word p of lane 4g + c (two 32-bit words per lane, per k32 step and 64 columns) serves
# tiles 2p (lanes c = 0, 1: selector 0) and 2p + 1 (lanes c = 2, 3: selector 1). Lane
# 4g + 2s + h covers K half h: groups 4h..4h+3 of the step. Bits 16r + 4q .. 16r + 4q + 3
# hold group 4h + q of tile row g + 8r: first kept position | second << 2.


def _metadata_coordinates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (lane, word p, tile row half r, group q): tile j, tile row, group of the step."""
    lane = np.arange(LANES)[:, None, None, None]
    p = np.arange(2)[None, :, None, None]
    r = np.arange(2)[None, None, :, None]
    q = np.arange(4)[None, None, None, :]
    g, c = lane // 4, lane % 4
    shape = (LANES, 2, 2, 4)
    tile = np.broadcast_to(2 * p + c // 2, shape)
    row = np.broadcast_to(g + 8 * r, shape)
    group = np.broadcast_to(4 * (c % 2) + q, shape)
    return tile, row, group


META_TILE_OF, META_ROW_OF, META_GROUP_OF = _metadata_coordinates()
META_SHIFT = (16 * np.arange(2)[:, None] + 4 * np.arange(4)[None, :]).astype(np.uint32)  # [r, q]


def pack_sparse_metadata(positions: np.ndarray) -> np.ndarray:
    """Kept positions (K/2, N) in 0..3 -> int32 (K/32, N): row r is k32 step r; 64-column
    chunk b is words 64b..64b+63, lane l's two words 64b + 2l, 64b + 2l + 1."""
    K2, N = positions.shape
    check_sparse_shape(2 * K2, N)
    pos = positions.reshape(K2 // KEPT_PER_STEP, 8, 2, N // WARP_COLUMNS, WARP_COLUMNS).astype(np.uint32)
    nibble = pos[:, :, 0] | (pos[:, :, 1] << 2)  # (steps, group, chunks, 64)
    cols = 16 * META_TILE_OF + META_ROW_OF
    gathered = nibble[:, META_GROUP_OF, :, cols]  # (32, 2, 2, 4, steps, chunks)
    gathered = np.moveaxis(gathered, (4, 5), (0, 1))
    words = np.bitwise_or.reduce((gathered << META_SHIFT).reshape(*gathered.shape[:4], 8), axis=-1)
    return np.ascontiguousarray(words.reshape(K2 // KEPT_PER_STEP, N)).view(np.int32)


def unpack_sparse_metadata(words: np.ndarray) -> np.ndarray:
    """Exact inverse of pack_sparse_metadata: int32 (K/32, N) -> positions (K/2, N)."""
    R, N = words.shape
    w = np.asarray(words).view(np.uint32).reshape(R, N // WARP_COLUMNS, LANES, 2, 1, 1)
    nibble = (w >> META_SHIFT) & 0xF  # (R, chunks, 32, 2, 2, 4)
    out = np.empty((R, 8, N // WARP_COLUMNS, WARP_COLUMNS), dtype=np.uint32)
    out[:, META_GROUP_OF, :, 16 * META_TILE_OF + META_ROW_OF] = np.moveaxis(nibble, (0, 1), (4, 5))
    positions = np.stack([out & 3, out >> 2], axis=2)  # (R, group, 2, chunks, 64)
    return positions.astype(np.uint8).reshape(R * KEPT_PER_STEP, N)


def pack_sparse_marlin(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """Everything s7 streams: kept codes, metadata, and the (s4-permuted) scales."""
    if qw.zeros is not None:
        raise ValueError("Sparse-MARLIN supports symmetric quantization only (zeros=None)")
    check_sparse_shape(qw.K, qw.N)
    codes, positions = compress_quantized_2_4(qw)
    return {
        "qweight": pack_sparse_weights(codes),
        "meta": pack_sparse_metadata(positions),
        "scales": permute_scales(qw.scales),
    }


def dequantize_sparse_marlin(arrays: dict[str, np.ndarray], K: int, N: int, group_size: int) -> np.ndarray:
    """The fp16 weights (K, N) exactly as the kernel forms them from its packed arrays.

    Each lane's words go through the lop3 dequantization and the __hmul2 by its scale
    pair, then every value is put back at its (row, column) through the metadata. Equal,
    bit for bit, to dequantize(prune_quantized_2_4(qw)).
    """
    steps = K // K_STEP
    chunks = N // WARP_COLUMNS
    words = arrays["qweight"].view(np.uint32).reshape(steps, chunks, LANES, TILES_PER_WARP)
    values = lop3_dequantize_word(words)  # (steps, chunks, 32, 4, 8), fragment order
    s = np.asarray(arrays["scales"]).reshape(-1, chunks, 8, TILES_PER_WARP, 2)  # [group, chunk, g, j, h]
    groups = (np.arange(steps) * K_STEP) // group_rows(group_size, K)
    pairs = s[groups][:, :, np.arange(LANES) // 4]  # (steps, chunks, 32, 4, 2)
    scaled = (values.astype(np.float32) * np.repeat(pairs, 4, axis=-1).astype(np.float32)).astype(np.float16)
    # Fragment order (pairs from nibbles (0,4), (1,5), (2,6), (3,7)) -> nibble order.
    scaled = scaled[..., [0, 2, 4, 6, 1, 3, 5, 7]]
    kept = np.empty((steps, KEPT_PER_STEP, chunks, WARP_COLUMNS), dtype=np.float16)
    kept[:, VALUE_ROW_OF, :, VALUE_COL_OF] = np.moveaxis(scaled, (0, 1), (3, 4))
    positions = unpack_sparse_metadata(arrays["meta"]).reshape(K // 4, 2, N).astype(np.intp)
    dense = np.zeros((K // 4, 4, N), dtype=np.float16)
    np.put_along_axis(dense, positions, kept.reshape(K // 4, 2, N), axis=1)
    return dense.reshape(K, N)


# -- the instructions, as the PTX ISA defines them ------------------------------------
def _u32_halves(words: np.ndarray) -> np.ndarray:
    """uint32 (...) -> float64 (..., 2): the (low, high) fp16 halves."""
    return np.asarray(words, dtype=np.uint32)[..., None].view(np.float16).reshape(*np.shape(words), 2).astype(np.float64)


def ldmatrix_x4(smem_words: np.ndarray, row_chunks: np.ndarray) -> np.ndarray:
    """ldmatrix.x4.b16: lane 8i + r gives the 16-byte row r of matrix i (its chunk index into
    smem_words viewed as (chunks, 4) uint32); lane 4g + c receives word c of row g of each
    matrix. Returns (32, 4) uint32."""
    rows = smem_words.reshape(-1, 4)[row_chunks]  # (32 lanes giving addresses, 4 words)
    lane = np.arange(LANES)
    return np.stack([rows[8 * i + lane // 4, lane % 4] for i in range(4)], axis=1)


def mma_sp_m16n8k32(a: np.ndarray, b: np.ndarray, meta: np.ndarray, selector: int, acc: np.ndarray) -> np.ndarray:
    """mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32, exactly (float64 products).

    a (32, 4) uint32: lane 4g+c holds kept values (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..),
    (g+8, 2c+8..) of the 16 x 16 compressed A. b (32, 4): lane 4g+c register i holds rows
    8i + 2c, 8i + 2c + 1 of column g of B (32 x 8). meta (32,) uint32: lane 4g + 2*selector
    + h supplies K half h, row g in bits 0-15 and row g+8 in bits 16-31, 4 bits per group.
    acc (32, 4): lane 4g+c holds D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1].
    """
    lane = np.arange(LANES)
    g, c = lane // 4, lane % 4
    av = _u32_halves(a)  # (32, 4, 2)
    kept = np.zeros((16, 16))
    for reg, (row_off, col_off) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        for h in range(2):
            kept[g + row_off, 2 * c + col_off + h] = av[:, reg, h]
    dense_a = np.zeros((16, K_STEP))
    meta = np.asarray(meta, dtype=np.uint32)
    for row in range(16):
        for group in range(8):
            word = meta[4 * (row % 8) + 2 * selector + group // 4]
            nibble = (int(word) >> (16 * (row // 8) + 4 * (group % 4))) & 0xF
            first, second = nibble & 3, nibble >> 2
            if first >= second:
                raise ValueError(f"metadata of row {row}, group {group} is not increasing: {first}, {second}")
            dense_a[row, 4 * group + first] = kept[row, 2 * group]
            dense_a[row, 4 * group + second] = kept[row, 2 * group + 1]
    bv = _u32_halves(b)
    dense_b = np.zeros((K_STEP, 8))
    for reg in range(4):
        for h in range(2):
            dense_b[8 * reg + 2 * c + h, g] = bv[:, reg, h]
    d = dense_a @ dense_b
    return acc + np.stack([d[g, 2 * c], d[g, 2 * c + 1], d[g + 8, 2 * c], d[g + 8, 2 * c + 1]], axis=1)


# -- the kernel, lane by lane ------------------------------------------------------------
THREADS = 256


@dataclass(frozen=True)
class SparseTile:
    """The compile-time configuration of the s7 kernel (its defines)."""

    m_blocks: int  # 16-row blocks of A per slab
    tile_n: int  # columns of a column slice
    tile_k: int  # rows of K per pipeline stage
    group_size: int  # rows of K per scale, as QuantizedWeight: -1 is one group of all K rows

    @property
    def scale_rows(self) -> int:
        return scale_rows_per_tile(self.group_size, self.tile_k)

    @property
    def n_strips(self) -> int:
        return self.tile_n // WARP_COLUMNS

    @property
    def k_warps(self) -> int:
        return THREADS // 32 // self.n_strips

    @property
    def steps(self) -> int:  # k32 steps per stage
        return self.tile_k // K_STEP

    @property
    def substeps(self) -> int:
        return self.steps // self.k_warps


def _a_swizzle(row: np.ndarray, chunk: np.ndarray, row_chunks: int) -> np.ndarray:
    return row * row_chunks + (chunk ^ (row & 7))


def _stage(cfg: SparseTile, A: np.ndarray, arrays: dict[str, np.ndarray], K: int, N: int, slab_rows: np.ndarray,
           col: int, k_tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pipeline stage in shared memory, each 16-byte chunk copied by the thread and from
    the global address the kernel's fetch() uses. Returns (A, weights, metadata, scales) as
    (chunks, 4) uint32."""
    t = np.arange(THREADS)
    a_row_chunks = cfg.tile_k // 8
    a_glob = np.ascontiguousarray(A).view(np.uint32).reshape(A.shape[0], K // 8, 4)
    a_chunks = 16 * cfg.m_blocks * a_row_chunks
    a = np.full((a_chunks, 4), 0xFFFFFFFF, dtype=np.uint32)  # poison: every chunk must be written
    for i in range(-(-a_chunks // THREADS)):
        chunk = t + THREADS * i
        live = chunk < a_chunks
        row, within = chunk[live] // a_row_chunks, chunk[live] % a_row_chunks
        valid = row < len(slab_rows)
        src = np.zeros((live.sum(), 4), np.uint32)  # zero-fill past the batch
        src[valid] = a_glob[slab_rows[row[valid]], k_tile * a_row_chunks + within[valid]]
        a[_a_swizzle(row, within, a_row_chunks)] = src
    # Weights: chunk t + 256 i of the stage is k32 step (t + 256 i) / (tile_n / 2) of the
    # tile, chunk (t mod tile_n / 2) of the slice's row.
    w_glob = arrays["qweight"].view(np.uint32).reshape(K // K_STEP, N // 2, 4)
    half_n = cfg.tile_n // 2
    b_chunks = cfg.steps * half_n
    b = np.full((b_chunks, 4), 0xFFFFFFFF, dtype=np.uint32)
    for i in range(b_chunks // THREADS):
        chunk = t + THREADS * i
        b[chunk] = w_glob[k_tile * cfg.steps + chunk // half_n, col * half_n + chunk % half_n]
    # Metadata: tile_n / 4 chunks per k32 step (16 per 64-column strip).
    m_glob = arrays["meta"].view(np.uint32).reshape(K // K_STEP, N // 4, 4)
    quarter_n = cfg.tile_n // 4
    m_chunks = cfg.steps * quarter_n
    m = np.full((m_chunks, 4), 0xFFFFFFFF, dtype=np.uint32)
    for i in range(-(-m_chunks // THREADS)):
        chunk = t + THREADS * i
        chunk = chunk[chunk < m_chunks]
        m[chunk] = m_glob[k_tile * cfg.steps + chunk // quarter_n, col * quarter_n + chunk % quarter_n]
    eighth_n = cfg.tile_n // 8
    s_glob = arrays["scales"].view(np.uint32).reshape(-1, N // 8, 4)
    s_rows = cfg.scale_rows
    group_row0 = 0 if cfg.group_size == -1 else (k_tile * cfg.tile_k) // cfg.group_size
    s_chunks = t[t < s_rows * eighth_n]
    s = s_glob[group_row0 + s_chunks // eighth_n, col * eighth_n + s_chunks % eighth_n]
    return a, b, m, s


def _substep(cfg: SparseTile, stage, warp: int, sub: int, acc: np.ndarray) -> None:
    """What warp `warp` does for substep `sub` of a stage: load_fragments + multiply."""
    a_sm, b_sm, m_sm, s_sm = stage
    lane = np.arange(LANES)
    k_warp, strip = divmod(warp, cfg.n_strips)
    step = k_warp + cfg.k_warps * sub
    a_row_chunks = cfg.tile_k // 8
    # Two ldmatrix.x4 per m-block, one per 8 batch rows h: lanes 8i..8i+7 point at those
    # rows in the step's chunk i, so register i is K rows 8i..8i+7 of the B operand.
    frags = [[ldmatrix_x4(a_sm, _a_swizzle(16 * mb + 8 * h + lane % 8, 4 * step + lane // 8, a_row_chunks))
              for h in range(2)] for mb in range(cfg.m_blocks)]
    w = b_sm[THREADS * sub + 32 * warp + lane]  # (32, 4): the chunk this thread copied
    meta = m_sm.reshape(-1, 2)[step * (cfg.tile_n // 2) + 32 * strip + lane]  # (32, 2): one uint2 load
    s_row = 0 if cfg.scale_rows == 1 else (K_STEP * step) // cfg.group_size
    s = s_sm[s_row * (cfg.tile_n // 8) + 8 * strip + lane // 4]  # (32, 4)
    for j in range(TILES_PER_WARP):
        values = lop3_dequantize_word(w[:, j])  # (32, 8): pairs (0,1)->nib (0,4), (2,3)->(1,5), ...
        scale_pair = _u32_halves(s[:, j]).astype(np.float16)  # (32, 2): rows g, g+8 of tile j
        scaled = (values.astype(np.float32) * np.repeat(scale_pair, 4, axis=1).astype(np.float32)).astype(np.float16)
        pairs = np.ascontiguousarray(scaled).view(np.uint32)  # (32, 4): left.r0, left.r1, right.r0, right.r1
        a_frag = pairs[:, [0, 2, 1, 3]]
        for mb in range(cfg.m_blocks):
            for h in range(2):  # batch rows 8h..8h+7 of the m-block
                acc[warp, mb, j, h] = mma_sp_m16n8k32(a_frag, frags[mb][h], meta[:, j // 2], j % 2, acc[warp, mb, j, h])


def _fold(cfg: SparseTile, acc: np.ndarray, C: np.ndarray, slab_rows: np.ndarray, col: int) -> None:
    """fold_into_output: lanes 4g+c and 4(g^1)+c swap one value (shfl.xor 4) so each stores
    an fp16 pair of neighbouring columns."""
    lane = np.arange(LANES)
    g, c = lane // 4, lane % 4
    partner = lane ^ 4
    even = g % 2 == 0
    for strip in range(cfg.n_strips):
        for mb in range(cfg.m_blocks):
            for j in range(TILES_PER_WARP):
                for h in range(2):
                    v = acc[strip, mb, j, h].astype(np.float32)  # the k_warp 0 warp of this strip
                    give = np.where(even[:, None], v[:, [1, 3]], v[:, [0, 2]])
                    got = give[partner]
                    row = 16 * mb + 8 * h + 2 * c + (~even)
                    col0 = col * cfg.tile_n + 64 * strip + 16 * j + g - (~even)
                    for r in range(2):  # tile rows g (r = 0) and g + 8 (r = 1)
                        lo = np.where(even, v[:, 2 * r], got[:, r])
                        hi = np.where(even, got[:, r], v[:, 2 * r + 1])
                        for ln in range(LANES):
                            if row[ln] >= len(slab_rows):
                                continue
                            out = C[slab_rows[row[ln]], col0[ln] + 8 * r: col0[ln] + 8 * r + 2]
                            out[:] = np.array([lo[ln], hi[ln]], np.float32).astype(np.float16)


def emulate_kernel(cfg: SparseTile, A: np.ndarray, arrays: dict[str, np.ndarray], K: int, N: int, sms: int) -> np.ndarray:
    """C = A @ W as the s7 kernel computes it, with `sms` blocks striped as in s6.

    Products are exact (float64 per mma, as the hardware's fp32 is for small integers);
    the fp32 sums of the k-warps and of the blocks sharing a slice (in ascending block
    order, as the slice's last block adds them) and the one fp16 rounding are modelled.
    """
    M = A.shape[0]
    slab = 16 * cfg.m_blocks
    C = np.full((M, N), np.nan, dtype=np.float16)
    k_tiles, n_tiles = K // cfg.tile_k, N // cfg.tile_n
    _, schedule = striped_schedule(-(-M // slab), k_tiles, n_tiles, sms)
    segments = sorted((s for block in schedule for s in block), key=lambda s: (s.slab, s.col, s.block))
    slice_sums: dict[tuple[int, int], np.ndarray] = {}
    for seg in segments:
        rows = np.arange(seg.slab * slab, min(M, (seg.slab + 1) * slab))
        acc = np.zeros((THREADS // 32, cfg.m_blocks, TILES_PER_WARP, 2, LANES, 4))
        for k_tile in range(seg.row0, seg.row0 + seg.rows):
            stage = _stage(cfg, A, arrays, K, N, rows, seg.col, k_tile)
            for warp in range(THREADS // 32):
                for sub in range(cfg.substeps):
                    _substep(cfg, stage, warp, sub, acc)
        # reduce_across_k_warps: warps k_warp = 1, 2, ... of each strip into k_warp 0, in order.
        acc = acc.astype(np.float32)
        partial = acc[: cfg.n_strips].copy()
        for kw in range(1, cfg.k_warps):
            partial += acc[kw * cfg.n_strips: (kw + 1) * cfg.n_strips]
        key = (seg.slab, seg.col)
        slice_sums[key] = partial if key not in slice_sums else slice_sums[key] + partial
        if seg.block == seg.blocks[-1]:
            _fold(cfg, slice_sums.pop(key), C, rows, seg.col)
    return C
