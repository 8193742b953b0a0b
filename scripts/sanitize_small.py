"""Run every CUDA rung once on a few small shapes: the workload for compute-sanitizer.
The tall, narrow shapes have fewer tiles than SMs, so s6 and s7 split every column slice
between several blocks and their global reduction runs; rungs that take zero points get
them on every other shape. Rung names as arguments limit the run to those rungs."""

import sys

import numpy as np

import reference as ref
import steps

rng = np.random.default_rng(0)
for step in steps.STEPS:
    if sys.argv[1:] and step.name not in sys.argv[1:]:
        continue
    if step.host_arrays or not step.available():
        continue
    import cupy

    shapes = ((1, 256, 256, 128), (17, 512, 512, -1), (70, 1024, 256, 32), (5, 4096, 256, 128), (130, 2048, 512, 64))
    for i, (M, K, N, g) in enumerate(shapes):
        if not step.supports(M, K, N, g):
            continue
        # Every other shape with zero points, on the rungs that take them.
        qw = ref.random_quantized_weight(rng, K, N, g, symmetric=not (step.supports_zero_points and i % 2))
        A = rng.standard_normal((M, K)).astype(np.float16)
        C = step(cupy.asarray(A), step.pack(qw)).get()
        print(step.name, M, K, N, g, "error/bound", round(ref.error_excess(C, A, step.reference_weight(qw), step.error_c), 3))
