"""GPU check of rung s7 (Sparse-MARLIN): correctness on the Llama shapes, then timings.

Run from the repository root on a GPU machine:  PYTHONPATH=. python scripts/gpu_check_s7.py

(a) Correctness. Through the full Step path (pruning and packing on the host) on a few
    shapes, then on every Llama-2 7B / 70B linear-layer shape with group sizes -1 and 128
    and a random batch size in 1..1000. For the large shapes pruning and packing on the
    CPU would take minutes, so their weights are drawn directly in the packed form (random
    kept codes, random valid increasing positions, random scales) and only a random subset
    of 64-column chunks is decoded for the reference. Every output is NaN-poisoned first,
    fully checked for NaN, compared with reference_gemm(A, pruned weight) through
    reference.error_excess(..) <= 1 on the decoded columns, and re-run to be bit-identical.
(b) Timings at M = 1, 16, 32, 64, 128 on the ideal shape 33792 x 16896 (K x N): s7, s6 (if
    registered) and torch.matmul fp16, each rotating weight copies worth 4 L2 caches,
    timed by steps.harness.timing.measure (CUDA-graph replay, median).
Ends with a compact summary; exits non-zero if any check failed.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

import reference as ref
from reference import sparse_marlin as sm
from reference.marlin_layout import permute_scales, unpermute_scales
from steps import registry
from steps.step import Packed
from steps.harness.timing import measure

LLAMA_SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096),
                (8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]  # fmt: skip
IDEAL = (33792, 16896)
BATCHES = (1, 16, 32, 64, 128)
CHECK_CHUNKS = 4  # 64-column chunks decoded for the reference per large shape
REPEATS = 3
VALID_NIBBLES = np.array([a | b << 2 for a in range(4) for b in range(a + 1, 4)], dtype=np.uint32)


def random_packed(rng: np.random.Generator, K: int, N: int, group: int) -> dict[str, np.ndarray]:
    """Random arrays in s7's packed layout: any codes, valid increasing 2:4 positions."""
    words = rng.integers(0, 2**32, size=(K // 32, 2 * N), dtype=np.uint32).view(np.int32)
    nibbles = VALID_NIBBLES[rng.integers(0, len(VALID_NIBBLES), size=(K // 32, N, 8), dtype=np.uint8)]
    meta = np.bitwise_or.reduce(nibbles << (4 * np.arange(8, dtype=np.uint32)), axis=-1).view(np.int32)
    groups = K // ref.group_rows(group, K)
    scales = ((0.5 + rng.random((groups, N), dtype=np.float32)) / (4.0 * math.sqrt(K))).astype(np.float16)
    return {"qweight": words, "meta": meta, "scales": permute_scales(scales)}


def decode_chunks(arrays: dict[str, np.ndarray], K: int, group: int, chunks: np.ndarray):
    """The pruned QuantizedWeight restricted to the given 64-column chunks, and its columns."""
    words = np.concatenate([arrays["qweight"][:, 128 * b: 128 * (b + 1)] for b in chunks], axis=1)
    meta = np.concatenate([arrays["meta"][:, 64 * b: 64 * (b + 1)] for b in chunks], axis=1)
    scales = np.concatenate([arrays["scales"][:, 64 * b: 64 * (b + 1)] for b in chunks], axis=1)
    codes = sm.decompress_quantized_2_4(sm.unpack_sparse_weights(words), sm.unpack_sparse_metadata(meta))
    qw = ref.QuantizedWeight(codes, unpermute_scales(scales), group)
    cols = np.concatenate([np.arange(64 * b, 64 * (b + 1)) for b in chunks])
    return qw, cols


def run_checked(step, A_host, packed, reference_qw, cols) -> tuple[float, bool]:
    """(error ratio on the checked columns, bit-identical over repeats)."""
    import cupy

    M, N = A_host.shape[0], packed.N
    A = cupy.asarray(A_host)
    outs = []
    for _ in range(REPEATS):
        out = cupy.full((M, N), np.nan, dtype=cupy.float16)
        step(A, packed, out=out)
        outs.append(out.get())
    C = outs[0]
    if not np.all(np.isfinite(C)):
        return math.inf, False
    identical = all(np.array_equal(o.view(np.uint16), C.view(np.uint16)) for o in outs[1:])
    return ref.error_excess(C[:, cols], A_host, reference_qw, step.error_c), identical


def check_correctness(step, rng) -> list[tuple[str, float, bool]]:
    import cupy

    results = []
    # Through step.pack: pruning of an arbitrary (non-sparse) weight on the host.
    for K, N, group in [(4096, 4096, 128), (11008, 4096, -1), (1024, 768, 128)]:
        qw = ref.random_quantized_weight(rng, K, N, group)
        M = int(rng.integers(1, 1001))
        A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
        packed = step.pack(qw)
        err, same = run_checked(step, A, packed, step.reference_weight(qw), np.arange(N))
        results.append((f"pack {K}x{N} g{group} M={M}", err, same))
    # Every Llama shape, both group sizes, weights drawn in packed form.
    for K, N in LLAMA_SHAPES:
        for group in (-1, 128):
            arrays = random_packed(rng, K, N, group)
            packed = Packed(step.name, K, N, group, {k: cupy.asarray(v) for k, v in arrays.items()})
            step.workspace(packed.device, N)
            chunks = np.sort(rng.choice(N // 64, size=CHECK_CHUNKS, replace=False))
            qw, cols = decode_chunks(arrays, K, group, chunks)
            M = int(rng.integers(1, 1001))
            A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
            err, same = run_checked(step, A, packed, qw, cols)
            results.append((f"{K}x{N} g{group} M={M}", err, same))
            del packed
            cupy.get_default_memory_pool().free_all_blocks()
    return results


def copies_for(nbytes: int) -> int:
    import torch

    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, math.ceil(4 * l2 / nbytes))


def time_ideal(step, s6, rng) -> list[tuple[int, dict[str, float]]]:
    import cupy
    import torch
    from dataclasses import replace

    K, N = IDEAL
    group = 128
    arrays = random_packed(rng, K, N, group)
    sparse = Packed(step.name, K, N, group, {k: cupy.asarray(v) for k, v in arrays.items()})
    step.workspace(sparse.device, N)
    sparse_copies = [sparse] + [replace(sparse, arrays={k: v.copy() for k, v in sparse.arrays.items()})
                                for _ in range(copies_for(sparse.streamed_bytes) - 1)]  # fmt: skip
    dense_copies = []
    if s6 is not None:
        # s6 streams every code: random words are valid codes in its layout, and drawing them
        # directly skips minutes of host packing.
        dense_arrays = {"qweight": rng.integers(0, 2**32, size=(K // 16, 2 * N), dtype=np.uint32).view(np.int32),
                        "scales": arrays["scales"]}  # fmt: skip
        dense = Packed(s6.name, K, N, group, {k: cupy.asarray(v) for k, v in dense_arrays.items()})
        s6.workspace(dense.device, N)
        dense_copies = [dense] + [replace(dense, arrays={k: v.copy() for k, v in dense.arrays.items()})
                                  for _ in range(copies_for(dense.streamed_bytes) - 1)]  # fmt: skip
    W = torch.randn((K, N), dtype=torch.float16, device="cuda") / math.sqrt(K)
    fp16 = [W] + [W.clone() for _ in range(copies_for(W.nbytes) - 1)]
    rows = []
    for M in BATCHES:
        A = torch.randn((M, K), dtype=torch.float16, device="cuda")
        out = torch.empty((M, N), dtype=torch.float16, device="cuda")
        times = {"fp16": measure(lambda i: torch.matmul(A, fp16[i], out=out), len(fp16)).median_us}
        times["s7"] = measure(lambda i: step(A, sparse_copies[i], out=out), len(sparse_copies)).median_us
        if dense_copies:
            times["s6"] = measure(lambda i: s6(A, dense_copies[i], out=out), len(dense_copies)).median_us
        rows.append((M, times))
        print(f"  M={M:4d}  " + "  ".join(f"{k} {v:8.1f} us" for k, v in times.items()), flush=True)
    return rows


def main() -> int:
    import torch

    t0 = time.time()
    step = registry.get("s7_sparse_marlin")
    try:
        s6 = registry.get("s6_marlin")
    except KeyError:
        s6 = None
    print(f"{torch.cuda.get_device_name()}: checking {step.name}", flush=True)
    rng = np.random.default_rng(2024)
    results = check_correctness(step, rng)
    failures = 0
    for name, err, same in results:
        ok = err <= 1.0 and same
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:32s} error/bound {err:.3f}  bit-identical {same}", flush=True)
    print(f"correctness done in {time.time() - t0:.0f} s; timing {IDEAL[0]}x{IDEAL[1]}", flush=True)
    rows = time_ideal(step, s6, rng)

    print("\nsummary")
    print(f"  correctness: {len(results) - failures}/{len(results)} passed")
    header = f"  {'M':>4}  {'s7 us':>8}  {'s7 x fp16':>9}" + (f"  {'s6 us':>8}  {'s7 x s6':>7}" if s6 else "")
    print(header)
    for M, t in rows:
        line = f"  {M:>4}  {t['s7']:8.1f}  {t['fp16'] / t['s7']:9.2f}"
        if "s6" in t:
            line += f"  {t['s6']:8.1f}  {t['s6'] / t['s7']:7.2f}"
        print(line)
    print("  targets: s7 x fp16 >= 4.6 at M <= 16; s7 x s6 > 1 for every M <= 128")
    print(f"  total {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
