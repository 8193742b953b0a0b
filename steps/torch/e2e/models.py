"""The two models the benchmark compares: a Llama-architecture decoder whose block linear
layers are MarlinLinear, and its "dequantized twin", the same network in FP16 whose
replaced layers hold, as ordinary weights, exactly the dequantized values the MarlinLinear
multiplies by. Both compute the same function and differ only in how the products are
rounded, which isolates the kernel.

The model is transformers' LlamaForCausalLM built from a LlamaConfig with random weights
(nothing is downloaded). Quantizing billions of random weights with the NumPy reference
quantizer would take minutes, and random weights need no quantizer: each block position
draws WEIGHT_POOL random QuantizedWeights (reference.random_quantized_weight, centered:
mean zero and scaled like a real layer, so that activations do not grow with depth) and
layer i uses number i % WEIGHT_POOL, in its own memory, so a decode step streams every
layer's weights from memory as with a real checkpoint.

Tensor parallel (E2EConfig.tp = p): each rank builds the Llama of one rank's shard, with
1/p of the heads, k/v heads and intermediate size (and the full head_dim), draws the same
whole QuantizedWeights as an unsharded run and keeps its shard (steps.torch.tp): q, k, v,
gate and up column-parallel, o and down row-parallel, whose partial outputs an all-reduce
sums. Embeddings, norms and lm_head are whole on every rank, drawn from the seed alone,
so the sharded model computes the unsharded model's function.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from reference import dequantize, random_quantized_weight
from reference.sparse_marlin import prune_quantized_2_4

from .. import tp as tensor_parallel
from ..layer import MarlinLinear
from .config import E2EConfig
from .fusion import fuse_projections

WEIGHT_POOL = 2  # distinct random weights per block position, alternating over the layers
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})  # the rest of a block's linear layers are column-parallel


@dataclass
class Models:
    twin: nn.Module  # FP16, replaced layers hold the dequantized weights
    quant: nn.Module  # the same network with MarlinLinear layers
    replaced: list[str]  # dotted names of the replaced layers (a row-parallel layer's local GEMM)
    rung: str


def block_linears(model: nn.Module) -> list[str]:
    """Dotted names of the nn.Linear layers inside the decoder blocks (not lm_head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"]


def set_parameter_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Convert parameters only (model.to(dtype) would also round the fp32 rotary buffers)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def sharded_llama_config(config: LlamaConfig, tp: int) -> LlamaConfig:
    """The LlamaConfig of one rank's shard: 1/tp of the heads, k/v heads and intermediate size."""
    sizes = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size}  # fmt: skip
    for what, size in sizes.items():
        if size % tp:
            raise ValueError(f"--tp {tp} must divide {what}={size} of this model (tp splits heads and the MLP)")
    local = copy.deepcopy(config)
    local.head_dim = config.hidden_size // config.num_attention_heads
    for what, size in sizes.items():
        setattr(local, what, size // tp)
    return local


def _draw_shared_weights(model: nn.Module, seed: int) -> None:
    """Embeddings and lm_head from the seed alone (transformers draws them after the block
    weights, whose count differs between a shard and the whole model)."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        weight.copy_(torch.randn(weight.shape, generator=gen) * std)


def build_models(config: E2EConfig, device: str, group: dist.ProcessGroup | None = None) -> Models:
    """The dequantized FP16 twin and the MarlinLinear model, random weights, on `device`;
    with config.sparse the weights are pruned 2:4 (in both models) and the layers are
    sparse; with config.fused both models' blocks have one q|k|v and one gate|up layer;
    with config.tp > 1 this rank's shard of both, reducing over `group`."""
    llama = config.llama()
    rank, tp = (dist.get_rank(group), dist.get_world_size(group)) if config.tp > 1 else (0, 1)
    if tp != config.tp:
        raise ValueError(f"--tp {config.tp} needs a process group of {config.tp} ranks, this one has {tp}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    with torch.device(device):
        twin = LlamaForCausalLM._from_config(sharded_llama_config(llama, tp) if tp > 1 else llama, dtype=torch.float16)
    twin.eval().requires_grad_(False)
    _draw_shared_weights(twin, config.seed)
    if config.fused:
        fuse_projections(twin)
    names = block_linears(twin)
    # The copy's block linear layers are replaced below: give them weightless stand-ins instead
    # of copies, so that building never holds two FP16 models (70B dims: 1.7 GB a layer).
    stand_in = {id(twin.get_submodule(n).weight): nn.Parameter(torch.empty(0, device="meta"), False) for n in names}
    quant = copy.deepcopy(twin, memo=stand_in)
    pool: dict[str, list[tuple[MarlinLinear, torch.Tensor, tensor_parallel.RowShard | None]]] = {}
    replaced = []
    for name in names:
        position = name.split(".layers.", 1)[1].split(".", 1)[1]  # "self_attn.q_proj" (or "self_attn.qkv_proj")
        row = position.rsplit(".", 1)[-1] in ROW_PARALLEL
        linear = twin.get_submodule(name)
        if position not in pool:
            # The whole layer's weight, as an unsharded run draws it, then this rank's shard of it.
            K, N = (linear.in_features * tp, linear.out_features) if row else (linear.in_features, linear.out_features * tp)
            pool[position] = []
            for _ in range(WEIGHT_POOL):
                qw = random_quantized_weight(rng, K, N, config.group_size, centered=True)
                if config.sparse:
                    qw = prune_quantized_2_4(qw)
                shard = tensor_parallel.shard_rows(qw, None, rank, tp) if row else None
                qw = shard.qw if row else tensor_parallel.shard_columns(qw, rank, tp)
                w_deq = torch.from_numpy(np.ascontiguousarray(dequantize(qw).T)).to(device)  # (N, K) like nn.Linear
                pool[position].append((MarlinLinear(qw, step=config.rung, device=device, sparse=config.sparse), w_deq, shard))
        layer_index = int(name.split(".layers.", 1)[1].split(".", 1)[0])
        marlin, w_deq, shard = pool[position][layer_index % WEIGHT_POOL]
        linear.weight.copy_(w_deq)
        parent, _, child = name.rpartition(".")
        layers = {twin: linear, quant: copy.deepcopy(marlin)}
        for model, layer in layers.items():
            wrapped = tensor_parallel.RowParallel(layer, shard, None, group) if row and tp > 1 else layer
            setattr(model.get_submodule(parent), child, wrapped)
        replaced.append(f"{name}.local" if row and tp > 1 else name)
    rungs = {quant.get_submodule(n).step for n in replaced}
    return Models(twin, quant, replaced, ", ".join(sorted(rungs)))
