"""GPTQ and AWQ checkpoint tensors against the reference: bit layout, round trips, act-order.

The layouts are pinned twice: by hand-written words whose nibbles we can read off, and by
an independent dequantization written the way the formats' own torch fallbacks compute
it (scales[g_idx] * (q - zeros[g_idx]) in the checkpoint's row order).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from reference.formats import (
    AWQ_NIBBLE_ORDER,
    act_order_gemm,
    act_order_permutation,
    dequantize_checkpoint_order,
    export_awq,
    export_gptq,
    group_index,
    import_awq,
    import_gptq,
    pack_int4_along_n,
    unpack_int4_along_n,
)

seeds = st.integers(0, 2**32 - 1)
formats = st.sampled_from(["gptq", "gptq_v2"])


@st.composite
def quantized(draw, zeros_low: int = 0):
    """A random QuantizedWeight (K, N multiples of 8; symmetric or with zeros >= zeros_low)."""
    g = draw(st.sampled_from(ref.GROUP_SIZES))
    K = draw(st.integers(1, 4)) * 128
    N = draw(st.integers(1, 6)) * 8
    rng = np.random.default_rng(draw(seeds))
    qw = ref.random_quantized_weight(rng, K, N, g, symmetric=draw(st.booleans()))
    if qw.zeros is not None:
        zeros = rng.integers(zeros_low, 16, size=qw.scales.shape, dtype=np.uint8)
        zeros.flat[0] = 8 if zeros_low > 8 else zeros_low  # never all 8 by accident: keeps them asymmetric
        qw = ref.QuantizedWeight(qw.codes, qw.scales, qw.group_size, zeros)
    return qw


@st.composite
def act_orders(draw, K: int, group_size: int):
    """None or a random act-order permutation in GPTQ's canonical form (rows ascending within a group).

    Any permutation that keeps the same rows in each group is the same layer; import gives
    back this canonical one, the stable sort of g_idx (None when it is the identity).
    """
    if draw(st.booleans()):
        return None
    shuffled = np.random.default_rng(draw(seeds)).permutation(K)
    return act_order_permutation(group_index(K, group_size, shuffled), K, group_size)


def random_words(rng, shape):
    return rng.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)


def assert_same_weight(a: ref.QuantizedWeight, b: ref.QuantizedWeight):
    assert a.group_size == b.group_size
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales.view(np.uint16), b.scales.view(np.uint16))
    assert (a.zeros is None) == (b.zeros is None)
    if a.zeros is not None:
        np.testing.assert_array_equal(a.zeros, b.zeros)


# -- the bit layouts, read off by hand --------------------------------------------------------


def test_gptq_qweight_holds_row_8r_plus_i_in_bits_4i():
    codes = np.arange(16, dtype=np.uint8).reshape(16, 1) % 16
    qw = ref.QuantizedWeight(np.tile(codes, (8, 8)), np.ones((1, 8), np.float16), -1)
    words = export_gptq(qw, checkpoint_format="gptq_v2").qweight.view(np.uint32)
    assert words[0, 0] == 0x76543210 and words[1, 0] == 0xFEDCBA98


def test_gptq_qzeros_hold_column_8c_plus_j_in_bits_4j_minus_one_in_v1():
    zeros = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.uint8)
    qw = ref.QuantizedWeight(np.zeros((128, 8), np.uint8), np.ones((1, 8), np.float16), 128, zeros)
    assert export_gptq(qw, checkpoint_format="gptq").qzeros.view(np.uint32)[0, 0] == 0x76543210
    assert export_gptq(qw, checkpoint_format="gptq_v2").qzeros.view(np.uint32)[0, 0] == 0x87654321


def test_symmetric_gptq_v1_zeros_are_the_classic_0x77777777():
    qw = ref.QuantizedWeight(np.zeros((128, 8), np.uint8), np.ones((1, 8), np.float16), 128)
    assert export_gptq(qw).qzeros.view(np.uint32)[0, 0] == 0x77777777


def test_awq_nibble_j_holds_column_awq_order_j():
    words = np.array([[0x76543210]], dtype=np.uint32).view(np.int32)
    # nibble j holds the value j and belongs to column AWQ_NIBBLE_ORDER[j]
    np.testing.assert_array_equal(unpack_int4_along_n(words, AWQ_NIBBLE_ORDER)[0], [0, 4, 1, 5, 2, 6, 3, 7])
    assert AWQ_NIBBLE_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


@given(st.integers(1, 5), st.integers(1, 4), seeds)
def test_pack_along_n_round_trips_in_both_orders(R, C, seed):
    words = random_words(np.random.default_rng(seed), (R, C))
    for order in [tuple(range(8)), AWQ_NIBBLE_ORDER]:
        np.testing.assert_array_equal(pack_int4_along_n(unpack_int4_along_n(words, order), order), words)


# -- round trips ---------------------------------------------------------------------------------


@given(quantized(zeros_low=1), formats, st.data())
def test_gptq_import_of_export_is_identity(qw, fmt, data):
    perm = data.draw(act_orders(qw.K, qw.group_size))
    back, back_perm = import_gptq(**vars(export_gptq(qw, perm, checkpoint_format=fmt)), group_size=qw.group_size, checkpoint_format=fmt)
    assert_same_weight(back, qw)
    assert (back_perm is None) == (perm is None)
    if perm is not None:
        np.testing.assert_array_equal(back_perm, perm)


@given(quantized(zeros_low=1), seeds)
def test_any_order_inside_a_group_is_the_same_layer(qw, seed):
    perm = np.random.default_rng(seed).permutation(qw.K)  # not canonical: rows shuffled inside groups too
    back, back_perm = import_gptq(**vars(export_gptq(qw, perm)), group_size=qw.group_size)
    np.testing.assert_array_equal(dequantize_checkpoint_order(back, back_perm), dequantize_checkpoint_order(qw, perm))


@given(st.sampled_from([-1, 32, 64, 128]), st.integers(1, 4), st.integers(1, 4), formats, st.booleans(), seeds)
def test_gptq_export_of_import_is_bit_exact(g, k_blocks, c, fmt, act_order, seed):
    rng = np.random.default_rng(seed)
    K, N = 128 * k_blocks, 8 * c
    groups = 1 if g == -1 else K // g
    zeros = rng.integers(0 if fmt == "gptq_v2" else 1, 16, size=(groups, N), dtype=np.uint8)
    stored = zeros - np.uint8(1 if fmt == "gptq" else 0)
    g_idx = group_index(K, g, rng.permutation(K) if act_order else None)
    tensors = dict(
        qweight=random_words(rng, (K // 8, N)),
        qzeros=pack_int4_along_n(stored),
        scales=rng.standard_normal((groups, N)).astype(np.float16),
        g_idx=g_idx,
    )
    qw, perm = import_gptq(**tensors, group_size=g, checkpoint_format=fmt)
    out = export_gptq(qw, perm, checkpoint_format=fmt)
    for name, value in tensors.items():
        np.testing.assert_array_equal(getattr(out, name).view(np.uint8), value.view(np.uint8), err_msg=name)


@given(quantized())
def test_awq_import_of_export_is_identity(qw):
    assert_same_weight(import_awq(**vars(export_awq(qw)), group_size=qw.group_size), qw)


@given(st.sampled_from([-1, 32, 64, 128]), st.integers(1, 4), st.integers(1, 4), seeds)
def test_awq_export_of_import_is_bit_exact(g, k_blocks, c, seed):
    rng = np.random.default_rng(seed)
    K, N = 128 * k_blocks, 8 * c
    groups = 1 if g == -1 else K // g
    tensors = dict(
        qweight=random_words(rng, (K, N // 8)),
        qzeros=random_words(rng, (groups, N // 8)),
        scales=rng.standard_normal((groups, N)).astype(np.float16),
    )
    out = export_awq(import_awq(**tensors, group_size=g))
    for name, value in tensors.items():
        np.testing.assert_array_equal(getattr(out, name).view(np.uint8), value.view(np.uint8), err_msg=name)


# -- semantics: the formats' own dequantization rule -----------------------------------------------


def gptq_dequantize_like_its_torch_fallback(t, fmt: str) -> np.ndarray:
    """scales[g_idx] * (q - zeros[g_idx]) in the checkpoint's row order, written independently."""
    words = t.qweight.view(np.uint32)
    q = np.stack([(words >> (4 * i)) & 0xF for i in range(8)], axis=1).reshape(-1, words.shape[1])
    zwords = t.qzeros.view(np.uint32)
    z = np.stack([(zwords >> (4 * j)) & 0xF for j in range(8)], axis=2).reshape(zwords.shape[0], -1)
    z = z.astype(np.int64) + (1 if fmt == "gptq" else 0)
    diff = q.astype(np.float32) - z[t.g_idx].astype(np.float32)
    return (diff * t.scales[t.g_idx].astype(np.float32)).astype(np.float16)


