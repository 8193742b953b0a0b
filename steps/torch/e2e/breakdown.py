"""Where a decode step's time goes (measured, then subtracted).

"linear" is the sum over the replaced layers of one call at the decode shape (batch x K),
timed with measure per distinct (K, N) while rotating over the model's own layers of that
shape, each call after another kernel (harness.timing.after_another_kernel), as in the step,
where a norm, attention or an activation comes before every GEMM of a fused model (timed back
to back instead, rung 8's dependent launch would hide about 2 us of each launch's fixed cost
that the step pays, docs/rungs.md round 11, and "rest" would carry it). "attention" is
grouped_decode_attention over the full static cache (query 1, keys
max_cache_len, the boolean mask), timed per layer on enough copies of a layer's K/V to
stream them from memory, times the number of layers; "rest" is the step minus both (norms,
rotary, cache writes, lm_head, argmax, launch gaps, in unfused models transformers' copies
of grouped k/v heads, and in tensor-parallel models the collectives). Isolated kernels can
overlap or schedule differently in the step, so "rest" is an estimate.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig

from ...harness.bench import Machine, copies_needed
from ...harness.timing import after_another_kernel, measure
from .fusion import grouped_decode_attention


@torch.no_grad()
def linear_us(model: nn.Module, names: list[str], batch: int, device: str) -> float:
    """Sum over the named layers of one call at (batch, K): timed per (K, N), rotating over the layers."""
    by_shape: dict[tuple[int, int], list[nn.Module]] = {}
    for name in names:
        m = model.get_submodule(name)
        by_shape.setdefault((m.in_features, m.out_features), []).append(m)
    total = 0.0
    for (K, _), layers in by_shape.items():
        x = torch.randn((batch, K), dtype=torch.float16, device=device)
        before, before_us = after_another_kernel(x, device)
        total += (measure(lambda i: (before(), layers[i](x)), len(layers), device).median_us - before_us) * len(layers)
    return total


@torch.no_grad()
def attention_us(config: LlamaConfig, machine: Machine, batch: int, max_len: int) -> float:
    """SDPA over a full static cache of max_len positions, per layer, times the number of layers."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim
    device = machine.device
    q = torch.randn((batch, heads, 1, head_dim), dtype=torch.float16, device=device)
    mask = torch.ones((batch, 1, 1, max_len), dtype=torch.bool, device=device)
    kv_bytes = 2 * batch * kv_heads * max_len * head_dim * 2
    copies = min(config.num_hidden_layers, copies_needed(kv_bytes, machine))
    kv = [torch.randn((2, batch, kv_heads, max_len, head_dim), dtype=torch.float16, device=device) for _ in range(copies)]
    t = measure(lambda i: grouped_decode_attention(q, kv[i][0], kv[i][1], mask), copies, device)
    return t.median_us * config.num_hidden_layers

