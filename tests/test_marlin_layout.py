"""The CPU models of the MARLIN layout (reference/marlin_layout.py), bit for bit.

Weights: the packing is a bijection with an exact inverse and puts every code where the
mma fragment definition says the lane needs it. Dequantization: the lop3 / 0x6400 model
(0x4300 for bf16) equals plain q - 8 for every code in every nibble, and times any fp16
or bf16 scale equals the reference dequantize. Schedule: every tile is computed exactly once, each column slice
is reduced by its blocks in one fixed serial order, and no block waits on a lower one.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import reference as ref
from reference import marlin_layout as ml

shapes = st.tuples(st.integers(1, 6).map(lambda k: 16 * k), st.integers(1, 4).map(lambda n: 64 * n))
BF16 = np.dtype(ml_dtypes.bfloat16)


def scale_bits(dtype) -> st.SearchStrategy[int]:
    """Bit patterns of every scale a QuantizedWeight accepts: finite and non-zero."""
    exponent_mask = 0x7C00 if np.dtype(dtype) == np.float16 else 0x7F80
    return st.integers(0, 0xFFFF).filter(lambda b: (b & exponent_mask) != exponent_mask and b & 0x7FFF)
element_types = pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=["fp16", "bf16"])


def _weight(seed: int, K: int, N: int, group: int = -1) -> ref.QuantizedWeight:
    return ref.random_quantized_weight(np.random.default_rng(seed), K, N, group)


@given(shapes, st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(shape, seed):
    qw = _weight(seed, *shape)
    words = ml.pack_marlin_weights(qw)
    assert words.dtype == np.int32 and words.shape == (shape[0] // 16, 2 * shape[1])
    np.testing.assert_array_equal(ml.unpack_marlin_weights(words), qw.codes)


def test_packing_is_a_bijection_on_positions():
    """Each (row, column) of a 16 x 64 block is owned by exactly one (lane, word, nibble)."""
    flat = ml.FRAGMENT_ROW_OF * 64 + ml.FRAGMENT_COL_OF
    assert sorted(flat.ravel().tolist()) == list(range(16 * 64))


def test_lane_words_match_the_mma_fragment_definition():
    """Word j of lane 4g + c: B operand h of tile j takes rows 2c, 2c+1 (register 0) and
    2c+8, 2c+9 (register 1) of column 16j + 8h + g, each register's pair from nibbles (i, i+4)."""
    K, N = 16, 64
    codes = np.arange(K * N).reshape(K, N) % 16
    for trial in range(4):  # several labelings so every position is pinned down
        labels = (codes + trial * 5 + np.arange(K * N).reshape(K, N) // (16 * (trial + 1))) % 16
        qw = ref.QuantizedWeight(labels.astype(np.uint8), np.ones((1, N), np.float16), -1)
        words = ml.pack_marlin_weights(qw).view(np.uint32).reshape(32, 4)
        for lane in range(32):
            g, c = divmod(lane, 4)
            for j in range(4):
                nib = [(int(words[lane, j]) >> (4 * n)) & 0xF for n in range(8)]
                for h in range(2):
                    col = 16 * j + 8 * h + g
                    # the dequantizer's pass h reads nibbles (0,4),(1,5) shifted by 2h
                    assert (nib[2 * h], nib[2 * h + 4]) == (labels[2 * c, col], labels[2 * c + 1, col])
                    assert (nib[2 * h + 1], nib[2 * h + 5]) == (labels[2 * c + 8, col], labels[2 * c + 9, col])


@element_types
@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "zero_points"])
def test_lop3_dequantization_every_code_every_nibble(dtype, zero_points):
    offset = 0 if zero_points else 8
    for code in range(16):
        for nibble in range(8):
            others = np.arange(8) * 3 % 16
            word = sum(int(others[n] if n != nibble else code) << (4 * n) for n in range(8))
            values = ml.lop3_dequantize_word(np.array([word], dtype=np.uint32), zero_points, dtype)[0]
            nibbles = np.array([(word >> (4 * ml.NIBBLE_OF_VALUE[e])) & 0xF for e in range(8)])
            assert values.dtype == dtype
            np.testing.assert_array_equal(values.view(np.uint16), (nibbles - offset).astype(dtype).view(np.uint16))


