"""CPU model of rung 8's activation tile in shared memory, and of the consumers' reads of it
(csrc/s8_hopper.cu).

The tile is SLAB_ROWS tokens x 128 k of 2-byte values, stored as two atom columns of 64 k
(128 bytes a row). Inside an atom the 16-byte chunk c of row r sits at chunk c ^ (r % 8): the
128-byte swizzle that wgmma's descriptor names, and that keeps ldmatrix free of bank
conflicts. The producer's 128 threads write it with cp.async, one 16-byte chunk at a time,
rows past the batch zero-filled (`cp_async_tile`, the kernel's hopper::swizzled_chunk).

On the mma.sync path (up to 16 rows) each consumer lane points ldmatrix at one row of one
8 x 8 matrix: k16 step `step` reads the tile's 8-k chunks 2 step and 2 step + 1, which the
kernel finds by XOR-ing the step's chunk into a per-lane offset (`ldmatrix_addresses`).
Replayed through rung 7's model of the instruction (`reference.sparse_marlin.ldmatrix_x4`),
tests/test_hopper_tiles.py checks that every lane receives exactly the B fragments of
mma.m16n8k16 for its tokens and k.

With tensor maps (TMA_ACTIVATIONS, TMA_WEIGHTS) thread 0 writes the same bytes with the copy
engine: the activation tile as two boxes of SLAB_ROWS rows x 64 values with the copy engine's
128-byte swizzle (`tensor_map_tile`, out-of-bounds rows zero), and a weight tile, 8 k16 rows of
the MARLIN layout 8 N bytes apart, as one box of 8 rows x 256 eight-byte elements
(`tensor_map_weights`) instead of eight 2 KB bulk copies (`bulk_copy_weights`).
"""

from __future__ import annotations

import numpy as np

ATOM_BYTES = 128  # one swizzled row of an atom column: 64 two-byte values
CHUNK = 16


def swizzled_offset(rows: int, row: int, chunk: int) -> int:
    """Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a tile of `rows` rows
    (the kernel's hopper::swizzled_chunk)."""
    return (chunk // 8) * rows * ATOM_BYTES + row * ATOM_BYTES + ((chunk % 8) ^ (row % 8)) * CHUNK


def cp_async_tile(A: np.ndarray, slab: int, k_tile: int, slab_rows: int) -> np.ndarray:
    """Tile (slab, k_tile) of A (M x K, uint16: the bits of fp16 or bf16) as bytes in shared
    memory, as the producer's threads copy it."""
    tile = np.zeros(slab_rows * 2 * ATOM_BYTES, np.uint8)
    src = A.view(np.uint8)
    for row in range(slab_rows):
        token = slab * slab_rows + row
        if token >= A.shape[0]:
            continue  # zero-filled
        for chunk in range(2 * ATOM_BYTES // CHUNK):
            dst, start = swizzled_offset(slab_rows, row, chunk), k_tile * 2 * ATOM_BYTES + chunk * CHUNK
            tile[dst : dst + CHUNK] = src[token, start : start + CHUNK]
    return tile


def ldmatrix_addresses(slab_rows: int, step: int, m_block: int) -> np.ndarray:
    """The 32 lanes' ldmatrix addresses (bytes from the tile's start) for k16 step `step` and
    m-block `m_block`, computed as consume() and multiply_mma() do."""
    lane = np.arange(32)
    b_row = lane % 8 + 8 * (lane // 16)
    b_lane = b_row * ATOM_BYTES + ((((lane // 8) % 2) ^ (lane % 8)) * CHUNK)
    return (step // 4) * slab_rows * ATOM_BYTES + (b_lane ^ ((2 * step % 8) * CHUNK)) + m_block * 16 * ATOM_BYTES


def expected_fragments(A: np.ndarray, slab: int, k_tile: int, slab_rows: int, step: int, m_block: int) -> np.ndarray:
    """mma.m16n8k16's B fragments (k16 x n8, n = tokens) of the transposed product: lane 4g + c
    holds k 2c, 2c + 1 (register 0) and 2c + 8, 2c + 9 (register 1) of token g of the m-block's
    tokens 0-7, and registers 2, 3 the same of its tokens 8-15; tokens past the batch are zeros."""
    words = np.zeros((32, 4), np.uint32)
    k0 = k_tile * 128 + 16 * step
    for t in range(32):
        g, c = t // 4, t % 4
        for reg, (upper, k) in enumerate([(0, 2 * c), (0, 2 * c + 8), (8, 2 * c), (8, 2 * c + 8)]):
            token = slab * slab_rows + 16 * m_block + upper + g
            if token < A.shape[0]:
                words[t, reg] = A[token, k0 + k : k0 + k + 2].view(np.uint32)[0]
    return words


def tensor_map_box(A: np.ndarray, x: int, y: int, box_rows: int, box_values: int) -> np.ndarray:
    """The copy engine's box at element coordinates (x, y) of A (x along a row) with its 128-byte
    swizzle: box row r, 16-byte chunk c goes to byte r * 128 + (c ^ (r % 8)) * 16 of the
    (1024-byte-aligned) destination; elements past A's end arrive as zeros."""
    assert box_values * A.itemsize == ATOM_BYTES, "the 128-byte swizzle takes rows of 128 bytes"
    box = np.zeros((box_rows, box_values), A.dtype)
    part = A[y : y + box_rows, x : x + box_values]
    box[: part.shape[0], : part.shape[1]] = part
    raw, out = box.view(np.uint8).reshape(box_rows, ATOM_BYTES), np.zeros(box_rows * ATOM_BYTES, np.uint8)
    for r in range(box_rows):
        for c in range(ATOM_BYTES // CHUNK):
            dst = r * ATOM_BYTES + (c ^ (r % 8)) * CHUNK
            out[dst : dst + CHUNK] = raw[r, c * CHUNK : (c + 1) * CHUNK]
    return out


def tensor_map_tile(A: np.ndarray, slab: int, k_tile: int, slab_rows: int) -> np.ndarray:
    """The activation tile as thread 0 copies it: one box per atom column (copy_activations)."""
    return np.concatenate([tensor_map_box(A, k_tile * 128 + 64 * a, slab * slab_rows, slab_rows, 64) for a in range(2)])


def bulk_copy_weights(words: np.ndarray, k_tile: int, col: int) -> np.ndarray:
    """A weight tile by eight bulk copies. words: the MARLIN layout, K/16 rows of 2 N int32."""
    rows = words.view(np.uint8)
    return np.concatenate([rows[8 * k_tile + r, 2048 * col : 2048 * (col + 1)] for r in range(8)])


def tensor_map_weights(words: np.ndarray, k_tile: int, col: int) -> np.ndarray:
    """A weight tile by one tensor-map copy: the layout as K/16 rows of N 8-byte elements, a box
    of 8 rows x 256 at (col * 256, k_tile * 8), no swizzle."""
    return words.view(np.uint64)[8 * k_tile : 8 * k_tile + 8, 256 * col : 256 * (col + 1)].copy().view(np.uint8).reshape(-1)
