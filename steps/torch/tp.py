"""Tensor parallelism for MarlinLinear: one layer's 4-bit weight cut across the ranks of a
process group, each rank packing and multiplying only its own piece.

Column-parallel (split N): rank r keeps output columns [r N/p, (r+1) N/p) with their codes,
scales and zero points; every rank reads the whole input, and the output stays sharded for
the next (row-parallel) layer. Row-parallel (split K): rank r keeps a K/p slice of the rows
with the scale groups they belong to, multiplies the slice of the input it matches, and an
all-reduce sums the p partial outputs. A shard is cut from the QuantizedWeight (from a full
layer or a checkpoint's tensors) before packing, so its groups stay whole and it is packed
once, for the rung that runs it.

Act-order (GPTQ's g_idx) and row-parallel: the checkpoint's rows k0..k1 on a rank belong
to scattered groups, partial groups of varying sizes that no contiguous-group layout holds.
So the K split is made in group order: rank r keeps whole groups, rows perm[k0:k1] of the
checkpoint, and multiplies those input features; when they are not all among its own
input slice, it first all-gathers the (small, decode-time) input. docs/tensor_parallel.md
draws it, and says why DTensor's parallel styles do not carry the packed weights.

torch.distributed's collectives run the reduction: gloo on the CPU (the tests), NCCL on GPUs.
"""

from __future__ import annotations

import atexit
import itertools
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from reference import QuantizedWeight, quantize
from reference.formats import check_permutation

from .layer import MarlinLinear

STYLES = ("column", "row")


def _check_split(what: str, size: int, world: int, rank: int) -> int:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must lie in 0..world-1 for world {world}, got rank {rank}")
    if size % world:
        raise ValueError(f"{what}={size} does not split evenly over {world} ranks; tensor parallelism needs {what} % tp == 0")
    return size // world


def shard_columns(qw: QuantizedWeight, rank: int, world: int) -> QuantizedWeight:
    """Output columns [r N/p, (r+1) N/p) of qw, with their scales and zero points."""
    n = _check_split("N", qw.N, world, rank)
    cols = slice(rank * n, (rank + 1) * n)
    zeros = None if qw.zeros is None else np.ascontiguousarray(qw.zeros[:, cols])
    return replace(qw, codes=np.ascontiguousarray(qw.codes[:, cols]), scales=np.ascontiguousarray(qw.scales[:, cols]),
                   zeros=zeros)  # fmt: skip


@dataclass(frozen=True)
class RowShard:
    """Rank r's part of a row-parallel layer: qw holds whole groups (rows k0..k1 in group
    order) and multiplies `input_index` of the input: of the rank's own input slice
    (gather False) or, when its rows come from other ranks' slices, of the all-gathered
    input (gather True). input_index None: the rank's own slice as it is."""

    qw: QuantizedWeight
    input_index: np.ndarray | None
    gather: bool


