"""The ladder as a torch layer: MarlinLinear, a drop-in replacement for nn.Linear.

A MarlinLinear holds one linear layer's weights quantized to 4 bits and packed once, at
construction, for the fastest rung of the ladder that runs the layer on its device
(s8_hopper on Hopper, s6_marlin on other GPUs, s0_numpy on the CPU). A rung may hand the
launches of some batch sizes to another that reads its packed arrays unchanged and was
measured faster for them in a model (Step.hands_rows_to: rung 8 hands 9-16 rows of the smaller
weights to rung 6), so each launch runs on the faster of the two. It is built from an nn.Linear
(quantized with the reference quantizer) or from the tensors of a GPTQ or AWQ checkpoint,
including GPTQ act-order, which it runs by gathering the activations' columns into the
weight's group order before the product (reference/formats.py explains why that is exact).

The product goes through one torch custom op, `torch.ops.marlin_ladder.int4_matmul`, whose
fake implementation only states the output's shape and dtype, so torch.compile traces a
model through it without graph breaks and CUDA graphs capture its launch.

How packed weights travel through the op: the rung's packed arrays are stored as ordinary
torch buffers of the module and passed to the op as a list of tensors, with a string that
names each one and its dtype. Inside the op they are wrapped again, without copying, as
the arrays the rung expects (NumPy views on the CPU, CuPy views via DLPack on the GPU,
made on torch's current stream so no cross-stream synchronisation is recorded during graph
capture). The module therefore owns the weight memory like any other layer: state_dict
saves it, .to() moves it between GPUs, torch.compile sees it as graph inputs and a
captured CUDA graph reads the same buffers on every replay. Nothing lives in a side table
that could go stale. Floating-point arrays (the fp16 scales) are stored bit for bit as
integer tensors, so model.half() / model.bfloat16() / model.to(dtype), which convert
every floating buffer, cannot rewrite a packed layout.

torch is an optional dependency of marlin-ladder: import this module only where torch is
installed; `import steps` never imports it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from reference import QuantizedWeight, element_dtype, quantize
from reference.formats import check_permutation, import_awq, import_gptq
from reference.sparse_marlin import prune_quantized_2_4

from .._arrays import as_cupy, caller_stream, dtype_name, raw_bits, to_host, torch_from_host
from .._first_run import VariantRefused
from ..registry import STEPS, get
from ..step import Packed, Step

# Rungs that compute a different function (weights pruned to 2:4) and so never stand in
# for a dense layer.
SPARSE_RUNGS = frozenset({"s7_sparse_marlin"})


# -- choosing a rung ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weight:
    """What choosing a rung needs to know of a weight."""

    K: int
    N: int
    group_size: int
    zero_points: bool
    dtype: str

    @classmethod
    def of(cls, qw: QuantizedWeight) -> _Weight:
        return cls(qw.K, qw.N, qw.group_size, qw.zeros is not None, qw.dtype.name)


def _why_not(step: Step, device: torch.device, w: _Weight, sparse: bool, M: int = 1) -> str:
    """Why `step` cannot run this weight's M-row products on `device` ("" when it can)."""
    if step.name in SPARSE_RUNGS and not sparse:
        return "it prunes the weight 2:4, a different function; build the layer with sparse=True for that"
    if device.type == "cpu" and step.device != "cpu":
        return "it runs on CUDA"
    if device.type == "cuda" and (step.device != "cuda" or step.host_arrays):
        return "it does not run on a CUDA device" if step.device == "cpu" else "it runs under the CUDA simulator here"
    if device.type not in ("cpu", "cuda"):
        return f"it runs on cpu or cuda, not {device.type}"
    available = step.available()
    if not available:
        return available.reason
    supported = step.supports(M, w.K, w.N, w.group_size)
    if not supported:
        return supported.reason
    if w.zero_points and not step.supports_zero_points:
        return "it supports symmetric weights only and this weight has zero points"
    if w.dtype not in step.activation_dtypes:
        return f"it computes in {' or '.join(step.activation_dtypes)}, not {w.dtype}"
    return ""


def _first_run_refusal(step: Step, device: torch.device, w: _Weight) -> str:
    """Why `step`'s kernel for this weight is refused on `device` by its first-run check ("" if not)."""
    if device.type != "cuda":
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        step.check_first_run(w.K, w.N, w.group_size, w.zero_points, w.dtype, index)
    except VariantRefused as e:
        return str(e)
    return ""


