"""The s1 kernel itself, in its own module so that importing the ladder does not import
Numba, and so that Numba's CUDA simulator can swap `cuda` in this module's globals."""

import numpy as np

# numba-cuda 0.30 registers an overload for np.row_stack when it compiles its first
# kernel; NumPy 2.5 removed that function (it was an alias of np.vstack since NumPy 1.0,
# deprecated in 2.0), so the first compilation fails with "module 'numpy' has no
# attribute 'row_stack'". Restoring the alias, only where it is missing, is enough.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

from numba import cuda, float32, int32  # noqa: E402  (after the NumPy alias above)


@cuda.jit
def naive_int4_gemm(A, qweight, scales, C, group_rows):
    n, m = cuda.grid(2)
    if m >= C.shape[0] or n >= C.shape[1]:
        return
    acc = float32(0.0)
    for k in range(A.shape[1]):
        word = int32(qweight[k // 8, n])
        code = (word >> (4 * (k % 8))) & 0xF
        w = float32(code - 8) * float32(scales[k // group_rows, n])
        acc += float32(A[m, k]) * w
    C[m, n] = acc
