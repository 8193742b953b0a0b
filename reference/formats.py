"""The checkpoint formats users bring, GPTQ and AWQ, read into and written from QuantizedWeight.

Both formats store the same thing we do -- 4-bit codes, fp16 scales per group along K and
4-bit zero points, with w = (q - z) * s -- but pack the nibbles differently:

GPTQ (AutoGPTQ, GPTQModel, vLLM's gptq loaders)
    qweight int32 [K/8, N]   eight codes along K: row 8r+i of column n in bits 4i..4i+3
    qzeros  int32 [G, N/8]   eight zero points along N: column 8c+j in bits 4j..4j+3
    scales  fp16  [G, N]
    g_idx   int32 [K]        the group of each row of K (act-order makes it a permutation)
    The classic format ("gptq", also called v1) stores z - 1 in qzeros; GPTQModel's
    "gptq_v2" stores z itself.
AWQ (AutoAWQ's GEMM layout)
    qweight int32 [K, N/8]   eight codes along N, column 8c+AWQ_ORDER[j] in bits 4j..4j+3
    qzeros  int32 [G, N/8]   the same nibble order; zero points stored as they are
    scales  fp16  [G, N]

Act-order (GPTQ's desc_act) quantizes rows in an order of decreasing activation size, so
the rows of one group are scattered through K and g_idx says which group each row is in.
We keep QuantizedWeight's contiguous groups and carry a permutation `perm` of K instead:
row i of the QuantizedWeight is row perm[i] of the checkpoint's weight, so with W the
checkpoint's (dequantized) weight, A @ W == A[:, perm] @ W[perm] exactly -- the product
only reorders the terms of each dot product. A kernel therefore multiplies the gathered
activations A[:, perm] by a weight with ordinary contiguous groups.

docs/torch_layer.md cites the packer sources these layouts were checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gemm import reference_gemm
from .packing import pack_int4_along_k, unpack_int4_along_k
from .quant import GROUP_SIZES, SYMMETRIC_ZERO, QuantizedWeight, check_group_size, dequantize

GPTQ_NIBBLE_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# What qzeros holds: the zero point minus this offset.
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


@dataclass(frozen=True)
class GPTQTensors:
    """The four tensors of one GPTQ linear layer, as NumPy arrays."""

    qweight: np.ndarray  # int32 [K/8, N]
    qzeros: np.ndarray  # int32 [G, N/8]
    scales: np.ndarray  # float16 [G, N]
    g_idx: np.ndarray  # int32 [K]


@dataclass(frozen=True)
class AWQTensors:
    """The three tensors of one AWQ (GEMM layout) linear layer, as NumPy arrays."""

    qweight: np.ndarray  # int32 [K, N/8]
    qzeros: np.ndarray  # int32 [G, N/8]
    scales: np.ndarray  # float16 [G, N]


# -- nibbles along N -------------------------------------------------------------------


def pack_int4_along_n(values: np.ndarray, order: tuple[int, ...] = GPTQ_NIBBLE_ORDER) -> np.ndarray:
    """uint8 (R, N) in 0..15 -> int32 (R, N/8): nibble j of word c holds column 8c + order[j].

    The same packing as reference.packing's along K, applied to the transpose after
    putting each group of 8 columns into nibble order.
    """
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] % 8:
        raise ValueError(f"values must be (R, N) with N divisible by 8, got shape {values.shape}")
    R, N = values.shape
    in_nibble_order = values.reshape(R, N // 8, 8)[:, :, list(order)].reshape(R, N)
    return np.ascontiguousarray(pack_int4_along_k(np.ascontiguousarray(in_nibble_order.T)).T)


def unpack_int4_along_n(words: np.ndarray, order: tuple[int, ...] = GPTQ_NIBBLE_ORDER) -> np.ndarray:
    """int32 (R, N/8) -> uint8 (R, N); the inverse of pack_int4_along_n with the same order."""
    in_nibble_order = unpack_int4_along_k(np.ascontiguousarray(np.asarray(words).T)).T
    R, N = in_nibble_order.shape
    values = np.empty((R, N // 8, 8), dtype=np.uint8)
    values[:, :, list(order)] = in_nibble_order.reshape(R, N // 8, 8)
    return values.reshape(R, N)


# -- act-order ---------------------------------------------------------------------------


def act_order_permutation(g_idx: np.ndarray, K: int, group_size: int) -> np.ndarray | None:
    """The permutation of K that makes g_idx's groups contiguous, or None if they already are.

    perm = the stable sort of the rows by group, so that row i of the permuted weight is
    row perm[i] of the checkpoint. Every group must hold exactly group_size rows (K rows
    for group_size -1), as GPTQ's act-order produces; anything else is rejected.
    """
    g_idx = np.asarray(g_idx)
    check_group_size(group_size, K)
    rows = K if group_size == -1 else group_size
    groups = K // rows
    if g_idx.shape != (K,) or not np.issubdtype(g_idx.dtype, np.integer):
        raise ValueError(f"g_idx must be an integer vector of length K={K}, got {g_idx.dtype} of shape {g_idx.shape}")
    if K and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise ValueError(f"g_idx values must lie in 0..{groups - 1} for K={K} and group_size {group_size}")
    if np.any(np.bincount(g_idx, minlength=groups) != rows):
        raise ValueError(f"every group in g_idx must hold exactly {rows} rows; this g_idx has groups of other sizes")
    perm = np.argsort(g_idx, kind="stable")
    return None if np.array_equal(perm, np.arange(K)) else perm


def group_index(K: int, group_size: int, perm: np.ndarray | None = None) -> np.ndarray:
    """GPTQ's g_idx (int32 [K]) for a weight whose rows were permuted by perm (None: identity)."""
    check_group_size(group_size, K)
    rows = K if group_size == -1 else group_size
    sorted_groups = (np.arange(K) // rows).astype(np.int32)
    if perm is None:
        return sorted_groups
    g_idx = np.empty(K, dtype=np.int32)
    g_idx[perm] = sorted_groups
    return g_idx


def check_permutation(perm: np.ndarray, K: int) -> None:
    """Raise ValueError unless perm is an integer permutation of 0..K-1."""
    perm = np.asarray(perm)
    if perm.shape != (K,) or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"perm must be an integer vector of length K={K}, got {perm.dtype} of shape {perm.shape}")
    if not np.array_equal(np.sort(perm), np.arange(K)):
        raise ValueError(f"perm must be a permutation of 0..{K - 1}")