@element_types
@given(word=st.integers(0, 2**32 - 1))
def test_lop3_dequantization_for_zero_points_gives_the_codes(dtype, word):
    values = ml.lop3_dequantize_word(np.array([word], dtype=np.uint32), zero_points=True, dtype=dtype)[0]
    expected = [(word >> (4 * ml.NIBBLE_OF_VALUE[e])) & 0xF for e in range(8)]
    np.testing.assert_array_equal(values.astype(np.int64), expected)


@given(scale_bits(np.float16), st.integers(0, 15))
def test_lop3_with_any_zero_point_and_fp16_scale_equals_reference(bits, zero):
    scale = np.array([bits], np.uint16).view(np.float16)[0]
    codes = np.arange(16, dtype=np.uint8)[:, None].repeat(64, axis=1)
    codes = np.concatenate([codes, codes[::-1]], axis=0)
    qw = ref.QuantizedWeight(codes, np.full((1, 64), scale, np.float16), -1, np.full((1, 64), zero, np.uint8))
    zeros = ml.permute_scales(qw.zeros.astype(np.float16))
    got = ml.dequantize_marlin(ml.pack_marlin_weights(qw), ml.permute_scales(qw.scales), -1, zeros)
    np.testing.assert_array_equal(got.view(np.uint16), ref.dequantize(qw).view(np.uint16))


def _every_code_and_zero_point(scale: np.ndarray) -> ref.QuantizedWeight:
    """32 x 64: each code twice per column (in both row classes of a tile), column c with
    zero point c % 16, one scale for all."""
    codes = np.arange(16, dtype=np.uint8)[:, None].repeat(64, axis=1)
    codes = np.concatenate([codes, codes[::-1]], axis=0)
    zeros = (np.arange(64, dtype=np.uint8) % 16)[None, :]
    return ref.QuantizedWeight(codes, np.full((1, 64), scale, scale.dtype), -1, zeros)


@given(scale_bits(BF16))
@example(0x0001)  # the least subnormal
@example(0x007F)  # the largest subnormal
@example(0x0080)  # the least normal
@example(0x7F7F)  # the largest finite value: the products overflow
@example(0x3DCD)  # ~0.1: every product rounds
def test_lop3_with_every_zero_point_and_any_bf16_scale_equals_reference(bits):
    qw = _every_code_and_zero_point(np.array(bits, np.uint16).view(BF16))
    zeros = ml.permute_scales(qw.zeros.astype(BF16))
    got = ml.dequantize_marlin(ml.pack_marlin_weights(qw), ml.permute_scales(qw.scales), -1, zeros)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got.view(np.uint16), ref.dequantize(qw).view(np.uint16))


@given(scale_bits(BF16))
@example(0x0001)
@example(0x7F7F)
def test_lop3_times_any_bf16_scale_equals_reference(bits):
    qw = _every_code_and_zero_point(np.array(bits, np.uint16).view(BF16))
    symmetric = ref.QuantizedWeight(qw.codes, qw.scales, -1)
    got = ml.dequantize_marlin(ml.pack_marlin_weights(symmetric), ml.permute_scales(symmetric.scales), -1)
    np.testing.assert_array_equal(got.view(np.uint16), ref.dequantize(symmetric).view(np.uint16))


@given(
    st.integers(1, 3).map(lambda k: 128 * k),
    st.integers(1, 4).map(lambda n: 64 * n),
    st.sampled_from(ref.GROUP_SIZES),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_marlin_dequantize_bf16_matches_reference(K, N, group, symmetric, seed):
    qw = ref.random_quantized_weight(np.random.default_rng(seed), K, N, group, symmetric, dtype=BF16)
    zeros = None if symmetric else ml.permute_scales(qw.zeros.astype(BF16))
    got = ml.dequantize_marlin(ml.pack_marlin_weights(qw), ml.permute_scales(qw.scales), group, zeros)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got.view(np.uint16), ref.dequantize(qw).view(np.uint16))


