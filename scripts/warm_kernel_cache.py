"""Compile every shipped kernel variant into CuPy's kernel cache, many at a time.

The GPU tests, sanitizers and benchmarks each compile on first use, one variant after
another in their own process; on a fresh lent machine that is minutes of NVRTC. This fills
the cache (CUPY_CACHE_DIR) first, one process per CPU, from the same list of variants that
tests/test_nvcc.py checks with nvcc. Usage: python3 scripts/warm_kernel_cache.py [source ...]
(sources such as s8_hopper limit it to their variants).
"""

import concurrent.futures
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from test_nvcc import HOPPER_ONLY, shipped_variants  # noqa: E402


def compile_variant(variant) -> str:
    from steps._cuda import load_module

    source, defines = variant
    start = time.perf_counter()
    load_module(source, defines, 0, arch_specific=f"{source}.cu" in HOPPER_ONLY)
    return f"{source} {time.perf_counter() - start:.1f} s"


if __name__ == "__main__":
    variants = [v for v in shipped_variants() if not sys.argv[1:] or v[0] in sys.argv[1:]]
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # no CUDA state is forked
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
        times = list(pool.map(compile_variant, variants))
    print(f"{len(times)} variants in {time.perf_counter() - start:.0f} s; slowest: {max(times, key=lambda t: float(t.split()[1]))}")
