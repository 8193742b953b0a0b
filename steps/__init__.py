"""marlin-ladder: FP16 x INT4 matrix multiplication, one idea per rung.

`STEPS` is the ordered ladder, `get(name)` finds a rung, and every rung is a `Step`:
`packed = step.pack(quantized_weight)`, then `C = step(A, packed)`.
"""

from .registry import STEPS, get
from .step import Packed, Step, Support

__all__ = ["STEPS", "Packed", "Step", "Support", "get"]