@pytest.mark.parametrize("group", ref.GROUP_SIZES)
def test_marlin_dequantize_with_zero_points_matches_reference(group):
    qw = ref.random_quantized_weight(np.random.default_rng(group % 97), 256, 192, group, symmetric=False)
    zeros = ml.permute_scales(qw.zeros.astype(np.float16))
    got = ml.dequantize_marlin(ml.pack_marlin_weights(qw), ml.permute_scales(qw.scales), group, zeros)
    np.testing.assert_array_equal(got.view(np.uint16), ref.dequantize(qw).view(np.uint16))


@element_types
@given(word=st.integers(0, 2**32 - 1))
def test_lop3_dequantization_random_words(dtype, word):
    values = ml.lop3_dequantize_word(np.array([word], dtype=np.uint32), dtype=dtype)[0]
    expected = [((word >> (4 * ml.NIBBLE_OF_VALUE[e])) & 0xF) - 8 for e in range(8)]
    assert values.dtype == dtype
    np.testing.assert_array_equal(values.astype(np.int64), expected)


@given(scale_bits(np.float16))
def test_lop3_times_any_fp16_scale_equals_reference(bits):
    scale = np.array([bits], np.uint16).view(np.float16)[0]
    codes = np.arange(16, dtype=np.uint8)[:, None].repeat(64, axis=1)
    codes = np.concatenate([codes, codes[::-1]], axis=0)  # 32 x 64: every code in every row class
    qw = ref.QuantizedWeight(codes, np.full((1, 64), scale, np.float16), -1)
    words = ml.pack_marlin_weights(qw)
    got = ml.dequantize_marlin(words, ml.permute_scales(qw.scales), -1)
    want = ref.dequantize(qw)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("group", ref.GROUP_SIZES)
def test_marlin_dequantize_matches_reference(group):
    qw = _weight(7, 256, 192, group)
    got = ml.dequantize_marlin(ml.pack_marlin_weights(qw), ml.permute_scales(qw.scales), group)
    np.testing.assert_array_equal(got.view(np.uint16), ref.dequantize(qw).view(np.uint16))


