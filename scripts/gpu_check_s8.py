"""GPU check of a rung against the reference over shapes, batch sizes, group sizes, zero
points and dtypes, on the full GPU and on two blocks per launch (every column slice then
split between blocks: the global reduction runs), with bit-identical repeats.

    python scripts/gpu_check_s8.py [variant ...]     (default: s8_hopper)

A variant is a rung name, optionally with tuning attributes as in gpu_tune.py
(`s8_hopper:producer_fences=True`).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference as ref  # noqa: E402
import steps  # noqa: E402
from gpu_tune import parse_variant  # noqa: E402
from steps._arrays import to_gpu, to_host  # noqa: E402

SHAPES = ((256, 256), (512, 768), (4096, 256), (1024, 4096))
BATCHES = (1, 5, 17, 33, 64, 130)


def main() -> int:
    rng = np.random.default_rng(1)
    failures = 0
    for variant in sys.argv[1:] or ["s8_hopper"]:
        name, overrides = parse_variant(variant)
        step = steps.get(name)
        for attribute, value in overrides.items():
            setattr(step, attribute, value)
        for (K, N), g, sms in itertools.product(SHAPES, (128, -1, 32, 64), (None, 2)):
            for i, M in enumerate(BATCHES):
                if not step.supports(M, K, N, g) or (K * N > 4096 * 4096 and M > 64):
                    continue
                dtype = "bfloat16" if (i + K // 256) % 3 == 2 and "bfloat16" in step.activation_dtypes else "float16"
                symmetric = not (step.supports_zero_points and (i + N // 256) % 2)
                qw = ref.random_quantized_weight(rng, K, N, g, symmetric=symmetric, dtype=dtype)
                A = rng.standard_normal((M, K)).astype(ref.element_dtype(dtype))
                step.sms = sms
                packed = step.pack(qw)
                outs = []
                for _ in range(3):
                    out = to_gpu(np.full((M, N), np.nan, dtype=A.dtype))
                    outs.append(to_host(step(to_gpu(A), packed, out=out)))
                step.sms = None
                excess = ref.error_excess(outs[0], A, step.reference_weight(qw), step.error_c)
                same = all(np.array_equal(o.view(np.uint16), outs[0].view(np.uint16)) for o in outs[1:])
                ok = excess <= 1 and same and not np.isnan(outs[0]).any()
                failures += not ok
                if not ok or M in (1, 64):
                    print(f"{'ok  ' if ok else 'FAIL'} {variant} M={M} K={K} N={N} g={g} {dtype} zp={not symmetric} "
                          f"sms={sms} error/bound={excess:.3f} repeat-identical={same}", flush=True)
    print(f"{failures} failures")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
