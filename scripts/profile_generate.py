"""Where the time of `python -m steps generate`'s eager decode goes, against the same model's
decode step replayed from a CUDA graph (the e2e benchmark's method).

Writes a synthetic Llama-2-7B-dims GPTQ checkpoint of LAYERS decoder layers, loads it with
load_quantized, decodes greedily twice (the second run has no first-use costs), profiles
three eager steps (host time per op: what a Python-driven decode pays per launch), and times
one decode step with a static KV cache captured in a CUDA graph.

Usage on the GPU: python scripts/profile_generate.py [LAYERS]"""

import sys
import tempfile
from pathlib import Path

import torch

from steps.torch import e2e, load_quantized
from steps.torch.generate import greedy_decode, write_synthetic_checkpoint

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
prompt = [1, 450, 7483, 310]
with tempfile.TemporaryDirectory() as scratch:
    write_synthetic_checkpoint(Path(scratch), "7b", layers)
    model = load_quantized(Path(scratch), torch.device("cuda"))
for run in (1, 2):
    generation = greedy_decode(model, prompt, 16, progress=False)
    print(f"eager decode, run {run}: {1e3 / generation.decode_tokens_per_s:.2f} ms per token ({layers} layers)")
activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=activities) as prof:
    greedy_decode(model, prompt, 4, progress=False)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
decoder = e2e.Decoder(model, 1, 64)
decoder.generate(torch.tensor([prompt], device="cuda"), 64 - len(prompt))
step = decoder.time_step("cuda")
print(f"decode step replayed from a CUDA graph: {step.median_us / 1e3:.2f} ms per token ({layers} layers)")