@element_types
@given(groups=st.integers(1, 5), chunks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_scale_permutation_round_trip(dtype, groups, chunks, seed):
    s = np.random.default_rng(seed).random((groups, 64 * chunks)).astype(dtype)
    p = ml.permute_scales(s)
    assert p.dtype == ml.unpermute_scales(p).dtype == dtype
    np.testing.assert_array_equal(ml.unpermute_scales(p), s)
    # lane 4g + c's 128-bit load (positions 8g..8g+7) = columns 16j + 8h + g, in (j, h) order
    for g in range(8):
        cols = [16 * j + 8 * h + g for j in range(4) for h in range(2)]
        np.testing.assert_array_equal(p[:, 8 * g : 8 * g + 8], s[:, cols])


schedules = st.tuples(
    st.integers(1, 16),  # slabs
    st.integers(1, 300),  # k_tiles
    st.integers(1, 200),  # n_tiles
    st.sampled_from([1, 2, 7, 108, 114, 132, 144]),  # SMs
    st.sampled_from([0.0, 4.0]),  # reduction cost in tiles (s6 ships 4)
)


@given(schedules)
def test_striped_schedule_covers_every_tile_once(problem):
    slabs, k_tiles, n_tiles, sms, cost = problem
    iters, schedule = ml.striped_schedule(slabs, k_tiles, n_tiles, sms, cost)
    assert len(schedule) <= sms
    seen = np.zeros((slabs, n_tiles, k_tiles), dtype=np.int64)
    for b, segments in enumerate(schedule):
        assert 0 < sum(s.rows for s in segments) <= iters
        for s in segments:
            seen[s.slab, s.col, s.row0 : s.row0 + s.rows] += 1
    assert np.all(seen == 1)


@given(schedules)
def test_striped_schedule_partials_of_a_slice(problem):
    """The blocks sharing a slice are contiguous, ascend in k, and each finds every other
    contributor's partials in the slot that contributor wrote (marlin::partial_slot)."""
    slabs, k_tiles, n_tiles, sms, cost = problem
    iters, schedule = ml.striped_schedule(slabs, k_tiles, n_tiles, sms, cost)
    by_slice: dict[tuple[int, int], list[ml.Segment]] = {}
    for segments in schedule:
        for s in segments:
            by_slice.setdefault((s.slab, s.col), []).append(s)
    for (slab, col), parts in by_slice.items():
        assert len(parts) == parts[0].contributors <= ml.MAX_SLICE_BLOCKS
        assert all(s.blocks == parts[0].blocks for s in parts)
        assert sorted(s.block for s in parts) == list(parts[0].blocks)
        order = sorted(parts, key=lambda s: s.block)
        assert order[0].row0 == 0 and order[-1].row0 + order[-1].rows == k_tiles
        for upper, lower in zip(order, order[1:]):
            assert upper.row0 + upper.rows == lower.row0
        slice_t0 = (slab * n_tiles + col) * k_tiles
        assert all(ml.partial_slot(s.block, iters, slice_t0) == s.slot for s in parts)


@given(schedules)
def test_striped_schedule_slots_never_collide(problem):
    """A block's shared segments use different slots (its two buffers), and a segment in
    the middle of a run is a whole slice that needs no reduction."""
    _, schedule = ml.striped_schedule(*problem)
    for segments in schedule:
        shared = [s.slot for s in segments if s.contributors > 1]
        assert len(shared) == len(set(shared)) <= 2
        for i, s in enumerate(segments):
            if 0 < i < len(segments) - 1:
                assert s.contributors == 1 and s.rows == problem[1]


@given(schedules)
def test_stripe_length_trades_tiles_against_shared_slices(problem):
    """The run length s6 launches costs its dearest block no more than the even share
    does, counting tiles plus the reduction cost per shared slice on the schedule itself."""
    slabs, k_tiles, n_tiles, sms, cost = problem

    def dearest(reduction_cost):
        _, schedule = ml.striped_schedule(slabs, k_tiles, n_tiles, sms, reduction_cost)
        return max(sum(s.rows + cost * (s.contributors > 1) for s in segments) for segments in schedule)

    assert dearest(cost) <= dearest(0.0)


@given(schedules)
def test_max_slice_contributors_counts_the_schedule(problem):
    """The model's count of the blocks sharing a slice is the schedule's busiest slice, and the
    run length keeps it within MAX_SLICE_BLOCKS."""
    slabs, k_tiles, n_tiles, sms, cost = problem
    iters, schedule = ml.striped_schedule(slabs, k_tiles, n_tiles, sms, cost)
    busiest = max(s.contributors for segments in schedule for s in segments)
    assert ml.max_slice_contributors(slabs * n_tiles * k_tiles, k_tiles, iters) == busiest <= ml.MAX_SLICE_BLOCKS


def test_stripe_length_counts_contributors_exactly():
    """Llama-2-7B's 4096 x 4096 in 128 x 256 tiles (16 slices of 32 k-tiles) on 132 SMs: runs of
    4 tiles give each slice exactly 8 contributors, so 128 blocks share the layer (a bound of
    ceil(32 / 4) + 1 = 9 once ruled them out, leaving it 64 blocks of 8 tiles)."""
    assert ml.max_slice_contributors(16 * 32, 32, 4) == 8
    assert ml.max_slice_contributors(16 * 32, 32, 5) == 8
    assert ml.stripe_length(16 * 32, 32, 132, reduction_cost=4.0) == 4


def test_stripe_length_prefers_whole_slices_when_sharing_costs_more():
    """96 slices of 16 tiles on 132 SMs (Llama-2-7B's 4096 x 12288 with 256 x 128 tiles):
    the even share, 12 tiles, makes every block share two slices; 16 makes none."""
    assert ml.stripe_length(96 * 16, 16, 132) == 12
    assert ml.stripe_length(96 * 16, 16, 132, reduction_cost=4.0) == 16


def test_striped_schedule_ideal_shape_needs_no_reduction():
    """K = 256 * 132, N = 128 * 132 with 128 x 128 tiles: one full column slice per SM."""
    iters, schedule = ml.striped_schedule(1, 264, 132, 132)
    assert iters == 264 and len(schedule) == 132
    assert all(len(s) == 1 and s[0].contributors == 1 for s in schedule)
