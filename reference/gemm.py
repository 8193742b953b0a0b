"""The reference product and the error bound every rung is held to.

`reference_gemm` multiplies the exact fp16 activations by the exact fp16 dequantized
weights in float64 and rounds once to fp16: the answer a kernel would give with
infinitely precise accumulation. A real kernel accumulates in fp32 (some rungs also
round partial sums to fp16 on the way), so it may differ; `error_bound` says by how much
it may differ, elementwise, in the standard forward-error form for dot products:

    |C - C_ref| <= c * u * (|A| @ |W|) + 2**-24

with u = 2**-11 the unit roundoff of fp16 and c a small constant that each rung
documents (it counts the roundings to fp16 on the way to the output: the rounding of
the result, the reference's own rounding, and any fp16 partial sums or scale products).
The 2**-24 term is the spacing of fp16 subnormals, below which rounding is absolute
rather than relative. The bound uses |A| @ |W|, not |C|: cancellation in a dot product
can make |C| tiny while the rounding errors stay the size of the summands.
"""

from __future__ import annotations

import numpy as np

from .quant import QuantizedWeight, dequantize

FP16_UNIT_ROUNDOFF = 2.0**-11
FP16_SUBNORMAL_SPACING = 2.0**-24


def weights_fp16(W: QuantizedWeight | np.ndarray) -> np.ndarray:
    """Accept either a QuantizedWeight or an already dequantized fp16 (K, N) matrix."""
    return dequantize(W) if isinstance(W, QuantizedWeight) else np.asarray(W, dtype=np.float16)


def reference_gemm(A: np.ndarray, W: QuantizedWeight | np.ndarray) -> np.ndarray:
    """C = fp16(A @ W) with float64 accumulation of the exact fp16 inputs."""
    A = np.asarray(A)
    if A.dtype != np.float16:
        raise TypeError(f"A must be float16, got {A.dtype}")
    Wd = weights_fp16(W)
    with np.errstate(over="ignore"):
        return (A.astype(np.float64) @ Wd.astype(np.float64)).astype(np.float16)


def error_bound(A: np.ndarray, W: QuantizedWeight | np.ndarray, c: float) -> np.ndarray:
    """Elementwise bound c * u * (|A| @ |W|) + 2**-24 on |C - reference_gemm(A, W)|."""
    Wd = weights_fp16(W)
    magnitude = np.abs(A.astype(np.float64)) @ np.abs(Wd.astype(np.float64))
    return c * FP16_UNIT_ROUNDOFF * magnitude + FP16_SUBNORMAL_SPACING


def error_excess(C: np.ndarray, A: np.ndarray, W: QuantizedWeight | np.ndarray, c: float) -> float:
    """How far C is from satisfying the bound: max(|C - C_ref| / bound); <= 1 passes, NaN fails.

    Any NaN or inf in C (an unwritten, poisoned or overflowed output) gives inf.
    """
    C = np.asarray(C, dtype=np.float64)
    ref = reference_gemm(A, W).astype(np.float64)
    if C.shape != ref.shape:
        raise ValueError(f"C has shape {C.shape}, the reference has {ref.shape}")
    if C.size == 0:
        return 0.0
    if not np.all(np.isfinite(C)):
        return float("inf")
    return float(np.max(np.abs(C - ref) / error_bound(A, W, c)))
