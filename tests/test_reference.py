"""Properties of the NumPy specification itself."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import reference as ref
from reference.packing import pack_int4_along_k, unpack_int4_along_k

groups = st.sampled_from(ref.GROUP_SIZES)
seeds = st.integers(0, 2**32 - 1)
BF16 = np.dtype(ml_dtypes.bfloat16)
element_types = pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=["fp16", "bf16"])


@st.composite
def weights(draw, symmetric=True, dtype=np.float16):
    g = draw(groups)
    K = draw(st.integers(1, 8)) * 128
    N = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(seeds))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0]))
    W = (rng.standard_normal((K, N)) * scale).astype(np.float32)
    return W, ref.quantize(W, g, symmetric, dtype=dtype)


def correctly_rounded(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x (float64) rounded to nearest, ties to even, by brute force: of the two neighbouring
    bit patterns of |x| (positive patterns ascend with their values, and the one after the
    largest finite value is inf, standing for 2**(emax + 1)), the nearer, or the even one."""
    inf_bits = int(np.array([np.inf], dtype).view(np.uint16)[0])
    bits = np.arange(inf_bits + 1, dtype=np.uint16)
    values = bits.view(dtype).astype(np.float64)
    values[-1] = np.ldexp(1.0, np.frexp(values[-2])[1])
    magnitude = np.abs(x)
    i = np.clip(np.searchsorted(values, magnitude, side="right") - 1, 0, inf_bits - 1)
    below, above = values[i] - magnitude, values[i + 1] - magnitude  # exact: Sterbenz
    up = (above < -below) | ((above == -below) & (bits[i] % 2 == 1))
    rounded = bits[i] + up.astype(np.uint16)
    return (rounded | (np.signbit(x).astype(np.uint16) << 15)).view(dtype)


@element_types
@given(data=st.data())
def test_codes_in_range_and_shapes(dtype, data):
    W, qw = data.draw(weights(dtype=dtype))
    K, N = W.shape
    assert qw.codes.dtype == np.uint8 and qw.codes.shape == (K, N) and qw.codes.max() <= 15
    groups_ = 1 if qw.group_size == -1 else K // qw.group_size
    assert qw.scales.shape == (groups_, N) and qw.scales.dtype == dtype and qw.dtype == dtype
    assert ref.dequantize(qw).dtype == dtype


def test_centered_random_weights_have_mean_zero_and_uniform_ones_do_not():
    """Uniform codes about the zero point 8 average -0.5 codes (a shared component a deep
    model adds up); centered ones are symmetric about 8 within 1..15, mean zero."""
    K, N = 1024, 512
    uniform = ref.random_quantized_weight(np.random.default_rng(1), K, N, 128)
    centered = ref.random_quantized_weight(np.random.default_rng(1), K, N, 128, centered=True)
    assert centered.codes.min() == 1 and centered.codes.max() == 15
    counts = np.bincount(centered.codes.ravel(), minlength=16)
    np.testing.assert_allclose(counts[9:16], counts[7:0:-1], rtol=0.05)  # 8 + d as often as 8 - d
    standard_error = 1 / np.sqrt(K * N)  # of a mean over K N values of unit spread
    for qw, expected in ((uniform, -0.5 / 4.6), (centered, 0.0)):  # mean / sd of the values q - 8
        values = qw.codes.astype(np.float64) - 8
        assert abs(values.mean() / values.std() - expected) < 5 * standard_error
    with pytest.raises(ValueError, match="symmetric=True with centered=True"):
        ref.random_quantized_weight(np.random.default_rng(1), K, N, 128, symmetric=False, centered=True)


@element_types
@pytest.mark.parametrize("symmetric", [True, False])
@given(data=st.data())
def test_quantization_error_at_most_half_a_step(dtype, symmetric, data):
    W, qw = data.draw(weights(symmetric, dtype))
    deq = ref.dequantize(qw).astype(np.float64)
    s = ref.expand_groups(qw.scales, qw).astype(np.float64)
    # half a quantization step, plus the final rounding of the dequantized value
    assert np.all(np.abs(W - deq) <= s / 2 + ref.unit_roundoff(dtype) * np.abs(deq) + 1e-12)


