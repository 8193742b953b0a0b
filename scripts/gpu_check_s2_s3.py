"""GPU check of rungs s2 and s3: correctness against the reference, determinism, and a timing.

    python scripts/gpu_check_s2_s3.py check      # random and edge shapes, every s3 tile config, torch
    python scripts/gpu_check_s2_s3.py sanitize   # a few small shapes, no memory pool (for compute-sanitizer)
    python scripts/gpu_check_s2_s3.py time       # M in 1/16/64 on 33792 x 16896 (K x N): s1, s2, s3, cuBLAS fp16

Every product is written into an output pre-filled with NaN and must satisfy
reference.error_excess(C, A, W, 4) <= 1; a second run must be bit-identical.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import reference as ref
import steps
from steps.step import Packed

RUNGS = ("s2_smem_tiling", "s3_tensor_cores")


def product(step, A, packed):
    import cupy

    out = cupy.full((A.shape[0], packed.N), np.nan, dtype=np.float16)
    step(cupy.asarray(A), packed, out=out)
    return out.get()


def check_case(step, rng, M, K, N, g) -> tuple[bool, str]:
    qw = ref.random_quantized_weight(rng, K, N, g)
    A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    packed = step.pack(qw)
    C = product(step, A, packed)
    excess = ref.error_excess(C, A, qw, step.error_c)
    same = np.array_equal(C, product(step, A, packed), equal_nan=True)
    ok = excess <= 1.0 and same
    return ok, f"{step.name} M={M} K={K} N={N} g={g}: excess={excess:.3f} repeat_identical={same}"


def check() -> int:
    rng = np.random.default_rng(2024)
    failures = passes = 0
    cases = []
    # Edge shapes: K and N tails, M at every tile boundary, N wide enough for 128-column blocks.
    for M in (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 300):
        cases.append((M, 264, 33796, [-1, 32, 64, 128][M % 4]))
    for M, K, N in [(1, 8, 4), (3, 24, 12), (5, 136, 100), (7, 1000, 252), (20, 256, 516), (45, 520, 1028),
                    (300, 4096, 4096), (200, 1024, 4100)]:
        for g in ref.GROUP_SIZES:
            cases.append((M, K, N, g))
    # Random shapes.
    for _ in range(60):
        M = int(rng.integers(1, 301))
        K = int(rng.choice([64, 128, 256, 384, 512, 1024, 2048, 8 * int(rng.integers(1, 300))]))
        N = int(rng.choice([64, 128, 256, 512, 1024, 4 * int(rng.integers(1, 600))]))
        cases.append((M, K, N, int(rng.choice(ref.GROUP_SIZES))))
    s3 = steps.get("s3_tensor_cores")
    configs = set()
    for name in RUNGS:
        step = steps.get(name)
        for M, K, N, g in cases:
            if not step.supports(M, K, N, g):
                continue
            if step is s3:
                configs.add(s3.config(M, N))
            ok, line = check_case(step, rng, M, K, N, g)
            passes += ok
            failures += not ok
            if not ok:
                print("FAIL", line, flush=True)
    print(f"s3 tile configs exercised (m_tiles, block_n): {sorted(configs)}")
    if len(configs) != 6:
        print("FAIL: not every s3 configuration was exercised")
        failures += 1
    failures += check_torch()
    print(f"check: {passes} passed, {failures} failed", flush=True)
    return failures


def check_torch() -> int:
    import torch

    failures = 0
    rng = np.random.default_rng(5)
    qw = ref.random_quantized_weight(rng, 512, 256, 128)
    A_host = rng.standard_normal((19, 512)).astype(np.float16)
    for name in RUNGS:
        step = steps.get(name)
        packed = step.pack(qw)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            A = torch.from_numpy(A_host).cuda()
            C = step(A, packed)
        stream.synchronize()
        excess = ref.error_excess(C.cpu().numpy(), A_host, qw, step.error_c)
        ok = isinstance(C, torch.Tensor) and excess <= 1.0
        print(f"torch {name}: excess={excess:.3f} {'ok' if ok else 'FAIL'}")
        failures += not ok
    return failures


def sanitize() -> int:
    import cupy

    cupy.cuda.set_allocator(None)  # every array its own cudaMalloc, so memcheck sees its exact end
    rng = np.random.default_rng(1)
    failures = 0
    for name in RUNGS:
        step = steps.get(name)
        for M, K, N, g in [(1, 96, 36, 32), (17, 320, 196, 64), (45, 520, 132, -1), (1, 72, 16900, -1),
                           (130, 64, 16900, 32), (3, 128, 33796, 128), (20, 64, 33796, 32)]:
            ok, line = check_case(step, rng, M, K, N, g)
            print(("ok  " if ok else "FAIL ") + line, flush=True)
            failures += not ok
    return failures


def time_ms(fn, repeats: int, inner: int = 5) -> tuple[float, float]:
    """Median and best ms per call; `inner` back-to-back calls per event pair hide the host's launch cost."""
    import cupy

    fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / inner)
    return float(np.median(times)), float(np.min(times))


