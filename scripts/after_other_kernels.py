"""Time rungs beside FP16 cuBLAS the way the benchmark does (launches back to back) and the way
a model runs them (each launch after another kernel), on any shapes and batch sizes.

    python scripts/after_other_kernels.py --shapes 4096x4096 11008x4096 --M 1 16 --rungs s6_marlin s8_hopper

In the benchmark every launch follows a launch of the same kernel, so rung 8's programmatic
dependent launch overlaps each one's start with the previous one's end. In a model a GEMM
follows a norm, an activation or attention, kernels that never let their dependents start
early. Here the second mode ("after") puts a kernel that rewrites the activations in place
(gpu_tune.model_predecessor) before every launch, FP16's too, and subtracts that kernel's own
time: what is left is the GEMM's cost in a model. Weights rotate past L2 as in the benchmark
(gpu_tune.rotated_packs).

    python scripts/after_other_kernels.py --fit docs/results/tuning/<file>.txt

reads such output back (any lines in its table format) and fits, per mode and batch size, each
rung's time as a fixed cost plus a cost per MB of int4 weight, by least squares over the shapes,
and where the first two rungs' lines cross: the weight size above which the second is faster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


def fit(path: str) -> None:
    """Print each rung's fixed cost and cost per MB, per mode and M, from printed output at `path`."""
    import re

    import numpy as np

    rungs, rows = None, []
    for line in Path(path).read_text().splitlines():
        words = line.split()
        if words[:1] == ["KxN"]:  # a table's header: this script's, or another's
            rungs = words[4:] if words[:4] == ["KxN", "M", "mode", "fp16"] else None
        m = re.match(r"\s*(\d+)x(\d+)\s+(\d+)\s+(\w+)\s+[\d.]+\s+(.*)$", line)
        if m and rungs:
            us = [float(u) for u in re.findall(r"([\d.]+) \(", m.group(5))]
            rows.append((int(m.group(1)) * int(m.group(2)) / 2e6, int(m.group(3)), m.group(4), us, tuple(rungs)))
    for mode, M, names in sorted({(r[2], r[1], r[4]) for r in rows}):
        sel = [r for r in rows if (r[2], r[1], r[4]) == (mode, M, names)]
        mb = np.array([r[0] for r in sel])
        lines = [np.polyfit(mb, [r[3][i] for r in sel], 1) for i in range(len(names))]
        text = ", ".join(f"{r} {b:.2f} us + {a:.3f} us/MB" for r, (a, b) in zip(names, lines))
        (a0, b0), (a1, b1) = lines[:2]
        print(f"{mode:6} M={M:<4} {len(sel)} shapes: {text}; level at {(b1 - b0) / (a0 - a1):.1f} MB")


def main() -> int:
    if sys.argv[1:2] == ["--fit"]:
        fit(sys.argv[2])
        return 0
    import cupy
    import torch

    from gpu_tune import model_predecessor, rotated_packs
    from steps.harness.timing import measure
    from steps.registry import get

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x12288", "11008x4096", "4096x22016"], help="KxN")
    p.add_argument("--M", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rungs", nargs="+", default=["s6_marlin", "s8_hopper"])
    args = p.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"device: {torch.cuda.get_device_name(0)}; group 128; fp16; us per launch (x = over FP16)")
    print(f"{'KxN':>12} {'M':>4} {'mode':6} {'fp16':>7} " + " ".join(f"{r:>18}" for r in args.rungs))
    for shape in args.shapes:
        K, N = map(int, shape.split("x"))
        packs = {r: rotated_packs(r, K, N, 128, l2, cupy) for r in args.rungs}
        for r in args.rungs:
            if hasattr(get(r), "workspace"):  # rungs with a global reduction: allocated outside the timing
                get(r).workspace(0, N)
        W16 = [torch.randn(K, N, dtype=torch.float16, device="cuda") * 0.01 for _ in range(2)]
        for M in args.M:
            A = torch.randn(M, K, dtype=torch.float16, device="cuda")
            out = torch.empty(M, N, dtype=torch.float16, device="cuda")
            for mode in ("b2b", "after"):
                before, before_us = model_predecessor(A, mode == "after")
                t16 = measure(lambda i: (before(), torch.matmul(A, W16[i % 2])), 2).median_us - before_us
                cells = []
                for r, ps in packs.items():
                    step = get(r)
                    us = measure(lambda i: (before(), step(A, ps[i % len(ps)], out=out)), len(ps)).median_us - before_us
                    cells.append(f"{us:8.1f} ({t16 / us:4.2f}x)")
                print(f"{shape:>12} {M:4d} {mode:6} {t16:7.1f} " + " ".join(f"{c:>18}" for c in cells), flush=True)
        del packs, W16
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
