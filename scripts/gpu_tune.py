"""Tuning sweeps on the GPU: time configuration variants of the pipelined rungs on any shapes.

    python scripts/gpu_tune.py --shapes 4096x4096 8192x57344 --M 1 16 64 \
        --variants s5_async_pipeline s6_marlin s6_marlin:sms_per_sm=2 "s6_marlin:tile_override=(128,128)"

`--dtype bfloat16` runs activations, scales, output and the torch.matmul baseline in bf16.
A variant is a rung name, optionally followed by `:attr=value;...` that sets the step's
tuning attributes (`sms_per_sm` multiplies the device's SM count into `sms`). Weights
are random 32-bit words and random scales made on the GPU: speed does not depend on the
values, and correctness of every shipped configuration is the business of the tests and
gpu_check_marlin.py. Timing is steps.harness.timing.measure against torch.matmul in the same
process, weights rotated past L2 as in the benchmark.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference import group_rows  # noqa: E402
from steps._cuda import sm_count  # noqa: E402
from steps.registry import get  # noqa: E402
from steps.step import Packed  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        overrides[key] = ast.literal_eval(value)
    return name, overrides


def random_arrays(name: str, K: int, N: int, group: int, cupy) -> dict:
    """Device arrays of the rung's packed shapes, with random contents (bf16 scales are
    stored as their int16 bits, as Step.pack leaves them; fp16 ones are valid bf16 too)."""
    groups = K // group_rows(group, K)
    scales = (cupy.random.rand(groups, N) * 0.01 + 0.001).astype(cupy.float16).view(cupy.int16)
    if name == "s7_sparse_marlin":
        # Kept codes (2 bits a weight) and metadata (1 bit a weight); every 4-bit metadata
        # field must name two different rows, and 0x4 (rows 0 and 1) does.
        words = cupy.random.randint(-(2**31), 2**31 - 1, size=K * N // 16, dtype=cupy.int32)
        return {"qweight": words, "meta": cupy.full(K * N // 32, 0x44444444, dtype=cupy.int32), "scales": scales}
    return {"qweight": cupy.random.randint(-(2**31), 2**31 - 1, size=K * N // 8, dtype=cupy.int32), "scales": scales}


def rotated_packs(name: str, K: int, N: int, group: int, l2_bytes: int, cupy, dtype: str = "float16",
                  copies: int | None = None) -> list[Packed]:
    """Random packed weights of rung `name` and enough copies of them to cycle past L2 (at least
    two; `copies` fixes the number), as the benchmark rotates its weights."""
    base = random_arrays(name, K, N, group, cupy)
    if copies is None:
        copies = max(2, -(-4 * l2_bytes // sum(a.nbytes for a in base.values())))
    return [Packed(name, K, N, group, base, dtype)] + [
        Packed(name, K, N, group, {k: v.copy() for k, v in base.items()}, dtype) for _ in range(copies - 1)
    ]


def model_predecessor(A, on: bool):
    """(launch, its own time in us): with `on`, steps.harness.timing.after_another_kernel on the
    activations A, to put before each timed launch; without, nothing and 0."""
    from steps.harness.timing import after_another_kernel

    if not on:
        return (lambda: None), 0.0
    return after_another_kernel(A)


@contextlib.contextmanager
def attributes(step, values: dict):
    """The step with its tuning attributes set to `values` inside the block, restored after."""
    saved = {k: getattr(step, k) for k in values}
    for k, v in values.items():
        setattr(step, k, v)
    try:
        yield step
    finally:
        for k, v in saved.items():
            setattr(step, k, v)


def main() -> int:
    import cupy
    import torch

    from steps.harness.timing import measure

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["33792x16896"])
    p.add_argument("--M", type=int, nargs="+", default=[1, 16, 32, 64])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--variants", nargs="+", default=["s5_async_pipeline", "s6_marlin"])
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="activations, scales, output")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"device: {torch.cuda.get_device_name(0)}, {sm_count(0)} SMs; group {args.group}; {args.dtype}", flush=True)
    print(f"{'shape':>12} {'M':>4} {'variant':44s} {'config':30s} {'us':>8} {'matmul':>8} {'x matmul':>8} {'iqr%':>5}")
    for shape in args.shapes:
        K, N = map(int, shape.split("x"))
        W16 = [torch.randn(K, N, dtype=dtype, device="cuda") * 0.01]
        W16 += [W16[0].clone() for _ in range(max(1, -(-4 * l2 // W16[0].nbytes)) - 1)]
        packs: dict[str, list[Packed]] = {}
        for M in args.M:
            A = torch.randn(M, K, dtype=dtype, device="cuda")
            out = torch.empty(M, N, dtype=dtype, device="cuda")
            t16 = measure(lambda i: torch.matmul(A, W16[i % len(W16)]), len(W16))
            for text in args.variants:
                name, overrides = parse_variant(text)
                step = get(name)
                if not step.supports(M, K, N, args.group):
                    print(f"{shape:>12} {M:4d} {text:44s} unsupported", flush=True)
                    continue
                if name not in packs:
                    packs[name] = rotated_packs(name, K, N, args.group, l2, cupy, args.dtype)
                    if hasattr(step, "workspace"):
                        step.workspace(0, N)
                values = {k: v for k, v in overrides.items() if k != "sms_per_sm"}
                if "sms_per_sm" in overrides:
                    values["sms"] = int(overrides["sms_per_sm"] * sm_count(0))
                with attributes(step, values):
                    try:
                        if hasattr(step, "workspace"):
                            step.workspace(0, N)
                        ps = packs[name]
                        t = measure(lambda i: step(A, ps[i], out=out), len(ps))
                        cfg = step.config(M, K, N, args.group, 0, bf16=args.dtype == "bfloat16")
                        desc = f"{cfg.tile_k}x{cfg.tile_n} mb{cfg.m_blocks} st{cfg.stages}"
                        if hasattr(step, "schedule"):
                            _, iters, blocks = step.schedule(M, K, N, args.group, 0)
                            desc += f" it{iters} b{blocks}"
                        print(f"{shape:>12} {M:4d} {text:44s} {desc:30s} {t.median_us:8.1f} {t16.median_us:8.1f} "
                              f"{t16.median_us / t.median_us:7.2f} {t.spread_pct:5.1f}", flush=True)
                    except Exception as e:  # a variant that does not compile or launch: say so, go on
                        print(f"{shape:>12} {M:4d} {text:44s} FAILED: {type(e).__name__}: {e}", flush=True)
        packs.clear()
        W16.clear()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
