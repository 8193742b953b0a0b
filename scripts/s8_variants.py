"""Time variants of rung 8 on the GPU, beside FP16 cuBLAS, on any shapes and batch sizes.

    python scripts/s8_variants.py --shapes 33792x16896 4096x4096 --M 1 16 64 \
        --variants base stream-only mma_sync_max_rows=64

A variant is `base` (the shipped kernel and choices), an ablation -- `stream-only` (the
consumers wait for each slot and hand it straight back, so the time is what the producer and
the ring deliver: the kernel's floor as built), `compute-only` (the producer hands over
slots without copying weights or scales into them, so the time is what the consumers cost
when their data is always there), `no-dequant` (the consumers multiply the raw weight words
instead of dequantizing them: what the kernel would take with consumers that much faster),
`no-activation-copies` (where the producer's 128 threads copy the activations with cp.async,
at 49-64 rows or with tma_activations=0: they copy none and only arrive, what their copies
cost), `busy-stream` (stream-only, but each consumer warp then does about a tile's worth of
dequantization's arithmetic with no memory access: does arithmetic alone slow the stream?),
`early-release` (each consumer warp hands a slot back as soon as its data has landed and
then works on it, wrongly, while the producer may refill it: what the kernel would take if
the consumers held no slot while they work), `no-reduce` (every block writes its sums
straight to the output, wrongly, without the partial sums across blocks: what the global
reduction costs), `launch-only` (the blocks return once their barriers are set up: the fixed
cost of launching this kernel) or `first-arrives-last` (a check: each run's first segment
counts in after a long wait, so the path where that late arrival adds the slice runs; its
output must equal base's bit for bit) -- `src:NAME` (the kernel compiled from csrc/NAME.cu,
e.g. an earlier commit's s8_hopper.cu written there), or `attr=value` (a tuning attribute of
the step, e.g. mma_sync_max_rows, max_stages); or several of these joined by commas, e.g.
`stream-only,max_stages=4`. Each variant's output is compared with the first's: `bitwise`
where the arithmetic is the same. With --between, every launch (FP16's too) follows a kernel
that rewrites the activations in place and knows nothing of dependent launches, as a GEMM in
a model follows a norm or an activation: then no launch overlaps the one before it, and the
printed times are the GEMM's alone (the in-between kernel's own time, measured alone,
subtracted). Weights are random words (speed does not depend on them); correctness is the
tests' business. With --profile each variant runs once between cudaProfilerStart/Stop, for
`ncu --profile-from-start off` (scripts/ncu_source_summary.py reads its source page). With
--soak S each variant, and FP16 cuBLAS, is also replayed for S seconds while nvidia-smi
samples the SM clock, the power draw and the clock-limit reasons (is the kernel slowed by
its power draw?).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

_WAIT = "    hopper::mbarrier_wait(ring.full(slot), phase);\n"
_EXPECT = "  hopper::mbarrier_arrive_expect_bytes(ring.full(s), W_BYTES + S_BYTES + Z_BYTES);\n"
_WEIGHTS = "#pragma unroll\n    for (int r = 0; r < K16_STEPS; ++r)\n"
_TMA_WEIGHTS = "    hopper::tensor_copy_evict_first(stage + A_BYTES, w_map,"
_SCALES = "#pragma unroll\n  for (int r = 0; r < S_ROWS; ++r) {\n"
_REDUCE = "  if (seg.contributors == 1) return true;\n"
_ROLES = "  if (threadIdx.x >= s8::CONSUMER_THREADS) {\n"
_DEQUANT = "    if constexpr (kScaled) marlin::dequantize_tile<ZERO_POINTS != 0, Element>(x.w[j], x.s[j], left, right, x.z[j]);\n"
_HOLD_WGMMA = "      held = slot;\n"
_RELEASE_MMA = "      __syncwarp();  // every lane's reads of the slot are done: one arrival releases them all\n"
_ARRIVE_MMA = "      hopper::mbarrier_arrive_if(ring.empty(slot), lane == 0);\n"
# About a tile's worth of the dequantization's arithmetic (~300 instructions a warp), with no memory access.
_ALU = (
    "    float f0 = lane, f1 = f0 + 1, f2 = f0 + 2, f3 = f0 + 3;\n"
    "    for (int i = 0; i < 75; ++i)\n"
    '      asm volatile("fma.rn.f32 %0, %0, %0, %0; fma.rn.f32 %1, %1, %1, %1; fma.rn.f32 %2, %2, %2, %2; "\n'
    '                   "fma.rn.f32 %3, %3, %3, %3;" : "+f"(f0), "+f"(f1), "+f"(f2), "+f"(f3));\n'
    '    if (f0 + f1 + f2 + f3 == 1.2345f) acc[0][0][0].v[0] = 1.f;\n'
)
_ACTIVATIONS = "      marlin::cp_async16_zfill(a_here + 1024 * c,"
_FIRST = "  partials.store(acc);\n  sync.sync();  // every thread's stores before thread 0's release\n"
# Each ablation: text of csrc/s8_hopper.cu and what replaces it.
ABLATIONS = {
    "stream-only": {_WAIT: _WAIT + "    hopper::mbarrier_arrive_if(ring.empty(slot), lane == 0);\n    return;\n"},
    "compute-only": {
        _EXPECT: "  hopper::mbarrier_arrive_expect_bytes(ring.full(s), 0);\n",
        _WEIGHTS: "    if (false)\n" + _WEIGHTS,
        _TMA_WEIGHTS: "    if (false)\n" + _TMA_WEIGHTS,
        _SCALES: "  if (false)\n" + _SCALES,
    },
    "no-reduce": {_REDUCE: "  return true;\n"},
    "no-activation-copies": {_ACTIVATIONS: "      if (false)\n" + _ACTIVATIONS},
    "busy-stream": {_WAIT: _WAIT + "    hopper::mbarrier_arrive_if(ring.empty(slot), lane == 0);\n" + _ALU + "    return;\n"},
    # Results are garbage: the producer may refill a slot while the consumers still read it.
    "early-release": {
        _WAIT: _WAIT + "    hopper::mbarrier_arrive_if(ring.empty(slot), lane == 0);\n",
        _HOLD_WGMMA: "      held = -1;\n",
        _RELEASE_MMA + _ARRIVE_MMA: _RELEASE_MMA,
    },
    "no-dequant": {_DEQUANT: "    left = right = FragB{{x.w[j], x.w[j]}};\n    if constexpr (false)\n" + _DEQUANT},
    "launch-only": {_ROLES: "  if (M > 0) return;\n" + _ROLES},
    # A check, not a timing: every run's first segment waits ~0.2 ms before it stores and counts in,
    # so its arrival comes last and the block adds that slice at the end of its run.
    "first-arrives-last": {_FIRST: "  for (const long long t0 = clock64(); clock64() - t0 < 400000;) {\n  }\n" + _FIRST},
}


def ablated(name: str, source: str, of: str = "s8_hopper") -> str:
    """`source` (the text of csrc/<of>.cu) with ablation `name` applied."""
    for old, new in ABLATIONS[name].items():
        if source.count(old) != 1:
            raise SystemExit(f"csrc/{of}.cu changed: update the {name} ablation's anchors")
        source = source.replace(old, new)
    return source


def write_ablation_source(name: str, of: str = "s8_hopper") -> str:
    """csrc/<of>.cu with ablation `name` applied, as csrc/<of>_<name>.cu; its kernel source name."""
    source = ablated(name, (ROOT / "csrc" / f"{of}.cu").read_text(), of)
    stem = f"{of}_{name.replace('-', '_')}"
    path = ROOT / "csrc" / f"{stem}.cu"
    path.write_text(source)
    atexit.register(path.unlink, missing_ok=True)
    return stem


def soak(launch, copies: int, seconds: float) -> str:
    """Replay `launch(i)` (a CUDA graph of every copy, again and again) for `seconds` while nvidia-smi
    samples every 100 ms; the medians of the second half of the samples (after the clocks settle)."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(max(copies, 32)):
            launch(i % copies)
    query = "clocks.sm,clocks.mem,power.draw,clocks_event_reasons.active"
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    smi.terminate()
    rows = [line.split(", ") for line in smi.communicate()[0].splitlines() if line.count(",") == 3]
    rows = rows[len(rows) // 2:]
    if not rows:
        return "nvidia-smi gave no samples"
    sm, mem, power = (statistics.median(float(r[i]) for r in rows) for i in range(3))
    reasons = sorted({r[3].strip() for r in rows})
    return f"SM {sm:.0f} MHz, memory {mem:.0f} MHz, {power:.0f} W, clock-limit reasons {' '.join(reasons)}"


def main() -> int:
    import cupy
    import torch

    import steps.s8_hopper as s8
    from gpu_tune import attributes, model_predecessor, rotated_packs
    from steps._cuda import get_kernel
    from steps.harness.timing import measure
    from steps.registry import get

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["33792x16896"], help="KxN")
    p.add_argument("--M", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--variants", nargs="+", default=["base", "stream-only"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--between", action="store_true", help="a non-dependent kernel before every launch (see above)")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of replay per variant with nvidia-smi sampling")
    args = p.parse_args()

    source = {"name": "s8_hopper"}

    @functools.cache
    def load(name: str, cfg, device: int):
        kernel = get_kernel(name, "s8_hopper", cfg.defines(), device=device, arch_specific=True)
        kernel.max_dynamic_shared_size_bytes = cfg.smem_bytes
        return kernel

    s8._load = lambda _name, cfg, device: load(source["name"], cfg, device)
    step = get("s8_hopper")
    step.first_run_check = lambda *a, **k: None  # ablations are wrong on purpose
    parts = {v: v.split(",") for v in args.variants}
    names = {}  # variant -> kernel source name
    for v in args.variants:
        srcs = [p.removeprefix("src:") for p in parts[v] if p.startswith("src:")]
        names[v] = srcs[0] if srcs else "s8_hopper"
        for a in (p for p in parts[v] if p in ABLATIONS):
            names[v] = write_ablation_source(a, names[v])
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"device: {torch.cuda.get_device_name(0)}; group 128; fp16" + ("; after a non-dependent kernel" if args.between else ""))
    print(f"{'KxN':>12} {'M':>4} {'variant':32s} {'us':>8} {'fp16':>8} {'x':>6} {'iqr%':>5} {'GB/s':>6} vs first")
    for shape in args.shapes:
        K, N = map(int, shape.split("x"))
        packs = rotated_packs("s8_hopper", K, N, 128, l2, cupy, copies=1 if args.profile else None)
        nbytes = packs[0].streamed_bytes
        step.workspace(0, N)
        for M in args.M:
            A = torch.randn(M, K, dtype=torch.float16, device="cuda")
            t16 = None
            before, before_us = model_predecessor(A, args.between)
            if not args.profile:
                W16 = [torch.randn(K, N, dtype=torch.float16, device="cuda") * 0.01 for _ in range(2)]
                t16 = measure(lambda i: (before(), torch.matmul(A, W16[i % 2])), 2).median_us - before_us
                if args.soak:
                    print(f"{shape:>12} {M:4d} {'fp16 (cuBLAS)':32s} {t16:8.1f}", flush=True)
                    print(f"{'':>17} soak: {soak(lambda i: torch.matmul(A, W16[i % 2]), 2, args.soak)}", flush=True)
                del W16
            first = None
            for variant in args.variants:
                source["name"] = names[variant]
                attrs = {}
                for part in parts[variant]:
                    if part in ABLATIONS or part.startswith("src:"):
                        continue
                    if "=" in part:
                        key, value = part.split("=")
                        attrs[key] = int(value)
                    elif part != "base":
                        raise SystemExit(f"unknown variant part {part!r}")
                with attributes(step, attrs):
                    out = torch.zeros(M, N, dtype=torch.float16, device="cuda")
                    step(A, packs[0], out=out)
                    torch.cuda.synchronize()
                    if args.profile:
                        cupy.cuda.runtime.profilerStart()
                        step(A, packs[0], out=out)
                        torch.cuda.synchronize()
                        cupy.cuda.runtime.profilerStop()
                        print(f"profiled {shape} M={M} {variant}", flush=True)
                        continue
                    if first is None:
                        first, check = out.clone(), "-"
                    else:
                        diff = (out.float() - first.float()).abs().max().item()
                        check = "bitwise" if torch.equal(out, first) else f"max diff {diff:.3g}"
                    t = measure(lambda i: (before(), step(A, packs[i % len(packs)], out=out)), len(packs))
                    us = t.median_us - before_us
                    print(f"{shape:>12} {M:4d} {variant:32s} {us:8.1f} {t16:8.1f} {t16 / us:6.2f} "
                          f"{t.spread_pct:5.1f} {nbytes / us / 1e3:6.0f} {check}", flush=True)
                    if args.soak:
                        print(f"{'':>17} soak: {soak(lambda i: step(A, packs[i % len(packs)], out=out), len(packs), args.soak)}",
                              flush=True)
        packs.clear()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
