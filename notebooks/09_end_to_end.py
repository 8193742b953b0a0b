# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · End to end: a decoder with MARLIN layers
#
# *The ladder's last chapter: from one matrix product to a model.*

# %%
import os
from pathlib import Path

# Without a GPU, rung 1 runs in Numba's CUDA simulator; that must be chosen before Numba is imported.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import matplotlib.pyplot as plt
import numpy as np

import reference as ref
from steps.harness import notebook_support as nb

# %% [markdown]
# ## The plan
#
# A kernel is only useful inside a model. The last step of the project wraps the fastest rung
# in a `MarlinLinear` module (built from an `nn.Linear` or from GPTQ / AWQ tensors) that calls
# a `torch.library.custom_op` with a fake implementation, so it survives `torch.compile` and
# CUDA-graph capture; then every linear layer of a Llama-architecture decoder (built from a
# config with random weights — nothing is downloaded) is replaced and decode tokens/s is
# measured against FP16 for batch 1..128.
#
# ## What to expect
#
# Decoding one token reads every weight once. For Llama-2-7B's linear layers at the
# streaming-read bandwidth:

# %%
from steps.harness.bench import LLAMA_2_7B

layers = 32
fp16_bytes = layers * sum(2 * k * n for k, n in LLAMA_2_7B)
int4_bytes = layers * sum(nb.weight_bytes(k, n, 128) for k, n in LLAMA_2_7B)
gbps = nb.floor(4096, 4096).gbps
for name, b in (("fp16", fp16_bytes), ("int4 g128", int4_bytes)):
    ms = b / (gbps * 1e6)
    print(f"{name:10s} {b / 1e9:5.2f} GB per token -> {ms:.2f} ms -> at most {1e3 / ms:,.0f} tokens/s at batch 1")

# %% [markdown]
# Attention over the KV cache, norms, sampling and launch gaps do not shrink with the
# weights, so the end-to-end gain is lower than the per-layer one: the MARLIN paper reports
# about 2.8× in vLLM.
#
# ## The ladder so far
#
# The README's pictures, drawn here from the GPU results committed in `docs/results/`, the
# newest GPU first: every rung's speedup over FP16 by batch size, and where the speedup
# comes from at M = 16 (each bar one rung's idea, from the time before it to the time after
# it, on a log scale so that a bar's length is the factor it bought; the lines are the FP16
# time and the memory floors). Each rung has the same colour in both.

# %%
from IPython.display import Markdown, display

pictures = nb.stored_pictures()
for gpu, figures in pictures:
    display(Markdown(f"### {gpu}"), *figures)
if not pictures:
    print("No GPU results are stored in docs/results/ yet.")

# %% [markdown]
# ## The torch layer
#
# With torch installed, a small fp16 MLP gets its linear layers swapped for `MarlinLinear`
# (`steps.torch.layer`, on this machine's device: the fastest rung that runs there), and its
# output is compared to the original's. The difference is the 4-bit quantization of the
# weights, not the kernel.

# %%
import importlib.util

if importlib.util.find_spec("torch") is None:
    print("No torch here: nothing to swap in.")
else:
    import torch

    from steps.torch import layer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.SiLU(), torch.nn.Linear(2048, 1024)).half().to(device)
    x = torch.randn(16, 1024, dtype=torch.float16, device=device)
    with torch.no_grad():
        before = mlp(x)
        replaced = layer.replace_linear_layers(mlp)
        after = mlp(x)
    rel = ((after - before).float().norm() / before.float().norm()).item()
    print(f"replaced {replaced} with {[type(m).__name__ + ' on ' + m.step for m in mlp if hasattr(m, 'step')]}")
    print(f"relative difference of the output after 4-bit quantization: {rel:.3%}")

# %% [markdown]
# ## Measured end to end
#
# `python -m steps e2e` on the GPU (Llama-2-7B dimensions with all 32 layers, and Llama-2-70B
# dimensions with 8, 16 or 32 of its 80 layers; eager, compiled, and compiled with fused
# projections and grouped decode attention), stored in `docs/results/e2e/` and shown here from
# there:

# %%
stored = nb.REPO / "docs" / "results" / "e2e" / "README.md"
if stored.is_file():
    display(Markdown(stored.read_text().split("\n", 2)[2].replace("](e2e.png)", "](../docs/results/e2e/e2e.png)")))
else:
    print("No end-to-end results are stored in docs/results/e2e/ yet.")

# %% [markdown]
# Up to batch 16 the linear layers take about half the FP16 time or less; at batch 128 they
# are slower than FP16's, and so is the whole 7B model. At every batch size the *rest*
# column (norms, rotary embedding, cache writes, residual adds, the SiLU gate, lm_head and
# the gaps between these many small kernels) is the same in both models and is a large
# share of a 7B decode step, so the end-to-end gain is well below the linear layers' gain.
# The 70B layers are wider, so the rest is a smaller share and the end-to-end gain is
# larger. `--compile` (both models' decode step under `torch.compile`) fuses the small
# kernels of the rest, and `--fuse` gives every block one q|k|v and one gate|up layer, as
# serving engines run them, and lets each k/v head be read once for its group of query
# heads instead of copied for each (on a GPU with a small Triton decode kernel, faster than
# SDPA's kernel at these short caches): the tables marked so are where the quantized model
# comes closest to its layers' gain. What is left at larger batches is attention and the FP16
# `lm_head`, the same in both models (docs/torch_layer.md follows it kernel by kernel).
#
# ## Try this
#
# * `python -m steps bench --shapes llama-7b --batch 1 16 64` sums the four layers of the
#   model: compare its summed speedup with the estimate above.
# * Re-run the estimate for Llama-2-70B (`steps.harness.bench.LLAMA_2_70B`, 80 layers).
