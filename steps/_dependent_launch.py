"""Launch a CuPy kernel as a programmatic dependent launch (Hopper and newer).

A kernel launched this way may start while the kernel before it in the stream is still
running: its blocks take SMs as the earlier kernel's blocks leave them, run their prologue
and whatever does not depend on the earlier kernel (rung 8 requests its first weight tiles),
and wait in `griddepcontrol.wait` for the rest. Inside a captured CUDA graph the launch
becomes a programmatic edge, so a decode step's back-to-back layers overlap one's tail with
the next one's start. CuPy's launch call has no launch attributes, so this calls the
driver's cuLaunchKernelEx directly, which also passes arguments CuPy cannot: tensor maps
(steps/_tensor_map.py), 128 bytes by value.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from ._tensor_map import TensorMap

PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID, cuda.h


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


@functools.cache
def _driver() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                     ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _argument(x: Any) -> ctypes._SimpleCData | TensorMap:
    import cupy

    if isinstance(x, TensorMap):
        return x
    if isinstance(x, cupy.ndarray):
        return ctypes.c_void_p(x.data.ptr)
    if isinstance(x, np.int32):
        return ctypes.c_int32(int(x))
    raise TypeError(f"a driver launch passes CuPy arrays, numpy.int32 values and tensor maps, got {type(x).__name__}")


def launch_dependent(kernel: Any, blocks: int, threads: int, args: tuple, shared_mem: int, dependent: bool = True) -> None:
    """kernel((blocks,), (threads,), args, shared_mem=shared_mem) on CuPy's current stream, as a
    programmatic dependent launch (or, with dependent False, a plain one). The kernel must run
    griddepcontrol.wait before it touches anything the previous kernel in the stream may write."""
    import cupy

    values = [_argument(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
    attribute = _LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1
    config = _LaunchConfig(
        grid=(ctypes.c_uint * 3)(blocks, 1, 1),
        block=(ctypes.c_uint * 3)(threads, 1, 1),
        shared_mem=shared_mem,
        stream=cupy.cuda.get_current_stream().ptr,
        attrs=ctypes.pointer(attribute),
        num_attrs=int(dependent),
    )
    driver = _driver()
    status = driver.cuLaunchKernelEx(ctypes.byref(config), kernel.kernel.ptr, pointers, None)
    if status != 0:
        text = ctypes.c_char_p()
        driver.cuGetErrorString(status, ctypes.byref(text))
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {status}: {(text.value or b'unknown').decode()}")