@element_types
@pytest.mark.parametrize("symmetric", [True, False])
@given(data=st.data())
def test_scales_are_the_least_element_not_below_the_true_scale(dtype, symmetric, data):
    W, qw = data.draw(weights(symmetric, dtype))
    Wg = W.astype(np.float64).reshape(-1, qw.group_rows, qw.N)
    if symmetric:
        true_scale = np.abs(Wg).max(axis=1) / 7
    else:
        true_scale = (np.maximum(Wg.max(axis=1), 0) - np.minimum(Wg.min(axis=1), 0)) / 15
    next_below = np.nextafter(qw.scales, dtype.type(-np.inf)).astype(np.float64)
    assert np.all(qw.scales.astype(np.float64) >= true_scale) and np.all(next_below < true_scale)


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


@pytest.mark.parametrize(
    "dtype, scale",
    [(np.dtype(np.float16), 0.1), (BF16, 0.1), (BF16, 1e20)],
    ids=["fp16", "bf16", "bf16-beyond-fp16-range"],
)
def test_dequantize_is_the_exact_product_rounded_once(dtype, scale):
    codes = np.arange(16, dtype=np.uint8).repeat(2).reshape(32, 1)
    scales = np.array([[scale]], dtype=dtype)  # all significand bits in use: products round
    qw = ref.QuantizedWeight(codes, scales, 32)  # one group of 32 rows
    expect = correctly_rounded((codes.astype(np.float64) - 8) * np.float64(scales[0, 0]), dtype)
    assert ref.dequantize(qw).dtype == dtype
    assert np.array_equal(ref.dequantize(qw).view(np.uint16), expect.view(np.uint16))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_element_dtype_accepts_names_types_and_dtypes(name):
    dtype = np.dtype(name)
    assert ref.element_dtype(name) == ref.element_dtype(dtype.type) == ref.element_dtype(dtype) == dtype
    assert dtype in ref.ELEMENT_DTYPES


@pytest.mark.parametrize("bad", [np.float32, "float64", "int8", "nonsense", None])
def test_element_dtype_rejects_anything_else(bad):
    with pytest.raises(TypeError, match="must be float16 or bfloat16, got"):
        ref.element_dtype(bad)
    with pytest.raises(TypeError, match="must be float16 or bfloat16"):
        ref.quantize(np.ones((128, 4), np.float32), dtype=bad)


def test_quantized_weight_rejects_scales_of_other_types():
    with pytest.raises(TypeError, match="scales must be float16 or bfloat16, got float32"):
        ref.QuantizedWeight(np.zeros((32, 4), np.uint8), np.ones((1, 4), np.float32), 32)


@element_types
def test_random_quantized_weight_in_each_element_type(dtype):
    qw = ref.random_quantized_weight(np.random.default_rng(0), 256, 8, 128, symmetric=False, dtype=dtype)
    assert qw.scales.dtype == qw.dtype == dtype and qw.zeros is not None
    assert ref.dequantize(qw).dtype == dtype


@element_types
@given(st.floats(allow_nan=False, width=64))
@example(1 + 2**-8 + 2**-30)  # bf16 by way of float32 rounds this twice, to 1
@example(1 + 2**-11 + 2**-40)
@example(2.0**-134)  # a tie between zero and the least bf16 subnormal
@example(-(2.0**-25))  # the same for fp16: rounds to -0
@example(65520.0)  # fp16: halfway between the largest finite value and the next power of 2
@example((2 - 2**-8) * 2.0**127)  # bf16: the same
def test_round_to_element_is_correctly_rounded(dtype, x):
    got = ref.round_to_element(np.array([x]), dtype)
    assert got.dtype == dtype
    assert got.view(np.uint16)[0] == correctly_rounded(np.array([x]), dtype).view(np.uint16)[0]


@given(st.integers(1, 16), st.integers(1, 20), seeds)
def test_int4_packing_round_trip(k8, N, seed):
    codes = np.random.default_rng(seed).integers(0, 16, (8 * k8, N), dtype=np.uint8)
    words = pack_int4_along_k(codes)
    assert words.dtype == np.int32 and words.shape == (k8, N)
    assert np.array_equal(unpack_int4_along_k(words), codes)
    # row 8r+i lives in bits 4i..4i+3 of word r
    assert (int(words.view(np.uint32)[0, 0]) >> 4) & 0xF == codes[1, 0]


