"""Round-to-nearest 4-bit weight quantization with fp16 or bf16 scales per group along K.

A weight matrix W (K x N, K the reduction dimension) is cut along K into groups of
`group_size` rows (or one group per column when group_size is -1). Each group of each
column gets one scale `s` of the element type (float16 or bfloat16) and, for asymmetric
quantization, one zero point `z`; each weight becomes a 4-bit code `q` in 0..15 with

    w ~ (q - z) * s          (z = 8 for symmetric quantization)

`dequantize` defines, bit for bit, the weight every kernel multiplies with, in the scales'
element type: the difference q - z is a small integer, exact in any float format, and the
product with the scale is rounded once to the element type -- exactly what `__hmul` /
`__hmul2` do on the GPU, for fp16 and for bf16 alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
ELEMENT_DTYPES = (FLOAT16, BFLOAT16)
GROUP_SIZES = (-1, 32, 64, 128)
SYMMETRIC_ZERO = 8

# Significand bits (the implicit leading one included) and the exponent of the subnormal
# spacing, i.e. of the last place of the smallest values.
_FORMATS = {FLOAT16: (11, -24), BFLOAT16: (8, -133)}


def element_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """float16 or bfloat16 as a NumPy dtype, from a dtype, a scalar type or a name."""
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved not in ELEMENT_DTYPES:
        got = str(dtype) if resolved is None else resolved.name
        raise TypeError(f"the element type must be float16 or bfloat16, got {got}")
    return resolved


def round_to_element(x: npt.ArrayLike, dtype: npt.DTypeLike) -> np.ndarray:
    """x rounded once, to nearest with ties to even, to the element type `dtype`.

    NumPy casts float64 to float16 directly, but ml_dtypes casts float64 to bfloat16 through
    float32, and rounding twice is wrong at rare near-ties (1 + 2**-8 + 2**-30 becomes 1, not
    1 + 2**-7). So the rounding happens here, in float64 where each step is exact: scale x by
    a power of two so the element type's last place at x is 1, rint (ties to even), scale
    back. The result is representable (or beyond the largest finite value, giving inf), so
    the final cast is exact.
    """
    dtype = element_dtype(dtype)
    bits, subnormal_exponent = _FORMATS[dtype]
    x = np.asarray(x, dtype=np.float64)
    _, exponent = np.frexp(x)  # |x| in [2**(exponent-1), 2**exponent)
    last_place = np.maximum(exponent - bits, subnormal_exponent)
    rounded = np.ldexp(np.rint(np.ldexp(x, -last_place)), last_place)
    with np.errstate(over="ignore"):
        return rounded.astype(dtype)


def _round_up_to_element(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The least value of the element type not below x (float64)."""
    nearest = round_to_element(x, dtype)
    return np.where(nearest.astype(np.float64) < x, np.nextafter(nearest, dtype.type(np.inf)), nearest)


@dataclass(frozen=True)
class QuantizedWeight:
    """Plain (unpermuted) 4-bit codes with their per-group scales and zero points."""

    codes: np.ndarray  # uint8 (K, N), values 0..15
    scales: np.ndarray  # float16 or bfloat16 (K // group_size, N), or (1, N) for group_size -1
    group_size: int
    zeros: np.ndarray | None = None  # uint8 like scales; None means symmetric (zero 8)

    def __post_init__(self) -> None:
        """Check every field once, here, so that no rung, importer or reference function meets
        a weight that means something other than what it says (see `_check_weight`)."""
        codes, zeros = _check_weight(self.codes, self.scales, self.group_size, self.zeros)
        object.__setattr__(self, "codes", codes)  # uint8, whatever unsigned type held the values
        object.__setattr__(self, "zeros", zeros)

    @property
    def dtype(self) -> np.dtype:
        """The element type: the scales' dtype, which the dequantized weights share."""
        return np.asarray(self.scales).dtype

    @property
    def K(self) -> int:
        return self.codes.shape[0]

    @property
    def N(self) -> int:
        return self.codes.shape[1]

    @property
    def group_rows(self) -> int:
        """Rows of K that share one scale (K itself for group_size -1)."""
        return group_rows(self.group_size, self.K)

    def zeros_or_default(self) -> np.ndarray:
        if self.zeros is not None:
            return self.zeros
        return np.full(self.scales.shape, SYMMETRIC_ZERO, dtype=np.uint8)


def group_rows(group_size: int, K: int) -> int:
    """Rows of K that share one scale: the group size, where -1 means one group of all K rows.

    The one place -1 is given its meaning; everything else (rungs and CPU models) asks here
    or passes -1 on unchanged (the CUDA kernels' GROUP_SIZE define)."""
    return K if group_size == -1 else group_size