def awq_dequantize_like_its_torch_fallback(t) -> np.ndarray:
    def unpack(words):
        words = words.view(np.uint32)
        nib = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=2)  # (R, C, nibble)
        cols = np.empty_like(nib)
        for j, col in enumerate(AWQ_NIBBLE_ORDER):
            cols[:, :, col] = nib[:, :, j]
        return cols.reshape(words.shape[0], -1).astype(np.int64)

    q, z = unpack(t.qweight), unpack(t.qzeros)
    rows = q.shape[0] // t.scales.shape[0]
    diff = (q - np.repeat(z, rows, axis=0)).astype(np.float32)
    return (diff * np.repeat(t.scales, rows, axis=0).astype(np.float32)).astype(np.float16)


@given(quantized(zeros_low=1), formats, st.data())
def test_gptq_tensors_mean_the_same_weight(qw, fmt, data):
    perm = data.draw(act_orders(qw.K, qw.group_size))
    t = export_gptq(qw, perm, checkpoint_format=fmt)
    np.testing.assert_array_equal(gptq_dequantize_like_its_torch_fallback(t, fmt), dequantize_checkpoint_order(qw, perm))


@given(quantized())
def test_awq_tensors_mean_the_same_weight(qw):
    np.testing.assert_array_equal(awq_dequantize_like_its_torch_fallback(export_awq(qw)), ref.dequantize(qw))


