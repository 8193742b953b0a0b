"""Sparse-MARLIN (rung s7): the pruning that defines it, its compressed layout, and its kernel.

On the CPU: the 2:4 pruning of quantized weights keeps the two largest dequantized
magnitudes of every four along K and is idempotent; compression, the fragment-ordered
packing of the kept codes and the metadata packing are exact round trips; every lane's
words and metadata registers hold what the PTX definition of mma.sp.m16n8k32 says that
lane must supply; the kernel's dequantization reproduces the pruned reference bit for
bit; and a lane-by-lane emulation of the whole kernel (reference.sparse_marlin.
emulate_kernel) reproduces reference_gemm(A, pruned) exactly on integer-valued data.
On a GPU (marked `gpu`): the kernel itself against that reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from reference import sparse_marlin as sm
from reference.marlin_layout import LANES, permute_scales

shapes = st.tuples(st.integers(1, 6).map(lambda k: 32 * k), st.integers(1, 4).map(lambda n: 64 * n))


def _weight(seed: int, K: int, N: int, group: int = -1) -> ref.QuantizedWeight:
    return ref.random_quantized_weight(np.random.default_rng(seed), K, N, group)


def _exact_problem(rng, M: int, K: int, N: int, group: int):
    """Integer-valued A and scales 1/8: every product and partial sum is exact, so any
    correct summation order gives the reference bit for bit."""
    groups = K // ref.group_rows(group, K)
    qw = ref.QuantizedWeight(rng.integers(0, 16, (K, N), dtype=np.uint8), np.full((groups, N), 0.125, np.float16), group)
    A = rng.integers(-1, 2, (M, K)).astype(np.float16)
    return A, qw


# -- pruning --------------------------------------------------------------------------
@given(shapes, st.sampled_from([-1, 32, 64, 128]), st.integers(0, 2**32 - 1))
def test_pruning_keeps_the_two_largest_magnitudes_of_every_four(shape, group, seed):
    K, N = shape
    if group != -1 and K % group:
        group = -1
    qw = _weight(seed, K, N, group)
    pruned = sm.prune_quantized_2_4(qw)
    W, P = ref.dequantize(qw).astype(np.float64), ref.dequantize(pruned).astype(np.float64)
    assert ref.is_2_4(P)
    kept = sm.keep_mask_quantized_2_4(qw).reshape(K // 4, 4, N)
    assert np.all(kept.sum(axis=1) == 2)
    mags = np.abs(W).reshape(K // 4, 4, N)
    smallest_kept = np.where(kept, mags, np.inf).min(axis=1)
    largest_dropped = np.where(kept, -np.inf, mags).max(axis=1)
    assert np.all(smallest_kept >= largest_dropped)
    np.testing.assert_array_equal(P, np.where(kept.reshape(K, N), W, 0.0))
    # Pruning a pruned weight changes nothing, and it is prune_2_4 of the dequantized weight.
    np.testing.assert_array_equal(sm.prune_quantized_2_4(pruned).codes, pruned.codes)
    np.testing.assert_array_equal(P, ref.prune_2_4(ref.dequantize(qw)).astype(np.float64))


def test_pruning_ties_go_to_the_lower_row():
    codes = np.array([[9], [7], [9], [7]], dtype=np.uint8)  # all |q - 8| = 1
    qw = ref.QuantizedWeight(np.repeat(codes, 64, axis=1), np.ones((1, 64), np.float16), -1)
    np.testing.assert_array_equal(sm.prune_quantized_2_4(qw).codes[:, 0], [9, 7, 8, 8])


# -- compression and packing ------------------------------------------------------------
@given(shapes, st.integers(0, 2**32 - 1))
def test_compression_and_packing_round_trip(shape, seed):
    K, N = shape
    qw = _weight(seed, K, N)
    codes, positions = sm.compress_quantized_2_4(qw)
    assert codes.shape == positions.shape == (K // 2, N)
    pairs = positions.reshape(K // 4, 2, N)
    assert np.all(pairs[:, 0] < pairs[:, 1])  # the ordered metadata mma.sp requires
    np.testing.assert_array_equal(sm.decompress_quantized_2_4(codes, positions), sm.prune_quantized_2_4(qw).codes)
    words = sm.pack_sparse_weights(codes)
    assert words.dtype == np.int32 and words.shape == (K // 32, 2 * N)
    np.testing.assert_array_equal(sm.unpack_sparse_weights(words), codes)
    meta = sm.pack_sparse_metadata(positions)
    assert meta.dtype == np.int32 and meta.shape == (K // 32, N)
    np.testing.assert_array_equal(sm.unpack_sparse_metadata(meta), positions)


def test_packing_is_a_bijection_on_positions():
    flat = sm.VALUE_ROW_OF * 64 + sm.VALUE_COL_OF
    assert sorted(flat.ravel().tolist()) == list(range(16 * 64))
    meta_flat = (sm.META_TILE_OF * 16 + sm.META_ROW_OF) * 8 + sm.META_GROUP_OF
    assert sorted(meta_flat.ravel().tolist()) == list(range(64 * 8))


def test_lane_words_are_the_mma_sp_a_fragments():
    """After s4's dequantizer (pairs from nibbles (0,4), (1,5) then (2,6), (3,7)), word j of
    lane 4g + c gives registers {pair 0, pair 2, pair 1, pair 3} = kept values (g, 2c..2c+1),
    (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..) of tile j -- the PTX A fragment layout."""
    rng = np.random.default_rng(5)
    kept = rng.integers(0, 16, (16, 64), dtype=np.uint8)
    words = sm.pack_sparse_weights(kept).view(np.uint32).reshape(32, 4)
    for lane in range(LANES):
        g, c = divmod(lane, 4)
        for j in range(4):
            nib = [(int(words[lane, j]) >> (4 * n)) & 0xF for n in range(8)]
            pairs = [(nib[0], nib[4]), (nib[1], nib[5]), (nib[2], nib[6]), (nib[3], nib[7])]
            registers = [pairs[0], pairs[2], pairs[1], pairs[3]]
            for reg, (row, col) in enumerate([(g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8)]):
                assert registers[reg] == (kept[col, 16 * j + row], kept[col + 1, 16 * j + row])


def test_lane_metadata_is_what_mma_sp_reads():
    """Word p of lane 4g + 2s + h serves tile 2p + s (selector s) for K half h: bits
    16r + 4q.. of it are group 4h + q of tile row g + 8r, first position in the low 2 bits."""
    rng = np.random.default_rng(6)
    positions = np.sort(np.stack([rng.permutation(4)[:2] for _ in range(8 * 64)]), axis=1)
    positions = positions.reshape(8, 64, 2).transpose(0, 2, 1).reshape(16, 64).astype(np.uint8)
    meta = sm.pack_sparse_metadata(positions).view(np.uint32).reshape(32, 2)
    for lane in range(LANES):
        g, c = divmod(lane, 4)
        s, h = divmod(c, 2)
        for p in range(2):
            col_of_tile = 16 * (2 * p + s)
            for r in range(2):
                for q in range(4):
                    nibble = (int(meta[lane, p]) >> (16 * r + 4 * q)) & 0xF
                    group = 4 * h + q
                    want = positions[2 * group, col_of_tile + g + 8 * r] | positions[2 * group + 1, col_of_tile + g + 8 * r] << 2
                    assert nibble == want


@given(st.sampled_from([-1, 32, 64, 128]), st.integers(0, 2**32 - 1))
def test_kernel_dequantization_is_bit_exact(group, seed):
    K, N = 256, 192
    qw = _weight(seed, K, N, group)
    arrays = sm.pack_sparse_marlin(qw)
    np.testing.assert_array_equal(arrays["scales"], permute_scales(qw.scales))
    got = sm.dequantize_sparse_marlin(arrays, K, N, group)
    want = ref.dequantize(sm.prune_quantized_2_4(qw))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_zero_points_are_refused():
    qw = ref.random_quantized_weight(np.random.default_rng(0), 64, 64, 32, symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        sm.pack_sparse_marlin(qw)


# -- the instruction models ---------------------------------------------------------------
def test_mma_sp_model_multiplies_the_decompressed_operand():
    """The mma.sp model, fed with registers built from a dense 2:4 tile, equals the dense
    product: checks the model's own A / B / accumulator ownership against plain matrices."""
    rng = np.random.default_rng(2)
    lane = np.arange(LANES)
    g, c = lane // 4, lane % 4
    for selector in (0, 1):
        dense = ref.prune_2_4(rng.standard_normal((32, 16)).astype(np.float16)).T  # 16 x 32, sparse along K
        values, positions = ref.compress_2_4(dense.T)  # (16, 16) each, as K/2 x rows
        kept = values.T
        B = rng.standard_normal((32, 8)).astype(np.float16)

        def pack(lo, hi):
            return np.stack([lo, hi], axis=-1).astype(np.float16).view(np.uint32)[..., 0]

        a = np.stack([pack(kept[g + ro, 2 * c + co], kept[g + ro, 2 * c + co + 1])
                      for ro, co in [(0, 0), (8, 0), (0, 8), (8, 8)]], axis=1)  # fmt: skip
        b = np.stack([pack(B[8 * i + 2 * c, g], B[8 * i + 2 * c + 1, g]) for i in range(4)], axis=1)
        meta = np.zeros(LANES, np.uint32)
        pos = positions.T  # (16 rows, 16 kept)
        for ln in range(LANES):
            gg, cc = divmod(ln, 4)
            if cc // 2 != selector:
                meta[ln] = 0xDEADBEEF  # lanes of the other selector are ignored
                continue
            word = 0
            for r in range(2):
                for q in range(4):
                    grp = 4 * (cc % 2) + q
                    word |= (int(pos[gg + 8 * r, 2 * grp]) | int(pos[gg + 8 * r, 2 * grp + 1]) << 2) << (16 * r + 4 * q)
            meta[ln] = word
        d = sm.mma_sp_m16n8k32(a, b, meta, selector, np.zeros((LANES, 4)))
        full = dense.astype(np.float64) @ B.astype(np.float64)
        np.testing.assert_allclose(d, np.stack([full[g, 2 * c], full[g, 2 * c + 1], full[g + 8, 2 * c],
                                                 full[g + 8, 2 * c + 1]], axis=1), rtol=1e-12)  # fmt: skip