def _field(name: str) -> str:
    return f"QuantizedWeight.{name}"


def _check_codes_array(name: str, x: Any, shape: tuple[int, int] | None) -> np.ndarray:
    """A 2-D array of unsigned integers 0..15 (codes or zero points), returned as uint8."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{_field(name)} must be a NumPy array of unsigned integers 0..15, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.unsignedinteger):
        raise TypeError(
            f"{_field(name)} must have an unsigned integer dtype (uint8 values 0..15), got {x.dtype}; "
            "a signed or floating code has no single meaning (is -1 the code 15?), so convert it explicitly"
        )
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{_field(name)} must be a non-empty 2-D array, got shape {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{_field(name)} must have shape {shape} like the scales, got {x.shape}")
    top = int(x.max())
    if top > 15:
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(x)), x.shape))
        raise ValueError(f"{_field(name)} must lie in 0..15 (4 bits), got {top} at {where}")
    return x if x.dtype == np.uint8 else x.astype(np.uint8)


def _check_weight(codes: Any, scales: Any, group_size: Any, zeros: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Raise a one-sentence TypeError/ValueError naming the field unless the four fields form
    a weight: codes (K, N) unsigned 0..15; group_size -1 or a positive divisor of K; scales
    (groups, N) float16 or bfloat16, finite, and non-zero wherever a code differs from its zero
    point; zeros None or like the scales, unsigned 0..15. Returns codes and zeros as uint8."""
    codes = _check_codes_array("codes", codes, None)
    K, N = codes.shape
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool):
        raise TypeError(f"{_field('group_size')} must be an int (-1 or a divisor of K={K}), got {group_size!r}")
    group_size = int(group_size)
    if group_size != -1 and (group_size <= 0 or K % group_size):
        raise ValueError(f"{_field('group_size')} must be -1 or a positive divisor of K={K}, got {group_size}")
    if not isinstance(scales, np.ndarray):
        raise TypeError(f"{_field('scales')} must be a NumPy array of float16 or bfloat16, got {type(scales).__name__}")
    if scales.dtype not in ELEMENT_DTYPES:
        raise TypeError(f"{_field('scales')} must be float16 or bfloat16, got {scales.dtype}")
    groups = K // group_rows(group_size, K)
    if scales.shape != (groups, N):
        raise ValueError(
            f"{_field('scales')} must have shape (groups, N) = ({groups}, {N}) for K={K}, N={N} and group_size "
            f"{group_size}, got {scales.shape}"
        )
    wide = scales.astype(np.float32)
    finite = np.isfinite(wide)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"{_field('scales')} must be finite, got {scales[where]} at (group, column) {where}")
    if zeros is not None:
        zeros = _check_codes_array("zeros", zeros, (groups, N))
    if not wide.all():  # a zero scale is only meaningful for a group whose codes all sit at the zero point
        zero_points = np.full((groups, N), SYMMETRIC_ZERO, np.uint8) if zeros is None else zeros
        used = (codes.reshape(groups, K // groups, N) != zero_points[:, None, :]).any(axis=1)
        if (used & (wide == 0)).any():
            where = tuple(int(i) for i in np.argwhere(used & (wide == 0))[0])
            raise ValueError(
                f"{_field('scales')} is 0 at (group, column) {where}, where codes differ from the zero point; "
                "a used scale must be non-zero"
            )
    return codes, zeros


def check_group_size(group_size: int, K: int) -> None:
    """Raise ValueError unless `group_size` is one we support and divides K."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size} is not supported; use one of {GROUP_SIZES}")
    if group_size != -1 and K % group_size:
        raise ValueError(f"K={K} is not divisible by group_size {group_size}")


def quantize(
    W: np.ndarray, group_size: int = 128, symmetric: bool = True, dtype: npt.DTypeLike = np.float16
) -> QuantizedWeight:
    """Quantize W (K x N, any float dtype) to 4-bit codes, round to nearest.

    Symmetric: s = max|w| / 7 so every weight maps to a code in 1..15 without clipping.
    Asymmetric: s = (max - min) / 15 and z = round(-min / s), clipped to 0..15.
    The scale is rounded up to `dtype` (float16 or bfloat16) and the codes are computed
    against that rounded scale, so |w - dequantize(w)| <= s/2 up to the final rounding of
    the dequantized value to `dtype`.
    """
    dtype = element_dtype(dtype)
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (K, N) matrix, got shape {W.shape}")
    if not (np.issubdtype(W.dtype, np.floating) or np.issubdtype(W.dtype, np.integer)) and W.dtype not in ELEMENT_DTYPES:
        raise TypeError(f"W must hold real numbers (a float or integer dtype), got {W.dtype}")
    K, N = W.shape
    check_group_size(group_size, K)
    finite = np.isfinite(W.astype(np.float64, copy=False))
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"W must be finite to be quantized, got {W[where]} at (k, n) {where}")
    g = group_rows(group_size, K)
    Wg = W.astype(np.float64).reshape(K // g, g, N)
    if symmetric:
        s = np.abs(Wg).max(axis=1) / 7.0
    else:
        lo, hi = np.minimum(Wg.min(axis=1), 0.0), np.maximum(Wg.max(axis=1), 0.0)
        s = (hi - lo) / 15.0
    # Round the scale up, never down, so 15 (or 7) steps still span the range.
    scales = _round_up_to_element(s, dtype)
    scales[scales == 0] = 1  # an all-zero group: any scale reproduces it
    sf = scales.astype(np.float64)
    sf[~np.isfinite(sf)] = math.inf  # an overflowing scale is refused below
    if symmetric:
        z = np.full(scales.shape, SYMMETRIC_ZERO, dtype=np.float64)
    else:
        z = np.clip(np.rint(-lo / sf), 0, 15)
    q = np.clip(np.rint(Wg / sf[:, None, :]) + z[:, None, :], 0, 15)
    # Refuse rather than clamp: a clamped scale would change every weight of its group, silently.
    top = float(np.abs((q - z[:, None, :]) * sf[:, None, :]).max()) if np.isfinite(sf).all() else math.inf
    largest = float(ml_dtypes.finfo(dtype).max)
    if not np.isfinite(round_to_element(top, dtype)):  # the dequantized weight rounds to inf
        raise ValueError(
            f"W has values up to {float(np.abs(Wg).max()):.6g} in magnitude, beyond what 4-bit codes times {dtype.name} "
            f"scales reach without overflowing {dtype.name} (largest finite value {largest:.6g}); "
            "scale the weights down or quantize with dtype=bfloat16"
        )
    return QuantizedWeight(
        codes=q.astype(np.uint8).reshape(K, N),
        scales=scales,
        group_size=group_size,
        zeros=None if symmetric else z.astype(np.uint8),
    )


def expand_groups(per_group: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    """Repeat a (groups, N) array along K so it lines up with the (K, N) codes."""
    return np.repeat(per_group, qw.group_rows, axis=0)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The weights (K x N) every kernel computes with, in qw.dtype: (q - z) * s rounded once.

    q - z is an integer in -15..15 and s has at most 11 significant bits, so their float32
    product is exact (for subnormal scales too) and the cast to qw.dtype is the one rounding.
    """
    diff = qw.codes.astype(np.float32) - expand_groups(qw.zeros_or_default(), qw).astype(np.float32)
    with np.errstate(over="ignore"):  # beyond float32's range is beyond bf16's too: inf either way
        return (diff * expand_groups(qw.scales, qw).astype(np.float32)).astype(qw.dtype)


def random_quantized_weight(
    rng: np.random.Generator,
    K: int,
    N: int,
    group_size: int = 128,
    symmetric: bool = True,
    dtype: npt.DTypeLike = np.float16,
    centered: bool = False,
) -> QuantizedWeight:
    """Random codes and scales, drawn directly (fast at any size), scaled like a real layer.

    Codes are uniform in 0..15, so that tests meet every code equally often; scales are
    uniform in [0.5, 1.5) / (spread sqrt(K)), rounded to `dtype`, so entries of A @ W stay
    near unit size for unit-size A. Asymmetric weights get random zero points.

    Uniform codes about the zero point 8 have mean value -0.5: every column shares a
    component along the all-ones input, which a deep model of such layers adds up block
    after block (Llama-2-70B dims overflow FP16 by 32 layers). `centered` draws symmetric
    weights the way a real layer's look instead: a rounded normal about 8 (sd 2.5 codes)
    clipped symmetrically to 1..15, mean value zero.
    """
    dtype = element_dtype(dtype)
    check_group_size(group_size, K)
    if centered and not symmetric:
        raise ValueError("centered codes are drawn about the symmetric zero point 8; pass symmetric=True with centered=True")
    groups = K // group_rows(group_size, K)
    if centered:
        spread = 2.5
        codes = np.clip(np.rint(8.0 + spread * rng.standard_normal((K, N), dtype=np.float32)), 1, 15).astype(np.uint8)
    else:
        spread = 4.0
        codes = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
    scales = ((0.5 + rng.random((groups, N), dtype=np.float32)) / (spread * np.sqrt(K))).astype(dtype)
    zeros = None if symmetric else rng.integers(0, 16, size=(groups, N), dtype=np.uint8)
    return QuantizedWeight(codes=codes, scales=scales, group_size=group_size, zeros=zeros)
