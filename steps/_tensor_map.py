"""Tensor maps for Hopper's copy engine: `cuTensorMapEncodeTiled`, called through the driver.

A tensor map describes a 2-D tensor in global memory (address, sizes, row stride), the box
that one `cp.async.bulk.tensor` moves, and the swizzle it writes into shared memory. With it
one thread copies a whole tile with one instruction: rung 8's producer copies a tile's 8 k16
rows of weights (2 KB each, a row of the MARLIN layout apart) and the activation tile in
wgmma's 128-byte-swizzled atoms this way, and elements past the tensor's end arrive as zeros.
A map is 128 opaque bytes that the kernel takes by value (`__grid_constant__`), so a captured
graph keeps it. Encoding one is a host call, so maps are cached by what they describe.
"""

from __future__ import annotations

import ctypes
import functools

UINT16, UINT64 = 1, 4  # CUtensorMapDataType, cuda.h
SWIZZLE_NONE, SWIZZLE_128B = 0, 3  # CUtensorMapSwizzle
# No L2 promotion: rung 8 reads each weight byte once, and with 256-byte promotion its stream
# alone was 1.4-3.6 us slower on two wide shapes (docs/rungs.md, rounds 10 and 11).
_INTERLEAVE_NONE, _L2_PROMOTION_NONE, _OOB_FILL_ZEROS = 0, 0, 0


class TensorMap(ctypes.Structure):
    """CUtensorMap: the driver fills it, the launch copies its bytes into the kernel's parameters."""

    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


@functools.cache
def _encode():
    lib = ctypes.CDLL("libcuda.so.1")
    f = lib.cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    f.argtypes = [ctypes.POINTER(TensorMap), ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]  # fmt: skip
    f.restype = ctypes.c_int
    return f


@functools.lru_cache(maxsize=512)
def tiled(dtype: int, address: int, rows: int, columns: int, row_bytes: int, box: tuple[int, int], swizzle: int) -> TensorMap:
    """The map of a row-major `rows` x `columns` tensor of `dtype` at `address`, rows `row_bytes`
    apart, copied in boxes of box = (rows, columns) elements."""
    tensor_map = TensorMap()
    status = _encode()(
        ctypes.byref(tensor_map), dtype, 2, ctypes.c_void_p(address),
        (ctypes.c_uint64 * 2)(columns, rows), (ctypes.c_uint64 * 1)(row_bytes),
        (ctypes.c_uint32 * 2)(box[1], box[0]), (ctypes.c_uint32 * 2)(1, 1),
        _INTERLEAVE_NONE, swizzle, _L2_PROMOTION_NONE, _OOB_FILL_ZEROS,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(
            f"cuTensorMapEncodeTiled failed with CUDA error {status} for a {rows} x {columns} tensor "
            f"(row stride {row_bytes} bytes, box {box[0]} x {box[1]}); it needs a 16-byte-aligned address and stride"
        )
    return tensor_map