def dequantize_checkpoint_order(qw: QuantizedWeight, perm: np.ndarray | None) -> np.ndarray:
    """The fp16 weight (K, N) with rows in the checkpoint's order: W[perm] == dequantize(qw)."""
    W = dequantize(qw)
    if perm is None:
        return W
    check_permutation(perm, qw.K)
    out = np.empty_like(W)
    out[perm] = W
    return out


def act_order_gemm(A: np.ndarray, qw: QuantizedWeight, perm: np.ndarray | None) -> np.ndarray:
    """The reference product of A with an act-order weight: reference_gemm(A[:, perm], qw)."""
    if perm is None:
        return reference_gemm(A, qw)
    check_permutation(perm, qw.K)
    return reference_gemm(np.asarray(A)[:, perm], qw)


# -- shared checks ---------------------------------------------------------------------------


def _check_int32(name: str, x: np.ndarray) -> None:
    if x.dtype != np.int32:
        raise TypeError(f"{name} must be int32 (the packed checkpoint words), got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {x.shape}")


def _check_rows(name: str, x: np.ndarray, rows: int, expected: str) -> None:
    """`expected` says where `rows` comes from, e.g. "K/8 = 32 for K = 256"."""
    if x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {expected}")


def _check_columns(name: str, x: np.ndarray, columns: int, expected: str) -> None:
    if x.shape[1] != columns:
        raise ValueError(f"{name} has {x.shape[1]} columns, expected {expected}")


