"""Properties of the NumPy specification itself."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from reference.packing import pack_int4_along_k, unpack_int4_along_k

groups = st.sampled_from(ref.GROUP_SIZES)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def weights(draw, symmetric=True):
    g = draw(groups)
    K = draw(st.integers(1, 8)) * 128
    N = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(seeds))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0]))
    W = (rng.standard_normal((K, N)) * scale).astype(np.float32)
    return W, ref.quantize(W, g, symmetric)


@given(weights())
def test_codes_in_range_and_shapes(data):
    W, qw = data
    K, N = W.shape
    assert qw.codes.dtype == np.uint8 and qw.codes.shape == (K, N) and qw.codes.max() <= 15
    groups_ = 1 if qw.group_size == -1 else K // qw.group_size
    assert qw.scales.shape == (groups_, N) and qw.scales.dtype == np.float16


@pytest.mark.parametrize("symmetric", [True, False])
@given(data=st.data())
def test_quantization_error_at_most_half_a_step(symmetric, data):
    W, qw = data.draw(weights(symmetric))
    deq = ref.dequantize(qw).astype(np.float64)
    s = ref.expand_groups(qw.scales, qw).astype(np.float64)
    # half a quantization step, plus the final rounding of the fp16 dequantized value
    assert np.all(np.abs(W - deq) <= s / 2 + ref.FP16_UNIT_ROUNDOFF * np.abs(deq) + 1e-12)


@given(weights())
def test_groups_share_one_scale_along_k(data):
    W, qw = data
    g = qw.group_rows
    # rescaling one group of one column changes only that group's dequantized values
    scales = qw.scales.copy()
    scales[0, 0] = scales[0, 0] * np.float16(2)
    other = ref.QuantizedWeight(qw.codes, scales, qw.group_size)
    changed = ref.dequantize(other) != ref.dequantize(qw)
    assert not changed[g:, :].any() and not changed[:, 1:].any()


def test_dequantize_is_fp16_of_the_exact_product():
    codes = np.arange(16, dtype=np.uint8).repeat(2).reshape(32, 1)
    scales = np.array([[0.1]], dtype=np.float16)
    qw = ref.QuantizedWeight(codes, scales, 32)  # one group of 32 rows
    expect = ((codes.astype(np.float64) - 8) * np.float64(scales[0, 0])).astype(np.float16)
    assert np.array_equal(ref.dequantize(qw), expect)


@given(st.integers(1, 16), st.integers(1, 20), seeds)
def test_int4_packing_round_trip(k8, N, seed):
    codes = np.random.default_rng(seed).integers(0, 16, (8 * k8, N), dtype=np.uint8)
    words = pack_int4_along_k(codes)
    assert words.dtype == np.int32 and words.shape == (k8, N)
    assert np.array_equal(unpack_int4_along_k(words), codes)
    # row 8r+i lives in bits 4i..4i+3 of word r
    assert (int(words.view(np.uint32)[0, 0]) >> 4) & 0xF == codes[1, 0]


@given(st.integers(1, 5), st.integers(1, 8), st.integers(1, 30), seeds)
def test_reference_gemm_matches_independent_float64(M, k128, N, seed):
    rng = np.random.default_rng(seed)
    qw = ref.random_quantized_weight(rng, 128 * k128, N, -1)
    A = rng.standard_normal((M, qw.K)).astype(np.float16)
    W = (qw.codes.astype(np.float64) - 8) * qw.scales.astype(np.float64)
    W16 = W.astype(np.float16).astype(np.float64)
    expect = np.einsum("mk,kn->mn", A.astype(np.float64), W16).astype(np.float16)
    assert np.array_equal(ref.reference_gemm(A, qw), expect)


def test_error_excess_catches_one_wrong_weight_and_nan():
    rng = np.random.default_rng(1)
    qw = ref.random_quantized_weight(rng, 512, 64, 128)
    A = rng.standard_normal((4, 512)).astype(np.float16)
    good = ref.reference_gemm(A, qw)
    assert ref.error_excess(good, A, qw, 1.0) == 0.0
    bad = qw.codes.copy()
    bad[7, 3] ^= 0x8  # one code off by 8 steps
    wrong = ref.reference_gemm(A, ref.QuantizedWeight(bad, qw.scales, 128))
    assert ref.error_excess(wrong, A, qw, 4.0) > 1.0
    nan = good.copy()
    nan[0, 0] = np.nan
    assert ref.error_excess(nan, A, qw, 4.0) == float("inf")


@given(st.integers(1, 16), st.integers(1, 12), seeds)
def test_2_4_prune_compress_round_trip(k4, N, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((4 * k4, N)).astype(np.float16)
    W[rng.random(W.shape) < 0.3] = 0  # groups with fewer than 2 non-zeros too
    P = ref.prune_2_4(W)
    assert ref.is_2_4(P)
    kept = np.abs(P.reshape(k4, 4, N)).astype(np.float64)
    dropped = np.abs(np.where(P == 0, W, 0).reshape(k4, 4, N)).astype(np.float64)
    assert np.all(np.sort(kept, axis=1)[:, 2, :] >= dropped.max(axis=1))  # kept the 2 largest
    values, idx = ref.compress_2_4(P)
    assert values.shape == (2 * k4, N) and idx.max() <= 3
    assert np.all(idx.reshape(k4, 2, N)[:, 0] < idx.reshape(k4, 2, N)[:, 1])
    assert np.array_equal(ref.decompress_2_4(values, idx), P)


def test_compress_rejects_dense_groups():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        ref.compress_2_4(np.ones((4, 1), dtype=np.float16))


@pytest.mark.parametrize("g", [0, 100, 256])
def test_bad_group_size_is_a_clear_error(g):
    with pytest.raises(ValueError, match="group_size"):
        ref.quantize(np.zeros((256, 8), np.float32), g)
