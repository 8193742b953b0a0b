"""The one loader for the CUDA rungs' sources, and the base class of the CUDA rungs.

Each CUDA rung lives in `csrc/<rung>.cu` and includes the shared helpers in
`csrc/common.cuh`. Sources are compiled at first use through NVRTC (CuPy `RawModule`)
for the architecture of the device in use, so installing the package builds nothing and
a machine needs no nvcc. CuPy keeps compiled modules in its on-disk kernel cache
(`CUPY_CACHE_DIR`, default ~/.cupy/kernel_cache), keyed by source, options and
architecture; the options carry a hash of every file in csrc/, so editing a header
invalidates the modules that include it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from ._arrays import as_cupy, caller_stream
from .step import SUPPORTED, Packed, Step, Support

CSRC = Path(__file__).resolve().parent.parent / "csrc"
MIN_COMPUTE_CAPABILITY = (8, 0)


@functools.cache
def gpu_support() -> Support:
    """Whether CuPy is importable and sees a CUDA device of compute capability 8.0 or newer."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no cupy, no driver, no device: all mean "cannot run here"
        return Support(False, f"no usable CUDA device ({type(e).__name__}: {e})".strip())
    if count == 0:
        return Support(False, "no CUDA device found")
    cc = compute_capability()
    if cc < MIN_COMPUTE_CAPABILITY:
        return Support(False, f"needs compute capability 8.0 or newer, this GPU has {cc[0]}.{cc[1]}")
    return SUPPORTED


def compute_capability() -> tuple[int, int]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return props["major"], props["minor"]


@functools.cache
def sm_count(device: int) -> int:
    """Streaming multiprocessors of CUDA device `device`."""
    import cupy

    return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device)


@functools.cache
def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*.cu*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def load_module(
    source: str, defines: tuple[tuple[str, Any], ...] = (), device: int = 0, arch_specific: bool = False
) -> Any:
    """Compile csrc/<source>.cu with `-DNAME=VALUE` for each define, for `device`'s architecture
    (its arch-specific variant, such as sm_90a for Hopper's wgmma, with `arch_specific`)."""
    import cupy

    path = CSRC / f"{source}.cu"
    if not path.exists():
        raise FileNotFoundError(f"no CUDA source {path}")
    with cupy.cuda.Device(device):
        major, minor = compute_capability()
        options = (
            "-std=c++17",
            f"--gpu-architecture=sm_{major}{minor}{'a' if arch_specific else ''}",
            f"-I{CSRC}",
            f"-DMARLIN_LADDER_SOURCES=0x{_sources_hash()}",
            *(f"-D{name}={value}" for name, value in defines),
        )
        module = cupy.RawModule(code=path.read_text(), options=options)
        try:
            module.compile()
        except cupy.cuda.compiler.CompileException as e:
            raise RuntimeError(f"compiling {path.name} with {' '.join(options)} failed:\n{e}") from e
    return module


def get_kernel(
    source: str, name: str, defines: tuple[tuple[str, Any], ...] = (), device: int = 0, arch_specific: bool = False
) -> Any:
    """A kernel function `name` (declared extern "C") from csrc/<source>.cu."""
    return load_module(source, defines, device, arch_specific).get_function(name)


@functools.cache
def has_wgmma(device: int) -> bool:
    """Whether CUDA device `device` runs Hopper's warpgroup MMA (compute capability 9.0, sm_90a)."""
    import cupy

    with cupy.cuda.Device(device):
        return compute_capability() == (9, 0)


class CudaStep(Step):
    """A rung whose product runs as a CUDA kernel on CuPy views of the caller's arrays."""

    device = "cuda"

    def available(self) -> Support:
        return gpu_support()

    def _run(self, A: Any, packed: Packed, out: Any) -> None:
        import cupy

        with cupy.cuda.Device(packed.device), caller_stream(A):
            self._launch(as_cupy(A), packed, as_cupy(out))

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        """Launch the rung's kernel(s) on CuPy's current stream."""
        raise NotImplementedError
