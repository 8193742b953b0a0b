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
