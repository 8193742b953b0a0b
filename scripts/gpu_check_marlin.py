"""GPU check of the MARLIN rungs (s4, s5, s6): correctness, determinism, sanitizer runs, timing.

    python scripts/gpu_check_marlin.py check     # every Llama shape x group size, random M
    python scripts/gpu_check_marlin.py small     # small shapes (for compute-sanitizer)
    python scripts/gpu_check_marlin.py time      # K=33792, N=16896 at M = 1, 16, 32, 64

Correctness: each rung's output, written into a NaN-poisoned `out=`, must satisfy
reference.error_excess(C, A, W, step.error_c) <= 1. The reference is evaluated on a
sample of columns (the first and last 128 and 256 random ones) so the float64 product
stays cheap at M up to 1000 on the largest layers; every column is checked for NaN.
Each rung is run 10 times more and must be bit-identical. Timing uses steps.harness.timing
(CUDA-graph replay, weights rotated over copies larger than L2) against torch.matmul.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reference as ref  # noqa: E402
from reference.marlin_layout import pack_marlin_weights, permute_scales  # noqa: E402
from steps.registry import get  # noqa: E402
from steps.s5_async_pipeline import PipelinedStep  # noqa: E402
from steps.step import Packed  # noqa: E402

RUNGS = ("s4_marlin_layout", "s5_async_pipeline", "s6_marlin")
LLAMA_SHAPES = (
    (4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096),  # Llama-2 7B
    (5120, 15360), (5120, 5120), (5120, 27648), (13824, 5120),  # Llama-2 13B
    (8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192),  # Llama-2 70B
    (4096, 6144), (4096, 14336), (14336, 4096),  # Llama-3 8B
)
SMALL_SHAPES = ((256, 128), (384, 256), (1024, 512), (640, 384))


def packed_for_all(qw: ref.QuantizedWeight, words: np.ndarray) -> dict[str, Packed]:
    """One upload of the shared layout, wrapped for each rung (s6.pack also makes its workspace)."""
    import cupy

    s6 = get("s6_marlin")
    s6.workspace(cupy.cuda.Device().id, qw.N)
    arrays = {"qweight": cupy.asarray(words), "scales": cupy.asarray(permute_scales(qw.scales))}
    return {name: Packed(name, qw.K, qw.N, qw.group_size, arrays) for name in RUNGS}


def sub_weight(qw: ref.QuantizedWeight, cols: np.ndarray) -> ref.QuantizedWeight:
    return ref.QuantizedWeight(np.ascontiguousarray(qw.codes[:, cols]), np.ascontiguousarray(qw.scales[:, cols]), qw.group_size)


def check_case(rng, qw, packed, M, repeats=10, sms=None) -> list[str]:
    import cupy

    K, N = qw.K, qw.N
    A_host = rng.standard_normal((M, K)).astype(np.float16)
    A = cupy.asarray(A_host)
    cols = np.unique(np.concatenate([np.arange(min(128, N)), np.arange(max(0, N - 128), N), rng.integers(0, N, 256)]))
    W_sub = sub_weight(qw, cols)
    failures = []
    for name in RUNGS:
        step = get(name)
        if not step.supports(M, K, N, qw.group_size):
            continue
        if sms is not None and name == "s6_marlin":
            step.sms = sms
        out = cupy.full((M, N), np.nan, dtype=cupy.float16)
        step(A, packed[name], out=out)
        C = out.get()
        nan = int(np.count_nonzero(~np.isfinite(C)))
        excess = ref.error_excess(C[:, cols], A_host, W_sub, step.error_c)
        same = True
        for _ in range(repeats):
            again = cupy.full((M, N), np.nan, dtype=cupy.float16)
            step(A, packed[name], out=again)
            same &= bool((again.view(cupy.uint16) == out.view(cupy.uint16)).all())
        step.sms = None
        ok = nan == 0 and excess <= 1 and same
        line = f"{name:18s} M={M:4d} K={K:5d} N={N:5d} g={qw.group_size:4d}: excess={excess:.3f} nonfinite={nan} bit-identical={same}"
        print(("ok   " if ok else "FAIL ") + line, flush=True)
        if not ok:
            failures.append(line)
    return failures


def run_checks(shapes, groups, Ms, seed, repeats, sms=None) -> int:
    rng = np.random.default_rng(seed)
    failures, cases = [], 0
    for K, N in shapes:
        t0 = time.time()
        base = ref.random_quantized_weight(rng, K, N, -1)
        words = pack_marlin_weights(base)
        for g in groups:
            if g != -1 and K % g:
                continue
            qw = ref.random_quantized_weight(rng, K, N, g)
            qw = ref.QuantizedWeight(base.codes, qw.scales, g)
            packed = packed_for_all(qw, words)
            for M in (Ms if Ms else [int(rng.integers(1, 1001))]):
                failures += check_case(rng, qw, packed, M, repeats, sms)
                cases += 1
        print(f"  ({K}x{N}: {time.time() - t0:.1f} s)", flush=True)
    print(f"CHECK SUMMARY: {cases} (shape, group, M) cases x {len(RUNGS)} rungs, {len(failures)} failures", flush=True)
    for f in failures:
        print("  FAILED:", f)
    return len(failures)


def run_timing(Ms, group, sweep: bool) -> None:
    import torch

    from steps.harness.timing import measure

    K, N = 33792, 16896
    rng = np.random.default_rng(1)
    qw = ref.random_quantized_weight(rng, K, N, group)
    base = packed_for_all(qw, pack_marlin_weights(qw))["s6_marlin"].arrays
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    weight_bytes = sum(a.nbytes for a in base.values())
    copies = max(2, -(-4 * l2 // weight_bytes))
    arrays = [base] + [{k: v.copy() for k, v in base.items()} for _ in range(copies - 1)]
    W16 = [torch.from_numpy(ref.dequantize(qw)).cuda()]
    W16 += [W16[0].clone() for _ in range(max(1, -(-4 * l2 // W16[0].nbytes)) - 1)]
    print(f"device: {torch.cuda.get_device_name(0)}; {copies} weight copies of {weight_bytes / 1e6:.0f} MB, "
          f"{len(W16)} fp16 copies; group {group}", flush=True)
    variants = [(name, {}) for name in RUNGS]
    if sweep:
        variants = [("s3_tensor_cores", {})] + variants
        variants += [
            ("s6_marlin", {"max_stages": 4}),
            ("s6_marlin", {"max_stages": 6}),
            ("s6_marlin", {"tile_override": (128, 128), "smem_budget": 200 * 1024}),
            ("s6_marlin", {"tile_override": (256, 128), "smem_budget": 200 * 1024}),
            ("s6_marlin", {"tile_override": (256, 128), "smem_budget": 200 * 1024, "max_stages": 4}),
            ("s6_marlin", {"tile_override": (64, 256)}),
            ("s6_marlin", {"tile_override": (64, 256), "smem_budget": 200 * 1024}),
            ("s6_marlin", {"tile_override": (128, 256), "smem_budget": 200 * 1024}),
        ]
    print(f"{'M':>4} {'rung':18s} {'config':34s} {'us':>9} {'fp16 us':>9} {'speedup':>8} {'TB/s':>6}")
    for M in Ms:
        A = torch.randn(M, K, dtype=torch.float16, device="cuda")
        A_host = A.cpu().numpy()
        out = torch.empty(M, N, dtype=torch.float16, device="cuda")
        t16 = measure(lambda i: torch.matmul(A, W16[i % len(W16)]), len(W16))
        cols = rng.integers(0, N, 128)
        for name, overrides in variants:
            try:
                step = get(name)
            except KeyError:
                continue
            if not step.supports(M, K, N, group):
                continue
            saved = {k: getattr(step, k) for k in overrides}
            for k, v in overrides.items():
                setattr(step, k, v)
            if name in RUNGS:
                packs = [Packed(name, K, N, group, a) for a in arrays]
            else:  # an earlier rung for comparison, in its own layout
                own = step.pack(qw)
                packs = [own] + [Packed(name, K, N, group, {k: v.copy() for k, v in own.arrays.items()}) for _ in range(copies - 1)]
            out.fill_(float("nan"))
            step(A, packs[0], out=out)
            excess = ref.error_excess(out.cpu().numpy()[:, cols], A_host, sub_weight(qw, cols), step.error_c)
            t = measure(lambda i: step(A, packs[i], out=out), copies)
            cfg = step.config(M, K, N, group, 0) if isinstance(step, PipelinedStep) else None
            desc = f"{cfg.tile_k}x{cfg.tile_n} mb{cfg.m_blocks} st{cfg.stages} ef{int(cfg.evict_first)}" if cfg else "-"
            desc += f" sms{step.sms}" if getattr(step, "sms", None) else ""
            if name == "s6_marlin":
                _, iters, blocks = step.schedule(M, K, N, group, 0)
                desc += f" it{iters} b{blocks}"
            tbps = weight_bytes / (t.median_us * 1e-6) / 1e12
            print(f"{M:4d} {name:18s} {desc:34s} {t.median_us:9.1f} {t16.median_us:9.1f} {t16.median_us / t.median_us:8.2f} "
                  f"{tbps:6.2f}  (iqr {t.spread_pct:.1f}%, excess {excess:.2f}, {t.method})", flush=True)
            for k, v in saved.items():
                setattr(step, k, v)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["check", "small", "time"])
    p.add_argument("--M", type=int, nargs="*", default=None)
    p.add_argument("--groups", type=int, nargs="*", default=list(ref.GROUP_SIZES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.mode == "check":
        return int(run_checks(LLAMA_SHAPES + ((33792, 16896),), args.groups, args.M, args.seed, args.repeats) > 0)
    if args.mode == "small":
        Ms = args.M or [1, 5, 17, 64, 100]
        # sms=7 forces several blocks per column slice, so the locked reduction runs.
        return int(run_checks(SMALL_SHAPES, args.groups, Ms, args.seed, min(args.repeats, 1), sms=7) > 0)
    run_timing(args.M or [1, 16, 32, 64], args.groups[0] if len(args.groups) == 1 else 128, args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
