"""Run every CUDA rung once on a few small shapes: the workload for compute-sanitizer.
The tall, narrow shapes have fewer tiles than SMs, so s6 and s7 split every column slice
between several blocks and their global reduction runs; rungs that take zero points get
them on every other shape, and rungs that take bf16 run every shape in fp16 and in bf16.
The striped rungs run the shapes once more on two blocks per launch, where their 256-wide
tiles serve them. Rung names as arguments limit the run to those rungs."""

import itertools
import sys

import numpy as np

import reference as ref
import steps
from steps._arrays import to_gpu, to_host


rng = np.random.default_rng(0)
for step in steps.STEPS:
    if sys.argv[1:] and step.name not in sys.argv[1:]:
        continue
    if step.host_arrays or not step.available():
        continue
    shapes = ((1, 256, 256, 128), (17, 512, 512, -1), (70, 1024, 256, 32), (5, 4096, 256, 128), (130, 2048, 512, 64))
    blocks = (None, 2) if hasattr(step, "sms") else (None,)
    for sms, dtype in itertools.product(blocks, step.activation_dtypes):
        if hasattr(step, "sms"):
            step.sms = sms
        for i, (M, K, N, g) in enumerate(shapes):
            if not step.supports(M, K, N, g):
                continue
            # Every other shape with zero points, on the rungs that take them.
            symmetric = not (step.supports_zero_points and i % 2)
            qw = ref.random_quantized_weight(rng, K, N, g, symmetric=symmetric, dtype=dtype)
            A = rng.standard_normal((M, K)).astype(ref.element_dtype(dtype))
            C = to_host(step(to_gpu(A), step.pack(qw)))
            excess = ref.error_excess(C, A, step.reference_weight(qw), step.error_c)
            print(step.name, dtype, M, K, N, g, f"blocks {sms}" if sms else "", "error/bound", round(excess, 3))
    if hasattr(step, "sms"):
        step.sms = None