def _groups(K: int, group_size: int) -> int:
    """Scale rows for K rows of weights, after checking that the group size fits K.

    GPTQ's g_idx = k // group_size would make the last group short when group_size does not
    divide K; QuantizedWeight's groups are all full, so such checkpoints are refused here."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; use one of {GROUP_SIZES}")
    if group_size != -1 and K % group_size:
        raise ValueError(
            f"K = {K} is not a multiple of group_size {group_size}: the checkpoint's last group would be short "
            f"({K % group_size} rows), which is not supported"
        )
    return 1 if group_size == -1 else K // group_size


def _infer_group_size(K: int, groups: int, K_confirmed: bool) -> int:
    """The group size that gives `groups` scale rows for K rows, when only one does.

    Only when K is known independently of qweight (the layer's shape, or GPTQ's g_idx):
    a truncated qweight with whole scales otherwise passes for a smaller layer with
    another group size."""
    if not K_confirmed:
        raise ValueError(
            "group_size is required here: nothing but qweight states K, so the group size cannot be inferred; "
            "pass group_size from the checkpoint's quantization config (or shape=(K, N) from the model)"
        )
    candidates = [g for g in GROUP_SIZES if g != -1 and K % g == 0 and K // g == groups]
    if groups == 1:  # one group of all K rows: group_size -1 (K itself, if listed, is the same weight)
        candidates = [-1]
    if len(candidates) != 1:
        raise ValueError(
            f"scales has {groups} rows, which no supported group size {GROUP_SIZES} gives for K = {K}; "
            "pass group_size from the checkpoint's quantization config"
        )
    return candidates[0]


def _check_bits(bits: int) -> None:
    if bits != 4:
        raise ValueError(f"only 4-bit checkpoints are supported, this one has bits={bits}")


def _check_scales(scales: np.ndarray, N: int) -> np.ndarray:
    scales = np.asarray(scales)
    if scales.dtype != np.float16:
        raise TypeError(f"scales must be float16, got {scales.dtype}")
    if scales.ndim != 2:
        raise ValueError(f"scales must be a 2-D (groups, N) matrix, got shape {scales.shape}")
    _check_columns("scales", scales, N, f"N = {N}")
    bad = int(np.count_nonzero(~np.isfinite(scales)))
    if bad:
        raise ValueError(f"scales holds {bad} non-finite values (NaN or inf); a checkpoint's scales must all be finite")
    return scales


def _layer_group_size(K: int, scales: np.ndarray, group_size: int | None, K_confirmed: bool) -> int:
    """The layer's group size (given or inferred), with scales checked against it."""
    if group_size is None:
        group_size = _infer_group_size(K, scales.shape[0], K_confirmed)
    groups = _groups(K, group_size)
    per_group = f"K/group_size = {groups} for K = {K}, group_size {group_size}" if group_size != -1 else "1 for group_size -1"
    _check_rows("scales", scales, groups, per_group)
    return group_size


def _zeros_or_symmetric(zeros: np.ndarray) -> np.ndarray | None:
    """None (symmetric) when every zero point is the implicit 8, else the zeros themselves."""
    return None if np.all(zeros == SYMMETRIC_ZERO) else zeros


def _layer_shape(shape: tuple[int, int] | None) -> tuple[int | None, int | None]:
    if shape is None:
        return None, None
    K, N = (int(d) for d in shape)
    if K < 1 or N < 1:
        raise ValueError(f"shape must be (K, N) with K, N >= 1, got {shape}")
    return K, N


# -- GPTQ ----------------------------------------------------------------------------------


def _check_checkpoint_format(checkpoint_format: str) -> int:
    if checkpoint_format not in GPTQ_ZERO_OFFSETS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r} is not known; use one of {tuple(GPTQ_ZERO_OFFSETS)}")
    return GPTQ_ZERO_OFFSETS[checkpoint_format]