# -- the kernel, emulated lane by lane -------------------------------------------------------
EMULATED = [
    # (m_blocks, tile_n, tile_k, group_size, K, N, M, sms): striped over few "SMs" so that
    # column slices are shared and reduced in the output.
    (1, 128, 256, 128, 768, 256, 5, 4),
    (1, 128, 256, -1, 512, 128, 16, 3),
    (2, 128, 256, 32, 512, 256, 20, 3),
    (3, 256, 128, 64, 384, 256, 41, 5),
    (4, 256, 128, 128, 512, 512, 70, 7),
]


@pytest.mark.parametrize("m_blocks,tile_n,tile_k,group_size,K,N,M,sms", EMULATED)
def test_emulated_kernel_reproduces_the_pruned_reference(m_blocks, tile_n, tile_k, group_size, K, N, M, sms):
    rng = np.random.default_rng(m_blocks * 1000 + M)
    A, qw = _exact_problem(rng, M, K, N, group_size)
    arrays = sm.pack_sparse_marlin(qw)
    C = sm.emulate_kernel(sm.SparseTile(m_blocks, tile_n, tile_k, group_size), A, arrays, K, N, sms)
    np.testing.assert_array_equal(C, ref.reference_gemm(A, sm.prune_quantized_2_4(qw)))


