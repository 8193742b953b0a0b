"""The NumPy specification every rung of the ladder is checked against.

Readable before fast: quantization and dequantization (`quant`, with float16 or bfloat16
as the element type), the reference product and its error bound (`gemm`), 2:4 sparsity
(`sparse`), and CPU models of the layout tricks the fast kernels rely on.
"""

from .gemm import FP16_UNIT_ROUNDOFF, error_bound, error_excess, reference_gemm, unit_roundoff
from .quant import (
    ELEMENT_DTYPES,
    GROUP_SIZES,
    QuantizedWeight,
    check_group_size,
    dequantize,
    element_dtype,
    expand_groups,
    group_rows,
    quantize,
    random_quantized_weight,
    round_to_element,
)
from .sparse import compress_2_4, decompress_2_4, is_2_4, keep_mask_2_4, prune_2_4

__all__ = [
    "ELEMENT_DTYPES",
    "FP16_UNIT_ROUNDOFF",
    "GROUP_SIZES",
    "QuantizedWeight",
    "check_group_size",
    "compress_2_4",
    "decompress_2_4",
    "dequantize",
    "element_dtype",
    "error_bound",
    "error_excess",
    "expand_groups",
    "group_rows",
    "is_2_4",
    "keep_mask_2_4",
    "prune_2_4",
    "quantize",
    "random_quantized_weight",
    "reference_gemm",
    "round_to_element",
    "unit_roundoff",
]
