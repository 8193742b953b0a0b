"""The one interface every rung of the ladder implements.

A rung is a `Step`: it says what it adds over the previous rung (`idea`), which problems
it accepts (`supports`), whether this machine can run it (`available`), how it lays the
quantized weights out once, offline (`pack_host` on the CPU, `pack` onto its device),
and it multiplies: `step(A, packed, out=None) -> C`. Tests, benchmarks and notebooks
loop over the registry through this interface alone.

`__call__` does all argument checking here, once, for every rung, so a bad input gets
the same clear one-sentence error from every rung and never reaches a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reference import QuantizedWeight, check_group_size

from ._arrays import array_kind, check_matrix, device_index, dtype_name, empty_like_kind, is_cuda_array, raw_bits
from ._padding import pad_weight, padded_shape, run_padded


@dataclass(frozen=True)
class Support:
    """Truthy when a problem is supported; otherwise `reason` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


SUPPORTED = Support(True)


@dataclass(frozen=True)
class Handover:
    """Launches of `first_row`-`last_row` rows of a weight under `below_bytes` packed int4 bytes
    (K x N / 2, padded), which MarlinLinear runs on rung `to`: it reads the handing rung's packed
    arrays unchanged and was measured faster for them in a model (steps/torch/layer.py,
    launch_rung)."""

    to: str
    first_row: int
    last_row: int
    below_bytes: int

    def applies(self, M: int, K: int, N: int) -> bool:
        return self.first_row <= M <= self.last_row and K * N // 2 < self.below_bytes