_FALLBACKS_SAID: set[str] = set()  # each fallback is announced once per process


def _say_fallback(chosen: Step, refused: list[str]) -> None:
    message = f"MarlinLinear runs on {chosen.name} instead: {'; '.join(refused)}"
    if message not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def select_step(qw: QuantizedWeight, device: torch.device, name: str | None = None, sparse: bool = False) -> Step:
    """The highest rung of the ladder that runs `qw` on `device` (of those `chosen_by_default`),
    or the rung called `name`.

    For a `sparse` (2:4-pruned) weight the sparse rung comes first, above any dense rung
    higher on the ladder; a dense rung computes the same product, only without the saving."""
    if name is not None:
        candidates = [get(name)]
    else:
        ladder = [s for s in reversed(STEPS) if s.chosen_by_default]
        candidates = sorted(ladder, key=lambda s: not (sparse and s.name in SPARSE_RUNGS))  # stable: ladder order otherwise
    reasons, refused, weight = [], [], _Weight.of(qw)
    for step in candidates:
        why = _why_not(step, device, weight, sparse)
        if not why:
            why = _first_run_refusal(step, device, weight)
            if not why:
                if refused:  # a rung that would have run failed its first-run check: say so, once
                    _say_fallback(step, refused)
                return step
            refused.append(f"{step.name}: {why}")
        reasons.append(f"{step.name}: {why}")
    kind = "asymmetric" if qw.zeros is not None else "symmetric"
    raise ValueError(
        f"no rung runs this {kind} K={qw.K} x N={qw.N} weight with group_size {qw.group_size} on {device} ({'; '.join(reasons)})"
    )


def launch_rung(
    rung: Step, M: int, K: int, N: int, group_size: int, dtype: str, zero_points: bool, device: torch.device
) -> Step:
    """The rung that runs an M-row launch on `rung`'s packed arrays: `rung` itself, or the rung it
    hands such launches to (Step.hands_rows_to) when that one packs this weight to the same padded
    shape (the arrays are then its own) and select_step's checks would let it run the weight."""
    handover = rung.hands_rows_to
    if handover is None:
        return rung
    padded = rung.padded_shape(K, N, group_size)
    if not handover.applies(M, *padded):
        return rung
    other, weight = get(handover.to), _Weight(K, N, group_size, zero_points, dtype)
    if other.padded_shape(K, N, group_size) != padded:
        return rung
    if _why_not(other, device, weight, sparse=False, M=M) or _first_run_refusal(other, device, weight):
        return rung
    return other


@functools.cache
def _warn_reference_path(rung: str) -> None:
    """Said once per process: a CPU layer is correct but slow, and why."""
    warnings.warn(
        f"MarlinLinear runs on the CPU through {rung}, the reference path: it dequantizes the whole weight "
        "and multiplies with NumPy on every call, to define the function rather than to be fast; "
        "build the layer on a CUDA device for speed",
        stacklevel=3,
    )


# -- the custom op --------------------------------------------------------------------------------


def _check_activations(x: torch.Tensor, step: Step, K: int, who: str) -> None:
    """One-sentence errors for activations this rung cannot take (any leading dimensions)."""
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{who} expects inputs whose last dimension is K={K}, got shape {tuple(x.shape)}")
    if dtype_name(x) not in step.activation_dtypes:
        raise TypeError(
            f"{who} runs rung {step.name}, which takes {' or '.join(step.activation_dtypes)} activations, "
            f"got {dtype_name(x)}; cast the input to {' or '.join(step.activation_dtypes)} or pick a rung that accepts "
            f"{dtype_name(x)}"
        )
    wanted = "cpu" if step.host_arrays else "cuda"
    if x.device.type != wanted:
        raise ValueError(f"{who} runs rung {step.name} on {wanted} but the input is on {x.device}")


# Same-size integer dtypes that hold floating-point packed arrays bit for bit.
_RAW_DTYPES = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """A floating tensor reinterpreted as the integer dtype of its size; others unchanged."""
    raw = _RAW_DTYPES.get(tensor.dtype)
    return tensor if raw is None else tensor.view(raw)