def test_emulated_kernel_is_within_the_bound_on_random_data():
    rng = np.random.default_rng(9)
    K, N, M = 512, 256, 9
    qw = ref.random_quantized_weight(rng, K, N, 128)
    A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    C = sm.emulate_kernel(sm.SparseTile(1, 128, 256, 128), A, sm.pack_sparse_marlin(qw), K, N, 3)
    assert ref.error_excess(C, A, sm.prune_quantized_2_4(qw), 17.0) <= 1.0


# -- the rung ------------------------------------------------------------------------------
def _step():
    from steps.s7_sparse_marlin import SparseMarlin

    return SparseMarlin()


def test_step_multiplies_by_the_pruned_weight_and_packs_the_model_layout():
    step = _step()
    qw = _weight(3, 512, 256, 128)
    pruned = step.reference_weight(qw)
    np.testing.assert_array_equal(pruned.codes, sm.prune_quantized_2_4(qw).codes)
    arrays = step.pack_host(qw)
    for name, array in sm.pack_sparse_marlin(qw).items():
        np.testing.assert_array_equal(arrays[name], array)
    assert step.supports(1, 4096, 12288, 128) and step.supports(1000, 28672, 8192, -1)
    # Off its tiles, the weight is padded to the next (256, 128) or (128, 256) multiple, not refused.
    assert step.supports(1, 4096 + 64, 4096, -1) and step.padded_shape(4096 + 64, 4096, -1) == (4224, 4096)


def test_llama_and_ideal_shapes_are_supported_with_both_tiles():
    from steps.registry import get
    from steps.s5_async_pipeline import tile_shapes_for

    s7 = get("s7_sparse_marlin")
    shapes = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (8192, 10240), (8192, 8192),
              (8192, 57344), (28672, 8192), (33792, 16896)]  # fmt: skip
    for K, N in shapes:
        assert tile_shapes_for(K, N, s7.tile_plan(1, N, 132)) == (256, 128)
        assert tile_shapes_for(K, N, s7.tile_plan(64, N, 132)) == (128, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16, 33, 64, 100, 1000])
@pytest.mark.parametrize("group", [-1, 128])
def test_kernel_matches_the_pruned_reference(M, group):
    import cupy

    step = _step()
    rng = np.random.default_rng(M + group)
    K, N = 1024, 768
    qw = ref.random_quantized_weight(rng, K, N, group)
    A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    out = cupy.full((M, N), np.nan, dtype=cupy.float16)
    step(cupy.asarray(A), step.pack(qw), out=out)
    assert ref.error_excess(out.get(), A, step.reference_weight(qw), step.error_c) <= 1.0


@pytest.mark.gpu
def test_kernel_is_exact_on_integer_data():
    import cupy

    step = _step()
    rng = np.random.default_rng(4)
    A, qw = _exact_problem(rng, 37, 1024, 512, 128)
    out = cupy.full((37, 512), np.nan, dtype=cupy.float16)
    step(cupy.asarray(A), step.pack(qw), out=out)
    np.testing.assert_array_equal(out.get(), ref.reference_gemm(A, step.reference_weight(qw)))
