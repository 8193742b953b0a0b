"""Rung 8's activation tile: where the producer's copies put each value, and what each
consumer lane's ldmatrix then reads (reference/hopper_tiles.py)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from reference import hopper_tiles as tiles
from reference.marlin_layout import pack_marlin_weights
from reference.sparse_marlin import ldmatrix_x4


def activation_tiles(M: int, k_tiles: int, m_blocks: int, seed: int):
    """(A, slab, k_tile, slab rows) for every activation tile of random M x 128 k_tiles codes."""
    A = np.random.default_rng(seed).integers(0, 2**16, (M, 128 * k_tiles), dtype=np.uint16)
    slab_rows = 16 * m_blocks
    for slab in range(-(-M // slab_rows)):
        for k_tile in range(k_tiles):
            yield A, slab, k_tile, slab_rows


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1))
def test_every_lane_reads_its_mma_fragments_from_the_swizzled_tile(M, k_tiles, m_blocks, seed):
    for A, slab, k_tile, slab_rows in activation_tiles(M, k_tiles, m_blocks, seed):
        tile = tiles.cp_async_tile(A, slab, k_tile, slab_rows)
        for step in range(8):
            for m_block in range(m_blocks):
                got = ldmatrix_x4(tile.view(np.uint32), tiles.ldmatrix_addresses(slab_rows, step, m_block) // 16)
                assert np.array_equal(got, tiles.expected_fragments(A, slab, k_tile, slab_rows, step, m_block))


def test_each_value_of_the_tile_is_stored_once():
    """The swizzle is a permutation of each atom column's 16-byte chunks."""
    for rows in (16, 32, 64, 128):
        offsets = sorted(tiles.swizzled_offset(rows, r, c) for r in range(rows) for c in range(16))
        assert offsets == list(range(0, rows * 256, 16))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 140), st.integers(1, 3), st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 2**32 - 1))
def test_the_activation_tile_by_tensor_map_is_the_cp_async_tile(M, k_tiles, m_blocks, seed):
    for A, slab, k_tile, slab_rows in activation_tiles(M, k_tiles, m_blocks, seed):
        expected = tiles.cp_async_tile(A, slab, k_tile, slab_rows)
        assert np.array_equal(tiles.tensor_map_tile(A, slab, k_tile, slab_rows), expected)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_the_weight_tile_by_tensor_map_is_the_eight_bulk_copies(k_tiles, n_tiles, seed):
    words = pack_marlin_weights(ref.random_quantized_weight(np.random.default_rng(seed), 128 * k_tiles, 256 * n_tiles, 128))
    for k_tile in range(k_tiles):
        for col in range(n_tiles):
            assert np.array_equal(tiles.tensor_map_weights(words, k_tile, col), tiles.bulk_copy_weights(words, k_tile, col))
