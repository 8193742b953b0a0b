"""Rung 0: dequantize, then multiply, on the CPU with NumPy.

The executable specification. It unpacks the 4-bit codes, dequantizes them with the
reference's exact rule, fp16((q - z) * s) (bf16 for a weight with bf16 scales), and
hands those weights to an ordinary float32 matrix product. Every faster rung computes this same function; what they change
is only where the bytes live and how fast they move.

Error bound constant c = 4: one fp16 rounding of the result, one of the reference, and
float32 accumulation (K * 2**-24 <= 2 * 2**-11 for K <= 16384 in the worst case).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import QuantizedWeight, dequantize
from reference.packing import pack_int4_along_k, unpack_int4_along_k

from .step import SUPPORTED, Packed, Step, Support


def plain_int4_layout(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """The plain layout: codes packed eight per int32 along K, scales (and zeros) as given."""
    arrays = {"qweight": pack_int4_along_k(qw.codes), "scales": np.ascontiguousarray(qw.scales)}
    if qw.zeros is not None:
        arrays["zeros"] = np.ascontiguousarray(qw.zeros)
    return arrays


PLAIN_K_MULTIPLE = 8  # the plain layout packs eight codes per int32 along K


def plain_layout_support(K: int) -> Support:
    """The plain layout packs eight codes per int32 along K."""
    if K % PLAIN_K_MULTIPLE == 0:
        return SUPPORTED
    return Support(False, f"K={K} must be divisible by {PLAIN_K_MULTIPLE} (eight 4-bit codes per int32 word)")


def quantized_weight_from_plain(packed: Packed) -> QuantizedWeight:
    """Inverse of plain_int4_layout for host arrays."""
    a = packed.arrays
    return QuantizedWeight(unpack_int4_along_k(a["qweight"]), a["scales"], packed.group_size, a.get("zeros"))


class NumpyDequantMatmul(Step):
    name = "s0_numpy"
    title = "NumPy: dequantize, then matmul"
    idea = "The executable spec: unpack and dequantize every weight, then one float32 matrix product on the CPU."
    device = "cpu"
    error_c = 4.0
    supports_zero_points = True
    activation_dtypes = ("float16", "bfloat16")
    shape_multiples = ((PLAIN_K_MULTIPLE, 1),)

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        return plain_layout_support(K)

    def pack_host(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        return plain_int4_layout(qw)

    def _run(self, A: Any, packed: Packed, out: Any) -> None:
        W = dequantize(quantized_weight_from_plain(packed)).astype(np.float32)
        with np.errstate(over="ignore"):
            out[...] = A.astype(np.float32) @ W
