"""Fused projections and grouped decode attention, as serving engines run a Llama block.

transformers' Llama multiplies the hidden states by q, k and v one after another, and by
gate and up: five narrow GEMMs per block where serving engines launch two wide ones (one
weight stream each). A narrow layer pays a kernel's fixed costs (launch, pipeline fill,
reduction of shared slices) on few bytes, so `fuse_projections` rebuilds each block with
one q|k|v layer and one gate|up layer, and the fused attention's decode step reads each
k/v head once for its whole group of query heads (grouped_decode_attention; on a GPU a
Triton kernel, steps.torch.decode_attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

try:  # triton comes with GPU installs of torch; without it decode attention is SDPA's
    from .. import decode_attention as triton_decode
except ImportError:
    triton_decode = None



class FusedQKVAttention(nn.Module):
    """A transformers LlamaAttention whose q, k and v come out of one linear layer.

    Everything after the projection is transformers' own code path (rotary embedding,
    cache update, the configured attention function), called with the original module,
    which keeps o_proj and the attributes the attention functions read. Not kept:
    transformers' recording of attention weights (output_attentions), which hooks
    LlamaAttention modules; decoding does not ask for it."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        self.sizes = (q.out_features, k.out_features, v.out_features)
        self.qkv_proj = _concatenated(q, k, v)
        del attn.q_proj, attn.k_proj, attn.v_proj
        self.attn = attn

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):  # fmt: skip
        cache = cache if cache is not None else past_key_values  # the argument's name up to transformers 5.2x
        attn = self.attn
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q, k, v = [t.view(shape).transpose(1, 2) for t in self.qkv_proj(hidden_states).split(self.sizes, dim=-1)]
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        if q.shape[2] == 1 and not self.training and _groupable(attention_mask, q, k):
            out, weights = grouped_decode_attention(q, k, v, attention_mask, attn.scaling), None
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
            dropout = attn.attention_dropout if self.training else 0.0
            out, weights = attention(attn, q, k, v, attention_mask, dropout=dropout, scaling=attn.scaling, **kwargs)
        return attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _groupable(mask, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether grouped_decode_attention takes this mask: none, or 4-D (B or 1, 1 or H, 1, L)
    over exactly the cache's L positions (others go to transformers' attention)."""
    if mask is None:
        return True
    B, H = q.shape[:2]
    return mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H) and mask.shape[2] == 1 \
        and mask.shape[3] == k.shape[2]


def grouped_decode_attention(q, k, v, mask, scaling: float | None = None) -> torch.Tensor:
    """Attention of one new token: q (B, H, 1, D) over the cache k, v (B, Hkv, L, D), where
    each k/v head serves a group of G = H / Hkv query heads; returns (B, 1, H * D).

    The G query heads of a group become G query rows of one k/v head, so SDPA reads the cache
    once. transformers' SDPA path copies every k/v head G times first (repeat_kv) whenever
    it is given a mask (5.17) or, in versions that group one-token queries eagerly, still
    under torch.compile (5.24): a cost that grows with
    the batch and the cache and that serving engines do not pay (docs/results/e2e/profiles
    shows its kernels). A mask (B, 1 or H, 1, L) is shared by a query head's whole group.

    On a GPU with triton the grouped rows go to steps.torch.decode_attention, a decode kernel that
    reads the cache at close to the memory bandwidth; SDPA takes the rest (CPU, per-head
    masks, float masks)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    grouped = q.reshape(B, Hkv, H // Hkv, D)
    if q.is_cuda and triton_decode is not None and triton_decode.supports(grouped, k, v, mask):
        scale = scaling if scaling is not None else D**-0.5
        return triton_decode.decode_attention(grouped, k, v, mask, scale).reshape(B, 1, H * D)
    if mask is not None and mask.shape[1] != 1:
        mask = mask.expand(B, H, 1, mask.shape[-1]).reshape(B, Hkv, H // Hkv, mask.shape[-1])
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(B, 1, H * D)


def attention_kind(fused: bool, device: str) -> str:
    """What the decode steps' attention runs on: "transformers" (its SDPA path, unfused
    models), "triton" (grouped_decode_attention on steps.torch.decode_attention) or "grouped"
    (grouped_decode_attention on SDPA)."""
    if not fused:
        return "transformers"
    return "triton" if device == "cuda" and triton_decode is not None else "grouped"


class FusedGateUpMLP(nn.Module):
    """LlamaMLP with gate and up as one linear layer: down(act(gate(x)) * up(x))."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.intermediate_size = mlp.gate_proj.out_features
        self.gate_up_proj = _concatenated(mlp.gate_proj, mlp.up_proj)
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def _concatenated(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose outputs are those of `linears`, side by side."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused.requires_grad_(first.weight.requires_grad)


def fuse_projections(model: nn.Module) -> None:
    """Give every decoder block of a LlamaForCausalLM one q|k|v and one gate|up layer, in place."""
    for block in model.model.layers:
        # New modules start in training mode; the fused ones take the mode of those they replace.
        block.self_attn = FusedQKVAttention(block.self_attn).train(block.self_attn.training)
        block.mlp = FusedGateUpMLP(block.mlp).train(block.mlp.training)

