"""Kernel table of the compiled decode step of both fused models (torch.profiler): where
the e2e breakdown's "rest" goes. Kernels, not wall time: launches are not replayed from a
CUDA graph here. Output committed under docs/results/e2e/profiles/.

Usage on the GPU: python scripts/profile_e2e_step.py DIMS LAYERS BATCH"""

import sys

import torch

from steps.torch import e2e

STEPS = 5

dims, layers, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = e2e.E2EConfig(dims=dims, layers=layers, fused=True)
models = e2e.build_models(config, "cuda")
for label, model in (("fp16", models.twin), ("quant", models.quant)):
    decoder = e2e.Decoder(model, batch, 64, compiled=True)
    decoder.generate(torch.randint(0, models.twin.config.vocab_size, (batch, 32), device="cuda"), 32)
    launch = decoder.last_position_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(STEPS):
            launch(i)
        torch.cuda.synchronize()
    print(f"== {label}, {dims} dims, {layers} layers, batch {batch}, {STEPS} steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