# -- act-order -------------------------------------------------------------------------------------


@given(quantized(), st.integers(1, 5), seeds)
def test_act_order_product_equals_the_checkpoint_order_product(qw, M, seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(qw.K)
    A = rng.standard_normal((M, qw.K)).astype(np.float16)
    W = dequantize_checkpoint_order(qw, perm)  # the layer as the checkpoint describes it
    np.testing.assert_array_equal(W[perm], ref.dequantize(qw))
    np.testing.assert_array_equal(act_order_gemm(A, qw, perm), ref.reference_gemm(A, W))


@given(st.sampled_from([32, 64, 128]), st.integers(1, 4), seeds)
def test_act_order_permutation_sorts_rows_into_contiguous_groups(g, k_blocks, seed):
    K = 128 * k_blocks
    g_idx = group_index(K, g, np.random.default_rng(seed).permutation(K))
    perm = act_order_permutation(g_idx, K, g)  # None when K holds a single group
    np.testing.assert_array_equal(g_idx[np.arange(K) if perm is None else perm], np.arange(K) // g)


def test_trivial_g_idx_means_no_permutation():
    assert act_order_permutation(np.arange(256) // 128, 256, 128) is None
    assert act_order_permutation(np.zeros(256, np.int32), 256, -1) is None


# -- errors ------------------------------------------------------------------------------------------


def test_unequal_groups_in_g_idx_are_rejected():
    g_idx = np.arange(256) // 128
    g_idx[0] = 1
    with pytest.raises(ValueError, match="exactly 128 rows"):
        act_order_permutation(g_idx, 256, 128)


def test_v1_cannot_store_zero_point_zero():
    qw = ref.QuantizedWeight(np.zeros((128, 8), np.uint8), np.ones((1, 8), np.float16), 128, np.zeros((1, 8), np.uint8))
    with pytest.raises(ValueError, match="cannot hold zero point 0; use 'gptq_v2'"):
        export_gptq(qw, checkpoint_format="gptq")


def test_v1_stored_fifteen_is_zero_sixteen_and_rejected():
    t = dict(
        qweight=np.zeros((16, 8), np.int32),
        qzeros=np.full((1, 1), -1, np.int32),
        scales=np.ones((1, 8), np.float16),
        group_size=-1,
    )
    with pytest.raises(ValueError, match="zero point 16"):
        import_gptq(**t)
    assert import_gptq(**t, checkpoint_format="gptq_v2")[0].zeros.max() == 15


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(qweight=np.zeros((16, 8), np.int64)), "qweight must be int32"),
        (dict(scales=np.ones((1, 8), np.float32)), "scales must be float16"),
        (dict(scales=np.ones((3, 8), np.float16)), r"scales has 3 rows, which no supported group size .* gives for K = 128"),
        (dict(scales=np.ones((3, 8), np.float16), group_size=64), "scales has 3 rows, expected K/group_size = 2"),
        (dict(qzeros=np.zeros((1, 2), np.int32)), "qzeros has 2 columns, expected N/8 = 1 for N = 8"),
        (dict(qzeros=np.zeros((2, 1), np.int32)), "qzeros has 2 rows, expected 1, one per group"),
        (dict(scales=np.ones((8, 8), np.float16)), "scales has 8 rows, which no supported group size"),
        (dict(scales=np.ones((1, 8), np.float16) * np.float16(np.nan)), "scales holds 8 non-finite values"),
        (dict(g_idx=np.arange(64)), "qweight has 16 rows, expected K/8 = 8 for K = 64"),
        (dict(qweight=np.zeros((10, 8), np.int32)), "qweight has 10 rows, expected K/8 = 16 for K = 128"),
        (dict(shape=(256, 8)), "g_idx has length 128, expected K = 256"),
        (dict(shape=(128, 16)), "qweight has 8 columns, expected N = 16"),
        (dict(group_size=48), "group_size 48 is not supported"),
        (dict(g_idx=None), "group_size is required here"),
        (dict(bits=8), "only 4-bit checkpoints are supported, this one has bits=8"),
    ],
)
def test_gptq_import_errors_are_one_sentence(change, message):
    t = dict(
        qweight=np.zeros((16, 8), np.int32),
        qzeros=np.zeros((1, 1), np.int32),
        scales=np.ones((1, 8), np.float16),
        g_idx=np.zeros(128, np.int32),
    )
    with pytest.raises((TypeError, ValueError), match=message):
        import_gptq(**{**t, **change})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(qweight=np.zeros((100, 2), np.int32)), "qweight has 100 rows, expected K = 128"),
        (dict(qweight=np.zeros((128, 1), np.int32)), "qweight has 1 columns, expected N/8 = 2 for N = 16"),
        (dict(scales=np.ones((2, 8), np.float16)), "scales has 8 columns, expected N = 16"),
        (dict(scales=np.full((2, 16), np.inf, np.float16)), "scales holds 32 non-finite values"),
        (dict(shape=None), "group_size is required here"),
        (dict(group_size=128), "scales has 2 rows, expected K/group_size = 1 for K = 128, group_size 128"),
    ],
)
def test_awq_import_errors_name_the_tensor_and_expected_shape(change, message):
    t = dict(
        qweight=np.zeros((128, 2), np.int32),
        qzeros=np.zeros((2, 2), np.int32),
        scales=np.ones((2, 16), np.float16),
        shape=(128, 16),
    )
    with pytest.raises((TypeError, ValueError), match=message):
        import_awq(**{**t, **change})


@pytest.mark.parametrize("groups, expected", [(1, -1), (2, 64), (4, 32)])
def test_group_size_is_inferred_when_the_shape_confirms_k(groups, expected):
    t = dict(qweight=np.zeros((128, 2), np.int32), qzeros=np.zeros((groups, 2), np.int32), scales=np.ones((groups, 16), np.float16))
    assert import_awq(**t, shape=(128, 16)).group_size == expected


def test_a_short_last_group_is_refused_clearly():
    with pytest.raises(ValueError, match="K = 160 is not a multiple of group_size 128: the checkpoint's last group would be short"):
        import_gptq(np.zeros((20, 8), np.int32), np.zeros((2, 1), np.int32), np.ones((2, 8), np.float16), group_size=128)


def test_unknown_checkpoint_format_is_rejected():
    with pytest.raises(ValueError, match="checkpoint_format 'gptq_v3' is not known"):
        import_gptq(np.zeros((16, 8), np.int32), np.zeros((1, 1), np.int32), np.ones((1, 8), np.float16), checkpoint_format="gptq_v3")
