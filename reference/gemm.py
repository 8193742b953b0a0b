"""The reference product and the error bound every rung is held to.

`reference_gemm` multiplies the exact activations by the exact dequantized weights in
float64 and rounds once to the element type, float16 or bfloat16 (A's dtype, which the
weights must share): the answer a kernel would give with infinitely precise accumulation.
A real kernel accumulates in fp32 (some rungs also round partial sums to the element type
on the way), so it may differ; `error_bound` says by how much it may differ, elementwise,
in the standard forward-error form for dot products:

    |C - C_ref| <= c * u * (|A| @ |W|) + eta

with u the unit roundoff of the element type (`unit_roundoff`: 2**-11 for fp16, 2**-8
for bf16) and c a small constant that each rung documents (it counts the roundings to the
element type on the way to the output: the rounding of the result, the reference's own
rounding, and any partial sums or scale products in the element type). eta is the spacing
of the element type's subnormals (2**-24 for fp16, 2**-133 for bf16), below which rounding
is absolute rather than relative. The bound uses |A| @ |W|, not |C|: cancellation in a
dot product can make |C| tiny while the rounding errors stay the size of the summands.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .quant import BFLOAT16, ELEMENT_DTYPES, FLOAT16, QuantizedWeight, dequantize, element_dtype, round_to_element

FP16_UNIT_ROUNDOFF = 2.0**-11
BF16_UNIT_ROUNDOFF = 2.0**-8
# u = 2**-p for p significand bits (the implicit one included), and the subnormal spacing.
_ROUNDING = {FLOAT16: (FP16_UNIT_ROUNDOFF, 2.0**-24), BFLOAT16: (BF16_UNIT_ROUNDOFF, 2.0**-133)}


def unit_roundoff(dtype: npt.DTypeLike) -> float:
    """The relative error bound of one rounding to the element type: 2**-11 fp16, 2**-8 bf16."""
    return _ROUNDING[element_dtype(dtype)][0]


def dequantized_weights(W: QuantizedWeight | np.ndarray) -> np.ndarray:
    """Accept either a QuantizedWeight or an already dequantized (K, N) matrix."""
    return dequantize(W) if isinstance(W, QuantizedWeight) else np.asarray(W)


def _operands(A: np.ndarray, W: QuantizedWeight | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A and the dequantized W, checked to share one element type."""
    A = np.asarray(A)
    if A.dtype not in ELEMENT_DTYPES:
        raise TypeError(f"A must be float16 or bfloat16, got {A.dtype}")
    Wd = dequantized_weights(W)
    if Wd.dtype != A.dtype:
        raise TypeError(f"A is {A.dtype} but W is {Wd.dtype}; they must share one element type")
    return A, Wd


def reference_gemm(A: np.ndarray, W: QuantizedWeight | np.ndarray) -> np.ndarray:
    """C = A @ W with float64 accumulation of the exact inputs, rounded once to A's dtype."""
    A, Wd = _operands(A, W)
    return round_to_element(A.astype(np.float64) @ Wd.astype(np.float64), A.dtype)


def error_bound(A: np.ndarray, W: QuantizedWeight | np.ndarray, c: float) -> np.ndarray:
    """Elementwise bound c * u * (|A| @ |W|) + eta on |C - reference_gemm(A, W)|, u and eta of A's dtype."""
    A, Wd = _operands(A, W)
    u, subnormal_spacing = _ROUNDING[A.dtype]
    magnitude = np.abs(A.astype(np.float64)) @ np.abs(Wd.astype(np.float64))
    return c * u * magnitude + subnormal_spacing


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