def timing() -> int:
    import cupy

    K, N, g = 33792, 16896, 128
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    rs = cupy.random.RandomState(0)
    qweight = rs.randint(-(2**31), 2**31 - 1, size=(K // 8, N), dtype=np.int64).astype(cupy.int32)
    scales = ((0.5 + rs.random_sample((K // g, N))) / (4 * np.sqrt(K))).astype(cupy.float16)
    shifts = cupy.arange(8, dtype=cupy.int32)[None, :, None] * 4
    codes = (qweight[:, None, :] >> shifts) & 0xF
    W16 = ((codes.reshape(K, N).astype(cupy.float32) - 8) * cupy.repeat(scales, g, axis=0).astype(cupy.float32)).astype(cupy.float16)
    del codes
    failures = 0
    for M in (1, 16, 64):
        A = rs.standard_normal((M, K)).astype(cupy.float16)
        expect = A @ W16
        base, _ = time_ms(lambda: A @ W16, 20)
        print(f"M={M:3d} cuBLAS fp16       {base * 1e3:9.1f} us")
        for name in ("s1_numba_naive",) + RUNGS:
            if name == "s1_numba_naive" and M != 16:
                continue
            step = steps.get(name)
            packed = Packed(name, K, N, g, {"qweight": qweight, "scales": scales})
            out = cupy.empty((M, N), cupy.float16)
            step(A, packed, out=out)
            err = float(cupy.max(cupy.abs(out.astype(cupy.float32) - expect.astype(cupy.float32))))
            scale = float(cupy.max(cupy.abs(expect.astype(cupy.float32))))
            med, best = time_ms(lambda: step(A, packed, out=out), *((3, 1) if name == "s1_numba_naive" else (20, 5)))
            gbs = packed.streamed_bytes / (med * 1e-3) / 1e9
            ok = err <= 1e-2 * scale
            failures += not ok
            print(
                f"M={M:3d} {name:17s} {med * 1e3:9.1f} us (min {best * 1e3:.1f})  {gbs:7.0f} GB/s  "
                f"x{base / med:.2f} vs fp16  max|diff| {err:.2e} of {scale:.2e} {'ok' if ok else 'FAIL'}",
                flush=True,
            )
        failures += time_s3_configs(A, qweight, scales, expect, K, N, g, base)
    return failures


def time_s3_configs(A, qweight, scales, expect, K, N, g, base) -> int:
    """Both column widths of s3 at this M, whatever the heuristic would pick."""
    import cupy

    from steps import s3_tensor_cores as s3
    from steps.s2_smem_tiling import group_shift

    M = A.shape[0]
    tiles = s3.m_tiles(M)
    failures = 0
    for bn in (s3.NARROW_N, s3.WIDE_N):
        out = cupy.empty((M, N), cupy.float16)
        grid = (-(-N // bn), -(-M // (16 * tiles)))
        args = (A, qweight, scales, out, np.int32(M), np.int32(K), np.int32(N), np.int32(group_shift(K, g)))
        kernel = s3._kernel(tiles, bn, 0)

        def launch():
            kernel(grid, (s3.THREADS,), args, shared_mem=s3.shared_bytes(tiles, bn))

        med, best = time_ms(launch, 20)
        err = float(cupy.max(cupy.abs(out.astype(cupy.float32) - expect.astype(cupy.float32))))
        ok = err <= 1e-2 * float(cupy.max(cupy.abs(expect.astype(cupy.float32))))
        failures += not ok
        gbs = (qweight.nbytes + scales.nbytes) / (med * 1e-3) / 1e9
        print(f"M={M:3d} s3 m_tiles={tiles} block_n={bn:3d} {med * 1e3:9.1f} us (min {best * 1e3:.1f})  {gbs:7.0f} GB/s  "
              f"x{base / med:.2f} vs fp16 {'ok' if ok else 'FAIL'}", flush=True)
    return failures


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    t0 = time.time()
    failed = {"check": check, "sanitize": sanitize, "time": timing}[mode]()
    print(f"{mode}: {'FAILED' if failed else 'PASSED'} in {time.time() - t0:.0f} s")
    sys.exit(1 if failed else 0)