@dataclass
class Packed:
    """A rung's one-time layout of a QuantizedWeight, on the rung's device."""

    step: str
    K: int
    N: int
    group_size: int
    arrays: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float16"  # the element type of the scales, the activations and the output

    @property
    def streamed_bytes(self) -> int:
        """Bytes of weights, scales and metadata a product must read: the memory floor."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def device(self) -> int | None:
        """CUDA device ordinal the arrays live on, None for host memory."""
        first = next(iter(self.arrays.values()), None)
        return None if first is None else device_index(first)


class Step:
    """Base class of a rung. Subclasses set the class attributes and implement `_run`."""

    name: str = ""
    title: str = ""
    idea: str = ""
    device: str = "cpu"  # "cpu" or "cuda"
    # c in the error bound c * u * (|A| @ |W|) (reference.error_bound); see each rung.
    error_c: float = 2.0
    activation_dtypes: tuple[str, ...] = ("float16",)
    supports_zero_points: bool = False
    # Whether MarlinLinear may pick this rung by itself (it takes the highest that runs); a rung
    # measured slower than the one below it on the GPUs at hand says False until it is not.
    chosen_by_default: bool = True
    # (K, N) multiples the rung's layout runs at every batch size (from its _supports rules);
    # pack pads other weights up to one of them (steps/_padding.py).
    shape_multiples: tuple[tuple[int, int], ...] = ((1, 1),)
    # The launches MarlinLinear hands to another rung (Handover), or None when this rung runs
    # every launch itself.
    hands_rows_to: Handover | None = None

    # -- what the rung accepts -------------------------------------------------------
    def supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        """Whether this rung handles an (M x K) @ (K x N) product with this group size."""
        try:
            check_group_size(group_size, K)
        except ValueError as e:
            return Support(False, str(e))
        if K <= 0 or N <= 0 or M < 0:
            return Support(False, f"K and N must be positive and M non-negative, got M={M}, K={K}, N={N}")
        return self._supports(M, *self.padded_shape(K, N, group_size), group_size)

    def padded_shape(self, K: int, N: int, group_size: int) -> tuple[int, int]:
        """The (K, N) this rung packs and computes a K x N weight as (itself when aligned)."""
        return padded_shape(self.shape_multiples, K, N, group_size)

    def _supports(self, M: int, K: int, N: int, group_size: int) -> Support:
        return SUPPORTED

    def available(self) -> Support:
        """Whether this machine can run the rung (a GPU, the right packages)."""
        return SUPPORTED

    def check_first_run(self, K: int, N: int, group_size: int, zero_points: bool, dtype: str, device: int) -> None:
        """Raise steps._first_run.VariantRefused when the kernel a single-row product of such a
        weight would launch on CUDA device `device` failed its first-run check against the
        reference (run once per variant and kind of GPU). Nothing to check on the CPU."""

    @property
    def host_arrays(self) -> bool:
        """True when the rung takes and returns NumPy arrays (CPU rungs, simulated CUDA)."""
        return self.device == "cpu"

    def reference_weight(self, qw: QuantizedWeight) -> QuantizedWeight:
        """The weight this rung actually multiplies by: `qw` itself, except for rungs that
        transform it lossily (the 2:4-sparse rung prunes it). Tests compare against
        reference_gemm(A, step.reference_weight(qw))."""
        return qw

    # -- offline weight layout ------------------------------------------------------
    def pack_host(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        """The rung's layout of the weights as NumPy arrays (pure CPU, bit-exact testable)."""
        raise NotImplementedError

    def pack(self, qw: QuantizedWeight) -> Packed:
        """Lay the weights out once and place them where the rung computes."""
        ok = self.supports(1, qw.K, qw.N, qw.group_size)
        if not ok:
            raise ValueError(f"{self.name} cannot pack this weight: {ok.reason}")
        if qw.zeros is not None and not self.supports_zero_points:
            raise ValueError(f"{self.name} supports symmetric quantization only (zeros=None); this weight has zero points")
        dtype = qw.dtype.name
        if dtype not in self.activation_dtypes:
            raise ValueError(
                f"{self.name} computes in {' or '.join(self.activation_dtypes)}; this weight's scales are {dtype}"
            )
        available = self.available()
        if not available:
            raise RuntimeError(f"{self.name} cannot run on this machine: {available.reason}; pack_host() gives its layout anyway")
        arrays = self.pack_host(pad_weight(qw, *self.padded_shape(qw.K, qw.N, qw.group_size)))
        if not self.host_arrays:
            import cupy

            arrays = {k: cupy.asarray(raw_bits(v)) for k, v in arrays.items()}
        return Packed(self.name, qw.K, qw.N, qw.group_size, arrays, dtype)

    # -- the product ----------------------------------------------------------------
    def __call__(self, A: Any, packed: Packed, out: Any = None) -> Any:
        """C = A @ W for the packed weight W; A is (M, K), C is (M, N), both of the packed dtype."""
        if not isinstance(packed, Packed) or packed.step != self.name:
            got = packed.step if isinstance(packed, Packed) else type(packed).__name__
            raise TypeError(f"{self.name} needs weights packed by its own pack(), got {got}")
        check_matrix("A", A, self.activation_dtypes, (None, packed.K))
        if dtype_name(A) != packed.dtype:
            raise TypeError(
                f"A is {dtype_name(A)} but the weight was packed with {packed.dtype} scales; pass {packed.dtype} "
                f"activations or quantize the weight with dtype={dtype_name(A)}"
            )
        M = A.shape[0]
        self._check_device("A", A, packed)
        if out is None:
            out = empty_like_kind(A, (M, packed.N), dtype_name(A))
        else:
            check_matrix("out", out, (dtype_name(A),), (M, packed.N))
            if array_kind(out) != array_kind(A):
                raise TypeError(f"out is a {array_kind(out)} array but A is {array_kind(A)}; pass the same kind")
            self._check_device("out", out, packed)
        if M == 0:
            return out
        ok = self.supports(M, packed.K, packed.N, packed.group_size)
        if not ok:
            raise ValueError(f"{self.name}: {ok.reason}")
        K, N = self.padded_shape(packed.K, packed.N, packed.group_size)
        if (K, N) == (packed.K, packed.N):
            self._run(A, packed, out)
        else:
            run_padded(self, A, packed, out, K, N)
        return out

    def _check_device(self, name: str, x: Any, packed: Packed) -> None:
        if self.host_arrays:
            if array_kind(x) != "numpy":
                raise TypeError(f"{self.name} runs on the CPU and takes NumPy arrays; {name} is a {array_kind(x)} array")
            return
        if not is_cuda_array(x):
            raise TypeError(f"{self.name} runs on the GPU and takes CuPy arrays or torch CUDA tensors; {name} is on the host")
        if device_index(x) != packed.device:
            raise ValueError(f"{name} is on cuda:{device_index(x)} but the packed weights are on cuda:{packed.device}")

    def _run(self, A: Any, packed: Packed, out: Any) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name}: {self.title}>"
