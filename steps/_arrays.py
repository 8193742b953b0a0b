"""What kind of array the caller handed us, and checks on it.

Rungs accept NumPy arrays (CPU rungs), and CuPy arrays or torch CUDA tensors (CUDA
rungs). CUDA rungs work on zero-copy CuPy views of whatever they were given, launch on
the caller's current stream, and hand back the same kind of array they received.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import ml_dtypes
import numpy as np


def array_kind(x: Any) -> str:
    """'numpy', 'cupy' or 'torch'; TypeError for anything else."""
    module = type(x).__module__.split(".")[0]
    if module == "numpy" and isinstance(x, np.ndarray):
        return "numpy"
    if module in ("cupy", "torch"):
        return module
    raise TypeError(f"expected a NumPy array, CuPy array or torch tensor, got {type(x).__name__}")


def is_cuda_array(x: Any) -> bool:
    kind = array_kind(x)
    return kind == "cupy" or (kind == "torch" and x.is_cuda)


def device_index(x: Any) -> int | None:
    """CUDA device ordinal of x, or None for host memory."""
    kind = array_kind(x)
    if kind == "cupy":
        return x.device.id
    if kind == "torch" and x.is_cuda:
        return x.device.index
    return None


def dtype_name(x: Any) -> str:
    """'float16', 'bfloat16', 'int32', ... for any supported array kind."""
    return str(x.dtype).removeprefix("torch.")


def is_c_contiguous(x: Any) -> bool:
    return x.is_contiguous() if array_kind(x) == "torch" else bool(x.flags.c_contiguous)


def check_matrix(name: str, x: Any, dtypes: tuple[str, ...], shape: tuple[int | None, int | None]) -> None:
    """Raise a one-sentence error unless x is a C-contiguous 2-D matrix of an accepted dtype and shape."""
    array_kind(x)
    if len(x.shape) != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got {len(x.shape)} dimensions (shape {tuple(x.shape)})")
    if dtype_name(x) not in dtypes:
        raise TypeError(f"{name} has dtype {dtype_name(x)}; accepted: {', '.join(dtypes)}")
    for axis, (got, want) in enumerate(zip(x.shape, shape)):
        if want is not None and got != want:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; dimension {axis} must be {want}")
    if not is_c_contiguous(x):
        raise ValueError(f"{name} must be C-contiguous (row-major); call .contiguous() / ascontiguousarray first")


def empty_like_kind(like: Any, shape: tuple[int, int], dtype: str = "float16") -> Any:
    """An uninitialised array of `shape` of the same kind and on the same device as `like`."""
    kind = array_kind(like)
    if kind == "numpy":
        return np.empty(shape, dtype=dtype)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.empty(shape, dtype=dtype)
    import torch

    return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)


def raw_bits(x: Any) -> Any:
    """bfloat16 arrays and tensors viewed as int16, others unchanged: the kernels need only
    the bits, and CuPy's and torch's NumPy interop do not all know bfloat16."""
    if dtype_name(x) != "bfloat16":
        return x
    if array_kind(x) == "torch":
        import torch

        return x.view(torch.int16)
    return x.view(np.int16)


def to_host(x: Any) -> np.ndarray:
    """x as a NumPy array on the host (a copy of device arrays); bfloat16 tensors through
    their bits, which torch cannot hand to NumPy itself."""
    kind = array_kind(x)
    if kind == "numpy":
        return x
    if kind == "cupy":
        return x.get()
    host = raw_bits(x.detach()).cpu().numpy()
    return host.view(ml_dtypes.bfloat16) if dtype_name(x) == "bfloat16" else host


def torch_from_host(a: np.ndarray, device: Any = "cpu") -> Any:
    """A torch tensor of a NumPy array's values on `device`, bfloat16 included."""
    import torch

    t = torch.from_numpy(raw_bits(a))
    return (t.view(torch.bfloat16) if dtype_name(a) == "bfloat16" else t).to(device)


def to_gpu(a: np.ndarray) -> Any:
    """A NumPy array's copy on the current GPU: a CuPy array, or for bfloat16 a torch tensor
    (CuPy's own bfloat16 needs recent NumPy and ml_dtypes)."""
    if dtype_name(a) == "bfloat16":
        return torch_from_host(a, "cuda")
    import cupy

    return cupy.asarray(a)


def as_cupy(x: Any) -> Any:
    """A zero-copy CuPy view of a CuPy array or torch CUDA tensor (bfloat16 as int16)."""
    if array_kind(x) == "cupy":
        return x
    import cupy

    return cupy.from_dlpack(raw_bits(x))


def caller_stream(x: Any):
    """Context manager that makes the caller's current stream CuPy's current stream.

    For torch tensors that is torch's current stream on the tensor's device (so the
    launch is ordered with the caller's torch work and can be captured in a CUDA graph);
    for CuPy arrays CuPy's current stream is already the caller's.
    """
    if array_kind(x) != "torch":
        return nullcontext()
    import cupy
    import torch

    stream = torch.cuda.current_stream(x.device)
    if hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, x.device.index)
