"""Workload for Nsight Compute: one call of each CUDA rung at M=16 on the ideal shape,
bracketed by cudaProfilerStart/Stop so `ncu --profile-from-start off` sees exactly those.

    ncu --profile-from-start off --clock-control none --csv --metrics ... python3 scripts/ncu_ladder.py
"""

import sys

import cupy
import numpy as np

import reference as ref
import steps
from steps.harness.bench import preset_shapes

M = int(sys.argv[1]) if len(sys.argv) > 1 else 16
names = sys.argv[2:] or ["s2_smem_tiling", "s3_tensor_cores", "s4_marlin_layout", "s5_async_pipeline", "s6_marlin", "s7_sparse_marlin"]
sms = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
((K, N),) = preset_shapes("ideal", sms)
rng = np.random.default_rng(0)
qw = ref.random_quantized_weight(rng, K, N, 128)
A = cupy.asarray(rng.standard_normal((M, K)).astype(np.float16))
for name in names:
    step = steps.get(name)
    packed = step.pack(qw)
    out = step(A, packed)  # warm-up: compilation and module load stay outside the profile
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.profilerStart()
    step(A, packed, out=out)
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.profilerStop()
    print(name, "profiled", flush=True)
    del packed