def _arrays_spec(packed: dict[str, tuple[torch.Tensor, str]]) -> str:
    """"name:dtype,..." for the packed arrays, in order: what int4_matmul needs to rebuild them."""
    return ",".join(f"{name}:{dtype}" for name, (_, dtype) in packed.items())


def _named_arrays(arrays: list[torch.Tensor], arrays_spec: str) -> dict[str, tuple[torch.Tensor, str]]:
    """The op's packed arrays by name, as stored (raw), with their original dtype names."""
    entries = [entry.split(":") for entry in arrays_spec.split(",")]
    if len(entries) != len(arrays) or any(len(e) != 2 for e in entries):
        raise ValueError(f"int4_matmul got {len(arrays)} packed arrays but the spec {arrays_spec!r} describes {len(entries)}")
    return {name: (_raw(a.detach()), dtype) for (name, dtype), a in zip(entries, arrays)}


def _host_view(raw: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor's bits as a NumPy array of `dtype` (torch cannot hand NumPy a bfloat16)."""
    return raw.numpy().view(np.dtype(dtype))


@torch.library.custom_op("marlin_ladder::int4_matmul", mutates_args=())
def int4_matmul(
    x: torch.Tensor, arrays: list[torch.Tensor], arrays_spec: str, step: str, K: int, N: int, group_size: int
) -> torch.Tensor:
    """C = x @ W (M x N, fp16) for a weight W packed by rung `step`.

    `arrays` are the rung's packed arrays as torch tensors (floating ones may be stored
    as same-size integers) and `arrays_spec` gives their names and dtypes in the same
    order, "name:dtype,..."; K, N and group_size describe W. x must be a C-contiguous
    (M, K) matrix on the device the arrays live on.
    """
    rung = get(step)
    _check_op_inputs(x, rung, K)
    named = _named_arrays(arrays, arrays_spec)
    for name, (a, _) in named.items():
        if a.device != x.device:
            raise ValueError(f"int4_matmul: packed array {name} is on {a.device} but x is on {x.device}")
    dtype = dtype_name(x)
    if rung.host_arrays:
        packed = Packed(step, K, N, group_size, {n: _host_view(a, d) for n, (a, d) in named.items()}, dtype)
        return torch_from_host(rung(to_host(x), packed))
    rung = launch_rung(rung, x.shape[0], K, N, group_size, dtype, "zeros" in named, x.device)
    with caller_stream(x):  # DLPack views made on torch's current stream: no cross-stream sync
        packed = Packed(rung.name, K, N, group_size, {n: as_cupy(a) for n, (a, _) in named.items()}, dtype)
    return rung(x, packed)


@int4_matmul.register_fake
def _int4_matmul_fake(x, arrays, arrays_spec, step, K, N, group_size):
    _check_op_inputs(x, get(step), K)
    return x.new_empty((x.shape[0], N))


def _check_op_inputs(x: torch.Tensor, rung: Step, K: int) -> None:
    who = "int4_matmul"
    if x.dim() != 2:
        raise ValueError(f"{who} takes a 2-D (M, K) matrix, got shape {tuple(x.shape)}; flatten leading dimensions first")
    _check_activations(x, rung, K, who)
    if not x.is_contiguous():
        raise ValueError(f"{who} needs a C-contiguous (row-major) x; call .contiguous() first")


# -- the layer ------------------------------------------------------------------------------------


def _as_numpy(name: str, x: Any) -> np.ndarray:
    """A checkpoint tensor (torch or NumPy) as a host NumPy array."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    if x.dtype == torch.bfloat16:
        raise TypeError(f"{name} is bfloat16; checkpoint scales are float16, convert with .half() first")
    return x.detach().cpu().numpy()


def _in_dtype(qw: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    """qw with its scales rounded to `dtype` (float16 or bfloat16)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    name = str(dtype).removeprefix("torch.")
    return qw if qw.dtype.name == name else replace(qw, scales=qw.scales.astype(element_dtype(name)))


def _default_device(x: Any) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _packed_tensors(step: Step, qw: QuantizedWeight, device: torch.device) -> dict[str, tuple[torch.Tensor, str]]:
    """The rung's packed arrays as raw torch tensors on `device` (sharing memory with the
    pack on a GPU), each with the dtype name of the array the rung takes: on the CPU the
    element type, on a GPU, where bf16 arrays travel as their bits, int16 for those."""
    if step.host_arrays:
        arrays = step.pack(qw).arrays
        return {k: (torch.from_numpy(np.array(raw_bits(v), order="C")), str(v.dtype)) for k, v in arrays.items()}
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        return {k: (torch.from_dlpack(v), dtype_name(v)) for k, v in step.pack(qw).arrays.items()}


class MarlinLinear(nn.Module):
    """y = x @ W + bias with W 4-bit quantized and packed for one rung of the ladder.

    x has shape [..., K] (fp16, or any dtype the rung lists in `activation_dtypes`); y has
    shape [..., N]. Build it with `from_linear`, `from_gptq`, `from_awq`, or directly from a
    QuantizedWeight with contiguous groups and an optional act-order permutation `perm`
    (row i of qw is row perm[i] of the layer's weight). `step` forces a rung by name;
    `device` is where the layer runs (the rung is chosen for it). `sparse` declares qw
    2:4-sparse along K (at most 2 non-zero codes in every 4 rows, as
    `reference.sparse_marlin.prune_quantized_2_4` leaves it), which lets the sparse rung run it.
    """

    def __init__(
        self,
        qw: QuantizedWeight,
        perm: np.ndarray | None = None,
        bias: Any = None,
        *,
        step: str | None = None,
        device: torch.device | str = "cpu",
        sparse: bool = False,
    ):
        super().__init__()
        device = torch.device(device)
        if sparse and not np.array_equal(prune_quantized_2_4(qw).codes, qw.codes):
            raise ValueError(
                "sparse=True needs a weight with at most 2 non-zero codes in every 4 consecutive rows of K; "
                "prune it with reference.sparse_marlin.prune_quantized_2_4 (from_linear(..., sparse=True) does)"
            )
        rung = select_step(qw, device, step, sparse)
        if rung.host_arrays:
            _warn_reference_path(rung.name)
        self.sparse = sparse
        self.zero_points = qw.zeros is not None  # False: symmetric, every zero point the implicit 8
        self.in_features, self.out_features, self.group_size = qw.K, qw.N, qw.group_size
        self.step = rung.name
        self.dtype_name = qw.dtype.name  # of the scales, the activations and the output
        packed = _packed_tensors(rung, qw, device)
        self.arrays_spec = _arrays_spec(packed)
        self.array_buffers = tuple(f"packed_{name}" for name in packed)
        for buffer, (tensor, _) in zip(self.array_buffers, packed.values()):
            self.register_buffer(buffer, _raw(tensor))
        if perm is not None:
            check_permutation(perm, qw.K)
            perm = torch.from_numpy(np.asarray(perm, dtype=np.int64)).to(device)
        self.register_buffer("perm", perm)
        if bias is not None:
            bias = torch.as_tensor(bias).detach().to(device=device, dtype=getattr(torch, self.dtype_name))
            if bias.shape != (qw.N,):
                raise ValueError(f"bias must have shape ({qw.N},), got {tuple(bias.shape)}")
        self.register_buffer("bias", bias)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        zero_point: bool = False,
        sparse: bool = False,
        *,
        step: str | None = None,
        device=None,
    ) -> MarlinLinear:
        """Quantize an nn.Linear with the reference quantizer (round to nearest) and pack it
        once; with `sparse`, then prune it 2:4 along K by magnitude (the layer then computes
        the product with the pruned weight, on the sparse rung where one runs). A bf16
        linear gives a bf16 layer (bf16 scales, activations and output), any other fp16."""
        W = linear.weight.detach().to("cpu", torch.float32).numpy().T  # (K, N): K = in_features
        dtype = "bfloat16" if linear.weight.dtype == torch.bfloat16 else "float16"
        qw = quantize(W, group_size, symmetric=not zero_point, dtype=dtype)
        if sparse:
            qw = prune_quantized_2_4(qw)
        return cls(qw, None, linear.bias, step=step, device=device or linear.weight.device, sparse=sparse)

    @classmethod
    def from_gptq(
        cls,
        qweight,
        qzeros,
        scales,
        g_idx=None,
        bias=None,
        *,
        group_size: int | None = None,
        checkpoint_format: str = "gptq",
        bits: int = 4,
        shape: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float16,
        step: str | None = None,
        device=None,
    ) -> MarlinLinear:
        """From a GPTQ layer's tensors (torch or NumPy); see reference.formats.import_gptq
        (`shape` is the layer's (in_features, out_features), which every tensor is checked against).
        `dtype=torch.bfloat16` makes a bf16 layer for a bf16 model: the checkpoint's fp16
        scales are then rounded to bf16 (a slightly different weight)."""
        qw, perm = import_gptq(
            _as_numpy("qweight", qweight),
            _as_numpy("qzeros", qzeros),
            _as_numpy("scales", scales),
            None if g_idx is None else _as_numpy("g_idx", g_idx),
            group_size=group_size,
            checkpoint_format=checkpoint_format,
            bits=bits,
            shape=shape,
        )
        return cls(_in_dtype(qw, dtype), perm, bias, step=step, device=device or _default_device(qweight))

    @classmethod
    def from_awq(
        cls,
        qweight,
        qzeros,
        scales,
        bias=None,
        *,
        group_size: int | None = None,
        bits: int = 4,
        shape: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float16,
        step: str | None = None,
        device=None,
    ) -> MarlinLinear:
        """From an AWQ (GEMM layout) layer's tensors (torch or NumPy); see reference.formats.import_awq.
        `shape` and `dtype` as for from_gptq."""
        qw = import_awq(
            _as_numpy("qweight", qweight),
            _as_numpy("qzeros", qzeros),
            _as_numpy("scales", scales),
            group_size=group_size,
            bits=bits,
            shape=shape,
        )
        return cls(_in_dtype(qw, dtype), None, bias, step=step, device=device or _default_device(qweight))

    # -- the product --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rung = get(self.step)
        arrays = [getattr(self, buffer) for buffer in self.array_buffers]
        packed_on = "cpu" if rung.host_arrays else "cuda"
        if arrays[0].device.type != packed_on:
            raise ValueError(
                f"this MarlinLinear is packed for rung {self.step} on {packed_on} but its buffers were moved to "
                f"{arrays[0].device}; layouts differ between rungs, so build it there instead (from_linear(..., device=...))"
            )
        who = f"MarlinLinear({self.in_features} -> {self.out_features})"
        _check_activations(x, rung, self.in_features, who)
        if dtype_name(x) != self.dtype_name:
            raise TypeError(
                f"{who} holds {self.dtype_name} scales and takes {self.dtype_name} activations, got {dtype_name(x)}; "
                f"cast the input or build the layer from a {dtype_name(x)} weight"
            )
        leading = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # Act-order: gather x's columns into the weight's group order (the result is contiguous).
        x2 = x2.contiguous() if self.perm is None else torch.index_select(x2, 1, self.perm)
        y = int4_matmul(x2, arrays, self.arrays_spec, self.step, self.in_features, self.out_features, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*leading, self.out_features)

    # -- saving and loading -------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "K": self.in_features,
            "N": self.out_features,
            "group_size": self.group_size,
            "dtype": self.dtype_name,
            "arrays_spec": self.arrays_spec,
        }

    def get_extra_state(self) -> dict[str, Any]:
        return self._layout()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state != self._layout():
            raise ValueError(f"this state_dict holds weights packed as {state}, but this MarlinLinear is packed as {self._layout()}")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}, act_order={self.perm is not None}, sparse={self.sparse}, "
            f"dtype={self.dtype_name}, step={self.step}"
        )


def _skipped(name: str, skip: Iterable[str] | Callable[[str], bool]) -> bool:
    if callable(skip):
        return bool(skip(name))
    return any(part in set(skip) for part in name.split("."))


def replace_linear_layers(
    model: nn.Module, *, skip: Iterable[str] | Callable[[str], bool] = ("lm_head",), **kwargs: Any
) -> list[str]:
    """Swap every nn.Linear in `model` for MarlinLinear.from_linear(linear, **kwargs), in place.

    `skip` is either names that exclude a layer when any component of its dotted name
    equals one of them (default: the output head, "lm_head"), or a predicate on the
    dotted name. Returns the names of the replaced layers.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _skipped(name, skip)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, child, MarlinLinear.from_linear(linear, **kwargs))
        except ValueError as e:
            raise ValueError(f"cannot replace layer {name!r}: {e}") from e
    return [name for name, _ in targets]