def shard_rows(qw: QuantizedWeight, perm: np.ndarray | None, rank: int, world: int) -> RowShard:
    """Rows [r K/p, (r+1) K/p) of qw (group order) with their groups' scales and zero points."""
    k = _check_split("K", qw.K, world, rank)
    if qw.group_size != -1 and k % qw.group_size:
        raise ValueError(
            f"a row-parallel shard of K={qw.K} over {world} ranks has {k} rows, not a multiple of group_size "
            f"{qw.group_size}; shards must hold whole groups (use a tp that divides K / group_size = {qw.K // qw.group_size})"
        )
    k0, k1 = rank * k, (rank + 1) * k
    groups = slice(0, 1) if qw.group_size == -1 else slice(k0 // qw.group_size, k1 // qw.group_size)
    zeros = None if qw.zeros is None else np.ascontiguousarray(qw.zeros[groups])
    shard = replace(qw, codes=np.ascontiguousarray(qw.codes[k0:k1]), scales=np.ascontiguousarray(qw.scales[groups]),
                    zeros=zeros)  # fmt: skip
    if perm is None:
        return RowShard(shard, None, False)
    check_permutation(perm, qw.K)
    rows = np.asarray(perm[k0:k1], dtype=np.int64)  # the checkpoint rows (input features) this shard multiplies
    if rows.min() >= k0 and rows.max() < k1:  # all in this rank's own input slice: no gather
        return RowShard(shard, rows - k0, False)
    return RowShard(shard, rows, True)


class RowParallel(nn.Module):
    """A row-parallel layer: `local` (a MarlinLinear, or an nn.Linear holding the same shard
    in FP16) multiplies this rank's part of the input; the partial outputs are summed over
    `group` by an all-reduce, then the full bias is added once."""

    def __init__(self, local: nn.Module, shard: RowShard, bias: Any = None, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.local, self.gather, self.group = local, shard.gather, group
        index = None if shard.input_index is None else torch.from_numpy(shard.input_index)
        device = next(itertools.chain(local.parameters(), local.buffers())).device
        self.register_buffer("input_index", None if index is None else index.to(device))
        if bias is not None:
            bias = torch.as_tensor(bias).detach().to(device)
            if bias.shape != (local.out_features,):
                raise ValueError(f"bias must have shape ({local.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather:
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            x = torch.cat(parts, dim=-1)
        if self.input_index is not None:
            x = x.index_select(-1, self.input_index)
        y = self.local(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise ValueError("tensor-parallel layers need torch.distributed initialized (torchrun, or init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def parallel_layer(
    style: str,
    qw: QuantizedWeight,
    perm: np.ndarray | None = None,
    bias: Any = None,
    *,
    group: dist.ProcessGroup | None = None,
    **layer_kwargs: Any,
) -> nn.Module:
    """This rank's shard of the layer (qw, perm, bias), packed for the rung that runs it:
    a MarlinLinear for "column" (its output sharded along N), a RowParallel for "row".
    qw and perm are those of the whole layer (MarlinLinear's arguments; from a checkpoint,
    reference.formats.import_gptq / import_awq give them); layer_kwargs go to MarlinLinear."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rank, world = _rank_world(group)
    if perm is not None:
        check_permutation(perm, qw.K)
    try:
        if style == "column":
            shard = shard_columns(qw, rank, world)
            local_bias = None if bias is None else torch.as_tensor(bias)[rank * shard.N : (rank + 1) * shard.N]
            return MarlinLinear(shard, perm, local_bias, **layer_kwargs)
        shard = shard_rows(qw, perm, rank, world)
        return RowParallel(MarlinLinear(shard.qw, **layer_kwargs), shard, bias, group)
    except ValueError as e:
        raise ValueError(f"cannot shard this K={qw.K} x N={qw.N} layer {style}-parallel over {world} ranks: {e}") from e


def from_linear(
    linear: nn.Linear, style: str, group_size: int = 128, zero_point: bool = False, *,
    group: dist.ProcessGroup | None = None, **layer_kwargs: Any,
) -> nn.Module:  # fmt: skip
    """Quantize a whole nn.Linear (as MarlinLinear.from_linear does) and keep this rank's shard."""
    W = linear.weight.detach().to("cpu", torch.float32).numpy().T  # (K, N)
    dtype = "bfloat16" if linear.weight.dtype == torch.bfloat16 else "float16"
    qw = quantize(W, group_size, symmetric=not zero_point, dtype=dtype)
    layer_kwargs.setdefault("device", linear.weight.device)
    return parallel_layer(style, qw, None, linear.bias, group=group, **layer_kwargs)


def init(tp: int, device_type: str) -> dist.ProcessGroup:
    """Join the torchrun job of `tp` ranks (NCCL on GPUs, gloo on CPUs) and return its
    tensor-parallel group, from a one-dimensional DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(f"--tp {tp} needs {tp} processes (torchrun --nproc-per-node {tp} -m steps e2e --tp {tp}); this job has {world}")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    group = init_device_mesh(device_type, (tp,), mesh_dim_names=("tp",)).get_group("tp")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # NCCL warns of groups left open
    return group
