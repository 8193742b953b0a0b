"""Round-to-nearest 4-bit weight quantization with fp16 scales per group along K.

A weight matrix W (K x N, K the reduction dimension) is cut along K into groups of
`group_size` rows (or one group per column when group_size is -1). Each group of each
column gets one fp16 scale `s` and, for asymmetric quantization, one zero point `z`;
each weight becomes a 4-bit code `q` in 0..15 with

    w ~ (q - z) * s          (z = 8 for symmetric quantization)

`dequantize` defines, bit for bit, the fp16 weight every kernel multiplies with: the
difference q - z is a small integer, exact in any float format, and the product with the
fp16 scale is rounded once to fp16 -- exactly what `__hmul` / `__hmul2` do on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_SIZES = (-1, 32, 64, 128)
SYMMETRIC_ZERO = 8


@dataclass(frozen=True)
class QuantizedWeight:
    """Plain (unpermuted) 4-bit codes with their per-group scales and zero points."""

    codes: np.ndarray  # uint8 (K, N), values 0..15
    scales: np.ndarray  # float16 (K // group_size, N), or (1, N) for group_size -1
    group_size: int
    zeros: np.ndarray | None = None  # uint8 like scales; None means symmetric (zero 8)

    @property
    def K(self) -> int:
        return self.codes.shape[0]

    @property
    def N(self) -> int:
        return self.codes.shape[1]

    @property
    def group_rows(self) -> int:
        """Rows of K that share one scale (K itself for group_size -1)."""
        return self.K if self.group_size == -1 else self.group_size

    def zeros_or_default(self) -> np.ndarray:
        if self.zeros is not None:
            return self.zeros
        return np.full(self.scales.shape, SYMMETRIC_ZERO, dtype=np.uint8)


def check_group_size(group_size: int, K: int) -> None:
    """Raise ValueError unless `group_size` is one we support and divides K."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; use one of {GROUP_SIZES}")
    if group_size != -1 and K % group_size:
        raise ValueError(f"K={K} is not divisible by group_size {group_size}")


def quantize(W: np.ndarray, group_size: int = 128, symmetric: bool = True) -> QuantizedWeight:
    """Quantize W (K x N, any float dtype) to 4-bit codes, round to nearest.

    Symmetric: s = max|w| / 7 so every weight maps to a code in 1..15 without clipping.
    Asymmetric: s = (max - min) / 15 and z = round(-min / s), clipped to 0..15.
    The scale is rounded up to fp16 and the codes are computed against that rounded
    scale, so |w - dequantize(w)| <= s/2 up to the final fp16 rounding of the
    dequantized value.
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (K, N) matrix, got shape {W.shape}")
    K, N = W.shape
    check_group_size(group_size, K)
    g = K if group_size == -1 else group_size
    Wg = W.astype(np.float64).reshape(K // g, g, N)
    if symmetric:
        s = np.abs(Wg).max(axis=1) / 7.0
    else:
        lo, hi = np.minimum(Wg.min(axis=1), 0.0), np.maximum(Wg.max(axis=1), 0.0)
        s = (hi - lo) / 15.0
    # Round the scale up to fp16, never down, so 15 (or 7) steps still span the range.
    s16 = s.astype(np.float16)
    s16 = np.where(s16.astype(np.float64) < s, np.nextafter(s16, np.float16(np.inf)), s16)
    s16[s16 == 0] = np.float16(1.0)  # an all-zero group: any scale reproduces it
    sf = s16.astype(np.float64)[:, None, :]
    if symmetric:
        z = np.full(s16.shape, SYMMETRIC_ZERO, dtype=np.float64)
    else:
        z = np.clip(np.rint(-lo / s16.astype(np.float64)), 0, 15)
    q = np.clip(np.rint(Wg / sf) + z[:, None, :], 0, 15).astype(np.uint8)
    return QuantizedWeight(
        codes=q.reshape(K, N),
        scales=s16,
        group_size=group_size,
        zeros=None if symmetric else z.astype(np.uint8),
    )


def expand_groups(per_group: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    """Repeat a (groups, N) array along K so it lines up with the (K, N) codes."""
    return np.repeat(per_group, qw.group_rows, axis=0)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The fp16 weights (K x N) every kernel computes with: fp16((q - z) * s)."""
    diff = qw.codes.astype(np.float32) - expand_groups(qw.zeros_or_default(), qw).astype(np.float32)
    return (diff * expand_groups(qw.scales, qw).astype(np.float32)).astype(np.float16)


def random_quantized_weight(
    rng: np.random.Generator, K: int, N: int, group_size: int = 128, symmetric: bool = True
) -> QuantizedWeight:
    """Random codes and scales, drawn directly (fast at any size), scaled like a real layer.

    Codes are uniform in 0..15; scales uniform in [0.5, 1.5) / (4 sqrt(K)), so entries of
    A @ W stay near unit size for unit-size A. Asymmetric weights get random zero points.
    """
    check_group_size(group_size, K)
    groups = 1 if group_size == -1 else K // group_size
    codes = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
    scales = ((0.5 + rng.random((groups, N), dtype=np.float32)) / (4.0 * np.sqrt(K))).astype(np.float16)
    zeros = None if symmetric else rng.integers(0, 16, size=(groups, N), dtype=np.uint8)
    return QuantizedWeight(codes=codes, scales=scales, group_size=group_size, zeros=zeros)