def import_gptq(
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray | None = None,
    *,
    group_size: int | None = None,
    checkpoint_format: str = "gptq",
    bits: int = 4,
    shape: tuple[int, int] | None = None,
) -> tuple[QuantizedWeight, np.ndarray | None]:
    """A GPTQ layer as (QuantizedWeight with contiguous groups, act-order perm or None).

    checkpoint_format "gptq" (v1: what AutoGPTQ writes and what GPTQModel saves unless
    asked otherwise) stores zero - 1; "gptq_v2" stores the zero itself. `shape` is the
    layer's (K, N) = (in_features, out_features) where the caller knows it (from the
    model); every tensor is checked against it. group_size is inferred from the scales
    only when K is known apart from qweight (shape, or the length of g_idx); otherwise
    it is required. A weight whose zeros are all 8 comes back symmetric (zeros None), so
    symmetric-only kernels accept it. Pass bits and group_size from the checkpoint's
    quantization config: an 8-bit layer's shapes can look like a 4-bit layer's with twice
    the K, and only the config tells them apart.
    """
    _check_bits(bits)
    offset = _check_checkpoint_format(checkpoint_format)
    qweight, qzeros = np.asarray(qweight), np.asarray(qzeros)
    _check_int32("qweight", qweight)
    K, N = _layer_shape(shape)
    if g_idx is not None:
        g_idx = np.asarray(g_idx)
        if g_idx.ndim != 1:
            raise ValueError(f"g_idx must be a vector of length K, got shape {g_idx.shape}")
        if K is not None and g_idx.shape[0] != K:
            raise ValueError(f"g_idx has length {g_idx.shape[0]}, expected K = {K}")
    K_confirmed = K is not None or g_idx is not None
    K = K if K is not None else (g_idx.shape[0] if g_idx is not None else 8 * qweight.shape[0])
    N = N if N is not None else qweight.shape[1]
    if K % 8:
        raise ValueError(f"K = {K} is not a multiple of 8; GPTQ packs eight codes per int32 along K")
    if N % 8:
        raise ValueError(f"N = {N} is not a multiple of 8; GPTQ packs eight zero points per int32 along N")
    _check_rows("qweight", qweight, K // 8, f"K/8 = {K // 8} for K = {K}")
    _check_columns("qweight", qweight, N, f"N = {N}")
    scales = _check_scales(scales, N)
    group_size = _layer_group_size(K, scales, group_size, K_confirmed)
    _check_int32("qzeros", qzeros)
    _check_rows("qzeros", qzeros, scales.shape[0], f"{scales.shape[0]}, one per group as in scales")
    _check_columns("qzeros", qzeros, N // 8, f"N/8 = {N // 8} for N = {N}")
    codes = unpack_int4_along_k(qweight)
    zeros = unpack_int4_along_n(qzeros) + np.uint8(offset)
    if np.any(zeros > 15):
        raise ValueError(
            f"qzeros holds 15, which checkpoint_format {checkpoint_format!r} reads as zero point 16, outside 0..15; "
            "if the checkpoint stores zero points without the -1 offset, pass checkpoint_format='gptq_v2'"
        )
    perm = None if g_idx is None else act_order_permutation(g_idx, K, group_size)
    if perm is not None:
        codes = codes[perm]
    qw = QuantizedWeight(codes, scales.copy(), group_size, _zeros_or_symmetric(zeros))
    return qw, perm


def export_gptq(qw: QuantizedWeight, perm: np.ndarray | None = None, *, checkpoint_format: str = "gptq") -> GPTQTensors:
    """The GPTQ tensors of a weight (rows permuted by perm for act-order); inverse of import_gptq."""
    offset = _check_checkpoint_format(checkpoint_format)
    if qw.K % 8 or qw.N % 8:
        raise ValueError(f"GPTQ packs eight codes per word along K and along N; K={qw.K} and N={qw.N} must be divisible by 8")
    codes = qw.codes
    if perm is not None:
        check_permutation(perm, qw.K)
        codes = np.empty_like(qw.codes)
        codes[perm] = qw.codes
    zeros = qw.zeros_or_default()
    if offset and np.any(zeros < offset):
        raise ValueError(f"checkpoint_format {checkpoint_format!r} stores zero - 1 and cannot hold zero point 0; use 'gptq_v2'")
    return GPTQTensors(
        qweight=pack_int4_along_k(codes),
        qzeros=pack_int4_along_n(zeros - np.uint8(offset)),
        scales=qw.scales.copy(),
        g_idx=group_index(qw.K, qw.group_size, perm),
    )


# -- AWQ -----------------------------------------------------------------------------------


def import_awq(
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    *,
    group_size: int | None = None,
    bits: int = 4,
    shape: tuple[int, int] | None = None,
) -> QuantizedWeight:
    """An AWQ (GEMM layout) layer as a QuantizedWeight.

    `shape` and `group_size` as for import_gptq: with shape=(K, N) from the model the
    group size may be inferred from the scales; without it, pass the config's group_size.
    """
    _check_bits(bits)
    qweight, qzeros = np.asarray(qweight), np.asarray(qzeros)
    _check_int32("qweight", qweight)
    K, N = _layer_shape(shape)
    K_confirmed = K is not None
    K = K if K is not None else qweight.shape[0]
    N = N if N is not None else 8 * qweight.shape[1]
    if N % 8:
        raise ValueError(f"N = {N} is not a multiple of 8; AWQ packs eight codes per int32 along N")
    _check_rows("qweight", qweight, K, f"K = {K}")
    _check_columns("qweight", qweight, N // 8, f"N/8 = {N // 8} for N = {N}")
    scales = _check_scales(scales, N)
    group_size = _layer_group_size(K, scales, group_size, K_confirmed)
    _check_int32("qzeros", qzeros)
    _check_rows("qzeros", qzeros, scales.shape[0], f"{scales.shape[0]}, one per group as in scales")
    _check_columns("qzeros", qzeros, N // 8, f"N/8 = {N // 8} for N = {N}")
    codes = unpack_int4_along_n(qweight, AWQ_NIBBLE_ORDER)
    zeros = unpack_int4_along_n(qzeros, AWQ_NIBBLE_ORDER)
    return QuantizedWeight(codes, scales.copy(), group_size, _zeros_or_symmetric(zeros))


def export_awq(qw: QuantizedWeight) -> AWQTensors:
    """The AWQ (GEMM layout) tensors of a weight; inverse of import_awq."""
    if qw.N % 8:
        raise ValueError(f"AWQ packs eight codes per word along N; N={qw.N} must be divisible by 8")
    return AWQTensors(
        qweight=pack_int4_along_n(qw.codes, AWQ_NIBBLE_ORDER),
        qzeros=pack_int4_along_n(qw.zeros_or_default(), AWQ_NIBBLE_ORDER),
        scales=qw.scales.copy(),
    )
