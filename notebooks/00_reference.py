# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The reference: what every rung computes
#
# *Rung `s0_numpy` of the marlin-ladder.* This is the first rung.

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

# %%
nb.rung_status("s0_numpy")

# %% [markdown]
# ## The idea
#
# A large language model generating text multiplies a handful of activation rows `A` (M×K,
# one row per sequence in the batch) by every weight matrix `W` (K×N) of the model, once per
# token. With M between 1 and a few dozen there is almost no arithmetic per weight: each
# weight is read from memory, used M times, and thrown away. The time is the time to *read
# the weights*. Storing them in 4 bits instead of 16 therefore promises up to 4× — if a
# kernel can turn those 4 bits back into fp16 numbers without slowing the stream down.
#
# This chapter defines the function every rung computes. A weight is a 4-bit code `q` in
# 0..15 and a scale `s` shared by a group of 128 rows of one column:
#
#     W[k, n] = fp16((q[k, n] - 8) · s[k // 128, n])
#
# and `C = A @ W`, computed by the reference in float64 with one rounding to fp16 at the end.
# `s0_numpy` does exactly this with NumPy: unpack, dequantize, one matrix product.

# %% [markdown]
# ## Quantizing a weight matrix
#
# Round-to-nearest, one fp16 scale per 64 rows here so the groups are visible:

# %%
rng = np.random.default_rng(0)
W = rng.standard_normal((256, 8)).astype(np.float32) * np.linspace(0.2, 2.0, 256)[:, None]
qw = ref.quantize(W, group_size=64)
W_deq = ref.dequantize(qw)

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [3, 1]})
a.plot(W[:, 0], lw=0.8, label="original w")
a.step(range(256), W_deq[:, 0], lw=0.8, where="mid", label="fp16((q - 8)·s)")
for g in range(0, 256, 64):
    a.axvline(g, color="grey", lw=0.5)
a.set(xlabel="row k (group boundaries in grey)", title="one column: 15 levels per group, spaced by its scale")
a.legend(fontsize=8)
nb.draw_grid(b, qw.codes[:64], "codes q of rows 0-63 (0..15)", cmap="viridis")
plt.show()
print("scales of column 0, one per group:", qw.scales[:, 0])

# %% [markdown]
# The codes travel packed, eight to a 32-bit word along K: word `(r, n)` holds rows `8r..8r+7`
# of column `n`, row `8r+i` in bits `4i..4i+3`. This is also how GPTQ checkpoints store
# `qweight`.

# %%
from reference.packing import pack_int4_along_k

word = int(pack_int4_along_k(qw.codes[:8, :1])[0, 0]) & 0xFFFFFFFF
bits = np.array([(word >> b) & 1 for b in range(31, -1, -1)])[None]
fig, ax = plt.subplots(figsize=(11, 1.1))
nb.draw_grid(ax, np.repeat(np.arange(7, -1, -1), 4)[None], f"word 0x{word:08X}: nibble i (bits 4i..4i+3) = code of row i",
             labels=bits, cmap="Pastel1")
for i in range(8):
    ax.text(31 - 4 * i - 1.5, -0.75, f"row {i}: q={qw.codes[i, 0]}", ha="center", fontsize=7)
plt.show()

# %% [markdown]
# ## The rung's code
#
# The whole of `s0_numpy`'s product, from `steps/s0_numpy.py`:

# %%
nb.show_source("steps/s0_numpy.py", "def _run")

# %% [markdown]
# ## How right is "right"?
#
# A GPU kernel adds its products in a different order and in fp32, so it cannot match the
# float64 reference bit for bit. `reference.error_bound` says how far it may be off, element
# by element: `c · u · (|A| @ |W|) + 2⁻²⁴` with `u = 2⁻¹¹`, the fp16 unit roundoff. Using
# `|A| @ |W|` instead of `|C|` matters: when positive and negative products cancel, `C` is
# small but the rounding errors are as large as the products. Each rung states its `c`
# (s0: 4). Below, every output of s0 against its bound:

# %%
s0 = nb.rung("s0_numpy")
qw = ref.random_quantized_weight(rng, 1024, 512, group_size=128)
A = rng.standard_normal((16, 1024), dtype=np.float32).astype(np.float16)
C = s0(A, s0.pack(qw))
err = np.abs(C.astype(np.float64) - ref.reference_gemm(A, qw))
bound = ref.error_bound(A, qw, s0.error_c)
plt.figure(figsize=(5, 3.5))
plt.loglog(bound.ravel(), err.ravel() + 1e-9, ".", ms=2)
plt.plot([bound.min(), bound.max()], [bound.min(), bound.max()], "r-", lw=1, label="error = bound")
plt.xlabel("bound c·u·(|A|@|W|)"); plt.ylabel("|C - C_ref| (+1e-9)"); plt.legend(); plt.show()
print("largest error / bound:", ref.error_excess(C, A, qw, s0.error_c))

# %% [markdown]
# ## The floor, and the prediction for the whole ladder
#
# The benchmark shape scales with the GPU: K = 256·SMs, N = 128·SMs, so every SM has work.
# No kernel can beat the time to read its weights once at the GPU's streaming-read
# bandwidth. That bound, for 4-bit weights with one fp16 scale per 128 rows, against the
# same bound for fp16 weights, is the speedup MARLIN is after:

# %%
K, N, sms, source = nb.benchmark_shape()
int4 = nb.floor(K, N, group_size=128)
fp16 = nb.Floor(2 * K * N, int4.gbps, int4.bandwidth_source)
print(f"benchmark shape K={K} x N={N}: {sms} SMs ({source})")
print(f"int4 + g128 scales: {int4}")
print(f"fp16 weights:       {fp16}")
print(f"best possible speedup over FP16 while both are memory-bound: {fp16.us / int4.us:.2f}x")

# %% [markdown]
# The ratio is `2 / (0.5 + 2/128) ≈ 3.88`: the scales cost 3% of the int4 bytes. The
# rest of the ladder is the story of getting close to that number.
#
# s0 itself runs on the CPU, so its benchmark is live here, against a NumPy float32 product
# on a small 1024×1024 weight. It is slower than a plain float product: dequantizing
# every weight on every call costs more than the product saves.

# %%
nb.benchmark("s0_numpy")

# %% [markdown]
# ## Try this
#
# * Quantize with `group_size=-1` (one scale per column) and with `symmetric=False`; compare
#   the largest `|W - W_deq|` to `s / 2`.
# * Replace `A` by activations with one huge outlier column and watch the error bound follow.
# * `python -m steps check` runs every rung this machine has against the reference.
