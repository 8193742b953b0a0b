"""GPTQ and AWQ checkpoint directories, loaded into a transformers model of MarlinLinear layers.

A quantized checkpoint is a directory with `config.json` (the model's transformers config
plus a `quantization_config`) and safetensors files (one `model.safetensors`, or shards
listed by `model.safetensors.index.json`), as GPTQModel, AutoGPTQ and AutoAWQ write them.
`load_quantized` builds the model from the config alone, with its weights allocated but
never initialised or written, turns every linear layer the checkpoint stores quantized
(`<layer>.qweight` and friends) into a MarlinLinear on the fastest rung that runs it on the
requested device, loads every other tensor as it is, and checks every tensor on the way:
a missing, extra, mis-shaped or mistyped tensor, or a quantization the rungs cannot run,
stops the load with one sentence naming the tensor and what was expected.

`save_quantized` writes the same on-disk format from QuantizedWeights with the packers of
reference/formats.py; the tests and the GPU acceptance run make their checkpoints with it,
so nothing is downloaded.

torch, transformers and safetensors are needed here (`pip install -e ".[test]"`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reference import QuantizedWeight
from reference.formats import GPTQ_ZERO_OFFSETS, export_awq, export_gptq

from .layer import MarlinLinear

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The tensors of one quantized linear layer, by method; g_idx is optional without act-order.
LAYER_TENSORS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
AWQ_VERSIONS = ("gemm",)


@dataclass(frozen=True)
class QuantizationConfig:
    """A checkpoint's `quantization_config`, validated: what this project can load.

    method "gptq": checkpoint_format "gptq" (v1, zero points stored minus one) or "gptq_v2"
    (stored as they are), desc_act (act-order) and sym as the config says. method "awq":
    AutoAWQ's GEMM layout ("version": "gemm"), sym = not zero_point.
    """

    method: str
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"

    @classmethod
    def from_json(cls, raw: Any) -> QuantizationConfig:
        if not isinstance(raw, dict):
            raise ValueError("config.json has no quantization_config; load_quantized reads GPTQ or AWQ checkpoints")
        method = str(raw.get("quant_method", "")).lower()
        if method not in LAYER_TENSORS:
            raise ValueError(f"quant_method {raw.get('quant_method')!r} is not supported; use one of {tuple(LAYER_TENSORS)}")
        bits = raw.get("bits", raw.get("w_bit"))
        if bits != 4:
            raise ValueError(f"only 4-bit checkpoints are supported, this one has bits={bits}")
        group_size = raw.get("group_size", raw.get("q_group_size"))
        if not isinstance(group_size, int):
            raise ValueError(f"quantization_config must give group_size (an integer), got {group_size!r}")
        if method == "awq":
            version = str(raw.get("version", "gemm")).lower()
            if version not in AWQ_VERSIONS:
                raise ValueError(f"AWQ version {raw.get('version')!r} is not supported; only {AWQ_VERSIONS} (AutoAWQ's GEMM layout)")
            return cls("awq", bits, group_size, False, not raw.get("zero_point", True), "gemm")
        fmt = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
        if fmt not in GPTQ_ZERO_OFFSETS:
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; use one of {tuple(GPTQ_ZERO_OFFSETS)}")
        return cls("gptq", bits, group_size, bool(raw.get("desc_act", False)), bool(raw.get("sym", True)), fmt)

    def to_json(self) -> dict[str, Any]:
        """The config.json entry as GPTQModel / AutoAWQ write it."""
        if self.method == "awq":
            return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size,
                    "zero_point": not self.sym, "version": self.checkpoint_format}  # fmt: skip
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
                "sym": self.sym, "checkpoint_format": self.checkpoint_format}  # fmt: skip


# -- the tensors on disk ---------------------------------------------------------------------------


class CheckpointTensors:
    """Every tensor of a checkpoint directory by name, read lazily from its safetensors files."""

    def __init__(self, directory: Path, stack: contextlib.ExitStack):
        from safetensors import SafetensorError, safe_open

        index = directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).exists():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise ValueError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._handles, self._file_of = {}, {}
        for name in files:
            path = directory / name
            if not path.exists():
                raise ValueError(f"{INDEX_FILE} lists {name}, which is not in {directory}")
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"cannot read {name}: {e} (truncated, or not a safetensors file?)") from e
            self._handles[name] = handle
            for key in handle.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    raise ValueError(f"tensor {key} is in {name} but {INDEX_FILE} lists it under {weight_map.get(key)}")
                self._file_of[key] = name
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._file_of))
            if absent:
                raise ValueError(f"{INDEX_FILE} lists {_some(absent)}, missing from the shards")

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> set[str]:
        return set(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._handles[self._file_of[name]].get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name} from {self._file_of[name]}: {e}") from e


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# -- loading ---------------------------------------------------------------------------------------


def _build_model(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The transformers model of config.json, parameters allocated but never initialised.

    Untouched pages are never made resident, so the FP16 weights of the layers that become
    MarlinLinear cost address space, not memory; buffers computed at construction (rotary
    frequencies) are real."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we quantize; transformers must build plain nn.Linear layers
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _quantized_layer(
    name: str, linear: nn.Linear, tensors: CheckpointTensors, qc: QuantizationConfig, device: torch.device,
    dtype: torch.dtype, step: str | None,
) -> tuple[MarlinLinear, set[str]]:  # fmt: skip
    """The MarlinLinear for checkpoint layer `name`, and the tensor names it consumed."""
    wanted = {t: f"{name}.{t}" for t in LAYER_TENSORS[qc.method]}
    optional = {"g_idx"} if not qc.desc_act else set()
    for tensor, full in wanted.items():
        if full not in tensors and tensor not in optional:
            why = " (desc_act is true: act-order needs g_idx)" if tensor == "g_idx" else ""
            raise ValueError(f"checkpoint lacks tensor {full}{why}")
    got = {t: tensors.get(full) for t, full in wanted.items() if full in tensors}
    used = {wanted[t] for t in got}
    bias = None
    if f"{name}.bias" in tensors:
        used.add(f"{name}.bias")
        bias = tensors.get(f"{name}.bias")
        if linear.bias is None:
            if torch.count_nonzero(bias):
                raise ValueError(f"checkpoint has tensor {name}.bias but the model's layer {name} has no bias")
            bias = None  # AutoGPTQ writes an all-zero bias for bias-free layers
        elif tuple(bias.shape) != (linear.out_features,):
            raise ValueError(f"tensor {name}.bias has shape {tuple(bias.shape)}, expected ({linear.out_features},)")
    elif linear.bias is not None:
        raise ValueError(f"checkpoint lacks tensor {name}.bias (the model's layer {name} has a bias)")
    shape = (linear.in_features, linear.out_features)
    common = dict(bias=bias, group_size=qc.group_size, bits=qc.bits, shape=shape, dtype=dtype, step=step, device=device)
    try:
        if qc.method == "gptq":
            layer = MarlinLinear.from_gptq(got["qweight"], got["qzeros"], got["scales"], got.get("g_idx"),
                                           checkpoint_format=qc.checkpoint_format, **common)  # fmt: skip
        else:
            layer = MarlinLinear.from_awq(got["qweight"], got["qzeros"], got["scales"], **common)
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {name}: {e}") from e
    return layer, used


def _check_symmetric(name: str, layer: MarlinLinear, qc: QuantizationConfig) -> None:
    if qc.sym and layer.zero_points:
        hint = " (a gptq_v2 checkpoint read as checkpoint_format 'gptq'?)" if qc.method == "gptq" else ""
        raise ValueError(f"the config says sym=true but layer {name}'s qzeros hold zero points other than 8{hint}")


def load_quantized(
    path: str | Path, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float16, step: str | None = None
) -> nn.Module:
    """The transformers causal-LM model of a GPTQ or AWQ checkpoint directory, ready to run.

    Every linear layer stored quantized becomes a MarlinLinear on the fastest rung that runs
    it on `device` (or the rung named `step`); everything else loads as stored, in `dtype`.
    Raises ValueError / TypeError naming the tensor for anything the checkpoint gets wrong.
    """
    directory, device = Path(path), torch.device(device)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ValueError(f"{directory} has no config.json; a quantized checkpoint directory needs one")
    qc = QuantizationConfig.from_json(json.loads(config_path.read_text()).get("quantization_config"))
    model = _build_model(directory, dtype)
    with contextlib.ExitStack() as stack:
        tensors = CheckpointTensors(directory, stack)
        used = set()
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        quantized = sorted(n.removesuffix(".qweight") for n in tensors.names() if n.endswith(".qweight"))
        for name in quantized:
            if name not in linears:
                raise ValueError(f"checkpoint has quantized tensor {name}.qweight but the model has no linear layer {name}")
            layer, consumed = _quantized_layer(name, linears[name], tensors, qc, device, dtype, step)
            _check_symmetric(name, layer, qc)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            used |= consumed
        state = _plain_tensors(model, tensors, set(quantized), dtype)
        used |= set(state)
        extra = sorted(tensors.names() - used)
        if extra:
            raise ValueError(f"checkpoint has tensors the model does not: {_some(extra)}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.to(device).eval()


def _plain_tensors(model: nn.Module, tensors: CheckpointTensors, quantized: set[str], dtype: torch.dtype) -> dict:
    """The checkpoint's tensors for every parameter and buffer outside the quantized layers."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    state, missing = {}, []
    for key, target in model.state_dict().items():
        if key.rpartition(".")[0] in quantized:
            continue
        if key not in tensors:
            if key not in tied:
                missing.append(f"{key} {tuple(target.shape)}")
            continue
        value = tensors.get(key)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"tensor {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        if value.dtype.is_floating_point != target.dtype.is_floating_point:
            raise TypeError(f"tensor {key} is {value.dtype}, expected a {'floating-point' if target.is_floating_point() else 'integer'} tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"tensor {key} holds non-finite values (NaN or inf)")
        state[key] = value.to(dtype if value.is_floating_point() else target.dtype)
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {_some(missing)}")
    return state


# -- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedLayer:
    """One linear layer to write: its weight, act-order permutation (GPTQ only) and bias."""

    weight: QuantizedWeight
    perm: np.ndarray | None = None
    bias: torch.Tensor | None = None


def layer_tensors(name: str, layer: QuantizedLayer, qc: QuantizationConfig) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized layer, by their suffix (qweight, ...), packed by reference.formats."""
    if qc.method == "gptq":
        if not qc.desc_act and layer.perm is not None:
            raise ValueError(f"layer {name} has an act-order permutation but the config says desc_act=false")
        packed = vars(export_gptq(layer.weight, layer.perm, checkpoint_format=qc.checkpoint_format))
    else:
        if layer.perm is not None:
            raise ValueError(f"layer {name}: AWQ has no act-order; perm must be None")
        packed = vars(export_awq(layer.weight))
    out = {t: torch.from_numpy(np.ascontiguousarray(a)) for t, a in packed.items()}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to("cpu", torch.float16).contiguous()
    return out


def save_quantized(
    path: str | Path,
    config: Any,
    layers: dict[str, QuantizedLayer],
    others: dict[str, torch.Tensor],
    qc: QuantizationConfig,
    *,
    shard_bytes: int | None = None,
) -> None:
    """Write a checkpoint directory: config.json (the transformers `config` plus `qc`) and
    safetensors files, one or, with `shard_bytes`, shards of about that size and an index.
    `layers` maps a linear layer's dotted name to its weight; `others` holds every other tensor."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict["quantization_config"] = qc.to_json()
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in others.items()}
    packed: dict[int, dict[str, torch.Tensor]] = {}  # a QuantizedLayer used several times is packed once
    for name, layer in layers.items():
        first = id(layer) not in packed
        if first:
            packed[id(layer)] = layer_tensors(name, layer, qc)
        # safetensors stores no two names over one memory: later uses get copies
        tensors.update({f"{name}.{t}": v if first else v.clone() for t, v in packed[id(layer)].items()})
    if shard_bytes is None:
        save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        if size and size + value.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for v in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

