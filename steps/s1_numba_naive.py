"""Rung 1: the first GPU kernel, written in Python with Numba CUDA.

One thread computes one output element C[m, n]: it walks down column n of the packed
weights, pulls each 4-bit code out of its int32 word, dequantizes it with its group's
scale and accumulates a * w in float32. Consecutive threads of a warp take consecutive
columns, so each load of a weight word is coalesced across the warp. Nothing is reused
between threads: every thread re-reads its whole row of A and every word of weights is
read by M threads, so the kernel is bound by load instructions long before it reaches
the memory bandwidth. The rungs above fix exactly that.

On a machine without a GPU the same kernel runs under Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1): slowly, on NumPy arrays, but it is the same code path.
Error bound constant c = 4, as for s0 (the product (q - 8) * s is kept in float32,
which is at least as accurate as the reference's fp16 weight).
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from typing import Any

from reference import QuantizedWeight, group_rows

from ._arrays import array_kind, caller_stream
from .s0_numpy import PLAIN_K_MULTIPLE, plain_int4_layout, plain_layout_support
from .step import SUPPORTED, Packed, Step, Support

THREADS_PER_BLOCK = 128
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SIMULATOR_HINT = "NUMBA_ENABLE_CUDASIM=1 runs it on the CPU under Numba's CUDA simulator (slowly)"
# The simulator runs a launch by swapping the kernel module's `cuda` global for a fake one
# and restoring it afterwards, so two launches from different threads would tear each
# other's swap down: simulated launches take turns. Real launches need no lock.
_SIMULATOR_LOCK = threading.Lock()


def _kernel():
    from ._s1_kernel import naive_int4_gemm

    return naive_int4_gemm


def _device_view(x: Any) -> Any:
    """A Numba device array over CuPy / torch memory, without copying or syncing."""
    from numba import cuda

    if array_kind(x) == "numpy":  # the CUDA simulator works on host arrays
        return x
    return cuda.from_cuda_array_interface(x.__cuda_array_interface__, owner=x, sync=False)


def _launch_stream(x: Any) -> Any:
    from numba import cuda

    if SIMULATED:
        return 0
    if array_kind(x) == "torch":
        import torch

        return cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)
    import cupy

    return cuda.external_stream(cupy.cuda.get_current_stream().ptr)


class NumbaNaive(Step):
    name = "s1_numba_naive"
    title = "Numba CUDA: one thread per output"
    idea = "Move to the GPU: one thread per output element dequantizes its column of weights on the fly."
    device = "cuda"
    error_c = 4.0
    shape_multiples = ((PLAIN_K_MULTIPLE, 1),)

    @property
    def host_arrays(self) -> bool:
        return SIMULATED

    def available(self) -> Support:
        try:
            from numba import cuda
        except ImportError as e:
            return Support(False, f"needs numba and numba-cuda ({e})")
        if SIMULATED:
            return SUPPORTED
        try:
            usable = cuda.is_available()
        except Exception as e:  # a missing or broken driver
            return Support(False, f"no usable CUDA device ({e}); {SIMULATOR_HINT}")
        return SUPPORTED if usable else Support(False, f"no CUDA device found; {SIMULATOR_HINT}")

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        return plain_layout_support(K)

    def pack_host(self, qw: QuantizedWeight) -> dict:
        return plain_int4_layout(qw)

    def _run(self, A: Any, packed: Packed, out: Any) -> None:
        M, N = out.shape
        grid = ((N + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK, M)
        rows_per_scale = group_rows(packed.group_size, packed.K)
        a = packed.arrays
        with caller_stream(A), _SIMULATOR_LOCK if SIMULATED else nullcontext():
            stream = _launch_stream(A)
            _kernel()[grid, (THREADS_PER_BLOCK, 1), stream](
                _device_view(A), _device_view(a["qweight"]), _device_view(a["scales"]), _device_view(out), rows_per_scale
            )
