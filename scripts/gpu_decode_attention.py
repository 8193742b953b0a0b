"""Time formulations of one-token (decode) attention under torch.compile on the GPU.

    python scripts/gpu_decode_attention.py [--lengths 64 1024] [--candidates sdpa shipped]

The e2e benchmark's decode step spends, at Llama-2-7B dims, more time in attention over a
64-position cache than its K/V bytes explain (docs/results/e2e/profiles): SDPA picks a
prefill kernel for one query row. This script compiles each candidate of `CANDIDATES`
with fullgraph=True, checks it against float64 attention under a random-length mask and
times it with steps.harness.timing.measure, K/V rotated past L2 as in the e2e breakdown, and
prints the K/V floor (bytes at the measured read bandwidth) beside each time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    import torch.nn.functional as F

    from steps.harness.bench import copies_needed, describe_machine, measure_read_bandwidth
    from steps.torch.decode_attention import exact_attention
    from steps.torch.e2e import DIMS, grouped_decode_attention
    from steps.harness.timing import measure

    def sdpa(q, k, v, mask, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def matmuls(q, k, v, mask, scale):
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.matmul(p.to(v.dtype), v)

    def reductions(q, k, v, mask, scale):
        scores = (q.float().unsqueeze(3) * k.float().unsqueeze(2)).sum(-1) * scale
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(v.dtype)

    def shipped(q, k, v, mask, scale):  # steps.torch.e2e's function (on a GPU: steps.torch.decode_attention)
        B, Hkv, G, D = q.shape
        return grouped_decode_attention(q.reshape(B, Hkv * G, 1, D), k, v, mask, scale).view(B, Hkv, G, D)

    def flex(q, k, v, mask, scale):
        from torch.nn.attention.flex_attention import flex_attention

        B, Hkv, G, D = q.shape
        valid = mask.view(B, -1)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(valid[b, kv_idx], score, float("-inf"))

        out = flex_attention(q.reshape(B, Hkv * G, 1, D), k, v, score_mod=score_mod, scale=scale, enable_gqa=True)
        return out.view(B, Hkv, G, D)

    candidates = {"sdpa": sdpa, "matmuls": matmuls, "reductions": reductions, "flex": flex, "shipped": shipped}

    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--dims", nargs="+", default=["7b", "70b"])
    p.add_argument("--candidates", nargs="+", default=list(candidates), choices=list(candidates))
    args = p.parse_args()
    machine = describe_machine("cuda")
    read_gbps = measure_read_bandwidth("cuda")
    print(f"{machine.name}, torch {torch.__version__}, read bandwidth {read_gbps:.0f} GB/s", flush=True)
    print(f"{'dims':>4} {'B':>3} {'L':>5} {'candidate':>10} {'us':>8} {'iqr%':>5} {'floor us':>8} {'max err':>9}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dims in args.dims:
        H, Hkv = DIMS[dims]["num_attention_heads"], DIMS[dims]["num_key_value_heads"]
        D = DIMS[dims]["hidden_size"] // H
        for B in args.batches:
            for L in args.lengths:
                kv_bytes = 2 * B * Hkv * L * D * 2
                copies = copies_needed(kv_bytes, machine)
                q = torch.randn((B, Hkv, H // Hkv, D), device="cuda", dtype=torch.float16, generator=gen)
                kv = [torch.randn((2, B, Hkv, L, D), device="cuda", dtype=torch.float16, generator=gen)
                      for _ in range(copies)]  # fmt: skip
                lengths = torch.randint(1, L + 1, (B,), device="cuda", generator=gen)
                ragged = (torch.arange(L, device="cuda") < lengths[:, None]).view(B, 1, 1, L)
                full = torch.ones((B, 1, 1, L), dtype=torch.bool, device="cuda")
                scale = D**-0.5
                ref = exact_attention(q, kv[0][0], kv[0][1], ragged, scale)
                for name in args.candidates:
                    fn = candidates[name]
                    torch._dynamo.reset()
                    compiled = torch.compile(fn, fullgraph=True)
                    try:
                        err = (compiled(q, kv[0][0], kv[0][1], ragged, scale).double() - ref).abs().max().item()
                        t = measure(lambda i: compiled(q, kv[i][0], kv[i][1], full, scale), copies)
                    except Exception as e:  # a candidate this torch cannot compile: say so, go on
                        print(f"{dims:>4} {B:>3} {L:>5} {name:>10} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    floor = kv_bytes / (read_gbps * 1e3)
                    print(f"{dims:>4} {B:>3} {L:>5} {name:>10} {t.median_us:8.2f} {t.spread_pct:5.1f} {floor:8.2f} {err:9.2e}",
                          flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
