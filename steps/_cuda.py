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
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np

from ._arrays import as_cupy, caller_stream
from ._first_run import VERDICTS, verdict_key
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


@functools.cache
def _device_identity(device: int) -> tuple[str, int, int]:
    """(name, major, minor) of CUDA device `device`: what a first-run verdict holds for."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return name, props["major"], props["minor"]


# A small problem for a rung's first-run check: (M, K, N, group size), the first the rung
# supports; per-variant checks (PipelinedStep) build their own.
PROBE_PROBLEMS = ((5, 512, 512, 128), (5, 1024, 1024, 128), (5, 4096, 4096, 128))


class CudaStep(Step):
    """A rung whose product runs as a CUDA kernel on CuPy views of the caller's arrays.

    Before a kernel variant first runs on a kind of GPU it is checked once against the
    reference (steps/_first_run.py). This base class checks the rung as one variant, on its
    first launch on a device; rungs with many compiled variants check each instead
    (`checks_each_variant`) by calling `first_run_check` where they load one."""

    device = "cuda"
    checks_each_variant = False
    out_vector_bytes = 4  # the kernels read A in 16-byte vectors and write C in vectors of this many bytes

    def available(self) -> Support:
        return gpu_support()

    def _run(self, A: Any, packed: Packed, out: Any) -> None:
        import cupy

        with cupy.cuda.Device(packed.device), caller_stream(A):
            # Views on the caller's stream: a torch tensor's DLPack export orders itself on it.
            A_view, out_view = as_cupy(A), as_cupy(out)
            if A_view.data.ptr % 16:
                raise ValueError("A must start on a 16-byte boundary (it is a view at an odd offset); pass a fresh contiguous copy")
            if out_view.data.ptr % self.out_vector_bytes:
                raise ValueError(f"out must start on a {self.out_vector_bytes}-byte boundary; pass a fresh contiguous array")
            if not self.checks_each_variant:
                self.first_run_check("rung", packed.device, self._probe_rung)
            self._launch(A_view, packed, out_view)

    def first_run_check(self, variant: Hashable, device: int, probe: Callable[[int], str]) -> None:
        """Return when `variant` of this rung has passed its first-run check on `device`'s kind
        of GPU; run `probe(device)` (returns "" on a match, else what went wrong) if it never
        ran; raise VariantRefused when the variant failed. Costs a dict lookup once passed."""
        key = (self.name, variant, device)
        if VERDICTS.passed(key):
            return
        import cupy

        from ._workspace import capture_id

        if capture_id(cupy.cuda.get_current_stream(device).ptr):
            return  # nothing can be synchronised during capture: checked at the first eager launch
        VERDICTS.check(
            key,
            f"{self.name} {variant}",
            lambda: probe(device),
            lambda: verdict_key(self.name, variant, _sources_hash(), _device_identity(device), cupy.__version__),
        )

    def check_first_run(self, K: int, N: int, group_size: int, zero_points: bool, dtype: str, device: int) -> None:
        """Check (once) the variant a single-row product of this weight would launch; raise
        VariantRefused when it fails. MarlinLinear calls this to choose a rung that passes."""
        self.first_run_check("rung", device, self._probe_rung)

    def probe(self, M: int, K: int, N: int, group_size: int, zero_points: bool, dtype: str, device: int) -> str:
        """Run this rung once on a random M x K x N problem on `device` and compare with the
        reference: "" when within the rung's error bound, else a sentence saying how far off."""
        import cupy

        from reference import error_excess, random_quantized_weight

        from ._arrays import to_host, torch_from_host

        rng = np.random.default_rng(0)
        qw = random_quantized_weight(rng, K, N, group_size, symmetric=not zero_points, dtype=dtype)
        A = rng.standard_normal((M, K), dtype=np.float32).astype(qw.dtype)
        with cupy.cuda.Device(device):
            A_dev = torch_from_host(A, f"cuda:{device}") if dtype == "bfloat16" else cupy.asarray(A)
            C = to_host(self(A_dev, self.pack(qw)))
        ratio = error_excess(C, A, self.reference_weight(qw), self.error_c)
        if ratio <= 1:
            return ""
        return (
            f"on a random {M} x {K} x {N} product (group size {group_size}) its largest error is {ratio:.3g} times "
            "the bound c * u * (|A| @ |W|) (non-finite outputs count as infinitely far)"
        )

    def _probe_rung(self, device: int) -> str:
        M, K, N, g = next(p for p in PROBE_PROBLEMS if self.supports(*p))
        return self.probe(M, K, N, g, False, "float16", device)

    def _launch(self, A: Any, packed: Packed, out: Any) -> None:
        """Launch the rung's kernel(s) on CuPy's current stream."""
        raise NotImplementedError