@element_types
@given(st.integers(1, 5), st.integers(1, 8), st.integers(1, 30), seeds)
def test_reference_gemm_matches_independent_float64(dtype, M, k128, N, seed):
    rng = np.random.default_rng(seed)
    qw = ref.random_quantized_weight(rng, 128 * k128, N, -1, dtype=dtype)
    A = rng.standard_normal((M, qw.K)).astype(dtype)
    W = (qw.codes.astype(np.float64) - 8) * qw.scales.astype(np.float64)
    W_rounded = correctly_rounded(W, dtype).astype(np.float64)
    expect = correctly_rounded(np.einsum("mk,kn->mn", A.astype(np.float64), W_rounded), dtype)
    got = ref.reference_gemm(A, qw)
    assert got.dtype == dtype
    assert np.array_equal(got.view(np.uint16), expect.view(np.uint16))


def test_bf16_reference_gemm_rounds_once():
    """1 + 2**-8 + 2**-30 lies just above the midpoint of bf16 1 and 1 + 2**-7; rounding it to
    float32 first lands on the midpoint exactly, and ties-to-even then gives 1."""
    A = np.ones((1, 3), BF16)
    W = np.array([[1.0], [2.0**-8], [2.0**-30]], BF16)
    assert ref.reference_gemm(A, W)[0, 0] == BF16.type(1 + 2**-7)


@pytest.mark.parametrize(
    "a, w",
    [(np.float16, BF16), (BF16, np.float16), (np.float32, np.float16), (np.float16, np.float32)],
    ids=["fp16-bf16", "bf16-fp16", "fp32-fp16", "fp16-fp32"],
)
def test_reference_gemm_rejects_mixed_or_other_element_types(a, w):
    A = np.ones((2, 32), a)
    W = np.ones((32, 4), w)
    with pytest.raises(TypeError, match="float16 or bfloat16|share one element type"):
        ref.reference_gemm(A, W)
    with pytest.raises(TypeError):
        ref.error_bound(A, W, 1.0)
    if np.dtype(w) in ref.ELEMENT_DTYPES:
        qw = ref.QuantizedWeight(np.zeros((32, 4), np.uint8), np.ones((1, 4), w), 32)
        with pytest.raises(TypeError):
            ref.reference_gemm(A, qw)


@pytest.mark.parametrize(
    "dtype, u, subnormal_spacing",
    [(np.dtype(np.float16), 2.0**-11, 2.0**-24), (BF16, 2.0**-8, 2.0**-133)],
    ids=["fp16", "bf16"],
)
def test_error_bound_uses_the_element_type_of_a(dtype, u, subnormal_spacing):
    assert ref.unit_roundoff(dtype) == ref.unit_roundoff(dtype.name) == u
    A = np.array([[1.0, -2.0, 0.0]], dtype)
    W = np.array([[3.0, 0.0], [0.5, 0.0], [7.0, 0.0]], dtype)
    bound = ref.error_bound(A, W, c=5.0)
    np.testing.assert_array_equal(bound, [[5.0 * u * 4.0 + subnormal_spacing, subnormal_spacing]])


def test_fp16_unit_roundoff_is_still_exported():
    assert ref.FP16_UNIT_ROUNDOFF == ref.unit_roundoff(np.float16) == 2.0**-11


# bf16's unit roundoff is 8 times fp16's, so one code off by 8 steps among K = 512 terms
# stands out of its bound only at a smaller c
@pytest.mark.parametrize("dtype, c", [(np.dtype(np.float16), 4.0), (BF16, 1.0)], ids=["fp16", "bf16"])
def test_error_excess_catches_one_wrong_weight_and_nan(dtype, c):
    rng = np.random.default_rng(1)
    qw = ref.random_quantized_weight(rng, 512, 64, 128, dtype=dtype)
    A = rng.standard_normal((4, 512)).astype(dtype)
    good = ref.reference_gemm(A, qw)
    assert ref.error_excess(good, A, qw, 1.0) == 0.0
    bad = qw.codes.copy()
    bad[7, 3] ^= 0x8  # one code off by 8 steps
    wrong = ref.reference_gemm(A, ref.QuantizedWeight(bad, qw.scales, 128))
    assert ref.error_excess(wrong, A, qw, c) > 1.0
    nan = good.copy()
    nan[0, 0] = np.nan
    assert ref.error_excess(nan, A, qw, c) == float("inf")


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
