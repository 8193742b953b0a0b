"""Decode attention for the e2e benchmark: one new token against a static KV cache, in Triton.

A decode step's attention reads a layer's K/V cache once and does almost no arithmetic,
so its floor is those bytes over the memory bandwidth. torch 2.11's SDPA picks kernels
built for long query blocks: at Llama-2-7B dims, batch 16 and a 64-position cache it
spends about 14 us a layer on 16.8 MB, 2.6x the read floor on an H100
(docs/results/e2e/profiles, scripts/gpu_decode_attention.py). Both models of the e2e
benchmark pay that alike; a serving engine pays a decode kernel instead.

Here one program takes one (sequence, k/v head) and, for long caches and few such pairs,
one split of the cache positions (flash-decoding), so that every SM has work. The G query
heads that share the k/v head are the rows of the program's tile (padded to 16, the
smallest tensor-core tile), so the cache is read once per k/v head. Over the program's
positions, BLOCK_L at a time, it keeps the running maximum, the running sum of
exponentials and the unnormalised output in fp32 (the online softmax); K and V of a block
are both requested before the scores are computed. With one split the program writes the
normalised output; with several, each writes its three partial results and torch ops
combine them (inductor fuses them under torch.compile).

Rounding: scores and sums are fp32; the probabilities are rounded to the cache's dtype
for the product with V (as in flash attention), so the output is within a few units of
roundoff times max |V| of exact attention (`error_bound`).

`decode_attention` is a torch custom op (torch.library.triton_op), so torch.compile
(fullgraph=True) traces through it and CUDA graphs capture its launches. Importing this
module needs triton, which GPU installs of torch bring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._cuda import sm_count

BLOCK_L = 64  # cache positions per step of a program
MIN_ROWS = 16  # tl.dot's smallest tile height: the G query rows are padded to it


@triton.jit
def _decode_attention_kernel(
    Q, K, V, Mask, Out, Stats,
    kv_heads, G, L, chunk, scale,
    sq_b, sq_h, sq_g, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, so_s, so_b, so_h, so_g,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    row = g < G
    q = tl.load(Q + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :], mask=row[:, None], other=0.0)
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    for l0 in range(start, end, BLOCK_L):
        pos = l0 + tl.arange(0, BLOCK_L)
        inside = pos < end
        k = tl.load(K + b * sk_b + h * sk_h + pos[:, None] * sk_l + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + pos[:, None] * sv_l + d[None, :], mask=inside[:, None], other=0.0)
        keep = inside
        if HAS_MASK:
            keep = keep & (tl.load(Mask + b * sm_b + pos, mask=inside, other=0) != 0)
        scores = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # inductor passes the float scale as fp64
        scores = tl.where(keep[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # A row with no kept position yet has max -inf; exponentiate against 0 so it stays 0, not NaN.
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - pivot)
        p = tl.exp(scores - pivot[:, None])
        running_sum = running_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        running_max = new_max
    at = split * so_s + b * so_b + h * so_h + g * so_g
    if SPLIT:
        tl.store(Out + at[:, None] + d[None, :], acc, mask=row[:, None])
        tl.store(Stats + 2 * (at // D), running_max, mask=row)
        tl.store(Stats + 2 * (at // D) + 1, running_sum, mask=row)
    else:
        tl.store(Out + at[:, None] + d[None, :], (acc / running_sum[:, None]).to(Out.dtype.element_ty), mask=row[:, None])


def cache_splits(pairs: int, L: int, sms: int) -> tuple[int, int]:
    """(splits, chunk): how many programs share each of `pairs` (sequence, k/v head) pairs
    over L cache positions, and the positions each takes (a multiple of BLOCK_L): enough
    for about two programs per SM, never a split without a block of positions."""
    blocks = triton.cdiv(L, BLOCK_L)
    splits = max(1, min(triton.cdiv(2 * sms, pairs), blocks))
    chunk = BLOCK_L * triton.cdiv(blocks, splits)
    return triton.cdiv(L, chunk), chunk


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel takes these operands (else the caller uses SDPA): q (B, Hkv, G, D)
    and k, v (B, Hkv, L, D) of one float16/bfloat16 dtype with D a power of two from 16 to
    256, and a boolean mask (B or 1, 1, 1, L) or none."""
    D = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if D < 16 or D > 256 or D & (D - 1) or k.shape != v.shape or k.shape[-1] != D or k.shape[:2] != q.shape[:2]:
        return False
    if mask is None:
        return True
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, q.shape[0]) \
        and mask.shape[1:3] == (1, 1) and mask.shape[3] == k.shape[2]


def launch(q, k, v, mask, scale: float, out: torch.Tensor, kernel=_decode_attention_kernel) -> torch.Tensor:
    """Attention of q (B, Hkv, G, D) over k, v (B, Hkv, L, D) into `out` (q's shape and dtype, contiguous).
    `kernel` is the Triton kernel, wrapped (wrap_triton) when called inside the custom op."""
    B, Hkv, G, D = q.shape
    L = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    splits, chunk = cache_splits(B * Hkv, L, sm_count(q.device.index))
    if splits == 1:
        target, stats = out, out  # Stats is not touched without SPLIT
    else:
        target = torch.empty((splits, B, Hkv, G, D), dtype=torch.float32, device=q.device)
        stats = torch.empty((splits, B, Hkv, G, 2), dtype=torch.float32, device=q.device)
    if mask is not None:
        rows = mask.reshape(mask.shape[0], L)
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        mask_arg, mask_stride = rows, rows.stride(0) if mask.shape[0] > 1 else 0
    else:
        mask_arg, mask_stride = q, 0  # a placeholder pointer, never read without HAS_MASK
    so = target.stride()[:4] if splits > 1 else (0, *target.stride()[:3])
    kernel[(B * Hkv, splits)](
        q, k, v, mask_arg, target, stats, Hkv, G, L, chunk, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], mask_stride, *so,
        HAS_MASK=mask is not None, SPLIT=splits > 1, BLOCK_G=max(MIN_ROWS, triton.next_power_of_2(G)),
        BLOCK_L=BLOCK_L, D=D, num_warps=4,
    )  # fmt: skip
    if splits > 1:
        top = stats[..., 0].amax(0)
        weight = torch.exp(stats[..., 0] - top)
        total = (weight * stats[..., 1]).sum(0)
        out.copy_(((weight.unsqueeze(-1) * target).sum(0) / total.unsqueeze(-1)).to(out.dtype))
    return out


@triton_op("marlin_ladder::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """Attention of q (B, Hkv, G, D) over the cache k, v (B, Hkv, L, D): each k/v head serves
    its G query rows; mask (B or 1, 1, 1, L) bool, True where a position counts, or None.
    Returns (B, Hkv, G, D) in q's dtype. Operands as `supports` accepts them."""
    return launch(q, k, v, mask, scale, q.new_empty(q.shape), wrap_triton(_decode_attention_kernel))


def exact_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """The specification in float64: softmax(q k^T * scale, masked) v, for decode_attention's
    operands (q (B, Hkv, G, D), k, v (B, Hkv, L, D), mask (B or 1, 1, 1, L) or None)."""
    scores = torch.einsum("bhgd,bhld->bhgl", q.double(), k.double()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", scores.softmax(-1), v.double())


def error_bound(v: torch.Tensor) -> float:
    """Bound on |output - exact_attention|: the probabilities' rounding to v's dtype (at most
    one unit roundoff of each weight, which sum to 1) and the output's own rounding, each
    at most u * max |V|, doubled for the fp32 sums."""
    u = torch.finfo(v.dtype).eps / 2
    return 4 * u * float(v.abs().max())
