"""The ordered ladder. Each entry is one rung; each adds one idea to the one before."""

from __future__ import annotations

from .s0_numpy import NumpyDequantMatmul
from .s1_numba_naive import NumbaNaive
from .s2_smem_tiling import SmemTiling
from .s3_tensor_cores import TensorCores
from .s4_marlin_layout import MarlinLayout
from .s5_async_pipeline import AsyncPipeline
from .s6_marlin import Marlin
from .s7_sparse_marlin import SparseMarlin
from .s8_hopper import Hopper
from .step import Step

STEPS: tuple[Step, ...] = (
    NumpyDequantMatmul(),
    NumbaNaive(),
    SmemTiling(),
    TensorCores(),
    MarlinLayout(),
    AsyncPipeline(),
    Marlin(),
    SparseMarlin(),
    Hopper(),
)


def get(name: str) -> Step:
    """The rung called `name` (e.g. "s3_tensor_cores"); KeyError lists the valid names."""
    for step in STEPS:
        if step.name == name:
            return step
    raise KeyError(f"no rung named {name!r}; the rungs are: {', '.join(s.name for s in STEPS)}")
