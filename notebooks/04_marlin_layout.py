# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The MARLIN layout: weights straight into fragments
#
# *Rung `s4_marlin_layout` of the marlin-ladder.* Previous rung: `s3_tensor_cores`.

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
nb.rung_status("s4_marlin_layout")

# %% [markdown]
# ## The idea
#
# Rung 3 reshuffled every weight at run time, through shared memory, into the order `mma`
# wants. But the order never changes: it can be done *once, offline*. MARLIN permutes the
# packed weights so that one 128-bit load by lane `l` brings exactly the 32 codes of its B
# fragments for four 16×16 tiles side by side (its warp's 64-column strip, 16 rows of K).
# No shared memory, no `ldmatrix` for the weights: every weight bit is loaded by the lane
# that multiplies it, once. The scales are permuted the same way.

# %% [markdown]
# ## The weight permutation
#
# From `reference.marlin_layout`, the model the kernel's packing calls. Left: the first 16×16
# tile of a 16×64 block, each code labelled with the lane that loads it — the B-fragment
# pattern of the previous chapter. Right: the whole block, with the 32 codes of lane 0's one
# 128-bit load labelled `word.nibble`: four words, one per tile, eight nibbles each.

# %%
from reference import marlin_layout as ml

lane_of = np.zeros((16, 64), int)
label = np.full((16, 64), "", dtype=object)
for l in range(ml.LANES):
    for j in range(ml.TILES_PER_WARP):
        for n in range(8):
            r, col = ml.FRAGMENT_ROW_OF[l, j, n], ml.FRAGMENT_COL_OF[l, j, n]
            lane_of[r, col] = l
            if l == 0:
                label[r, col] = f"{j}.{n}"
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 3]})
nb.draw_grid(a, lane_of[:, :16] // 4, "tile 0: lane (colour = lane // 4)", labels=lane_of[:, :16], cmap="tab10")
nb.draw_grid(b, (lane_of == 0).astype(int), "16 x 64 block: lane 0's 32 codes, word.nibble", labels=label, cmap="Blues", vmax=1.4)
plt.show()

# %% [markdown]
# The nibbles inside each 32-bit word are interleaved 0, 2, 4, 6, 1, 3, 5, 7: the
# dequantization below extracts nibbles in pairs (0, 4), (1, 5), … — one from each 16-bit half
# —
# and each pair must be two neighbouring fragment values.

# %%
print("fragment value held by nibble 0..7:", ml.VALUE_OF_NIBBLE)
rng = np.random.default_rng(0)
qw = ref.random_quantized_weight(rng, 256, 256, group_size=128)
words = ml.pack_marlin_weights(qw)
print("pack -> unpack is exact:", np.array_equal(ml.unpack_marlin_weights(words), qw.codes))

# %% [markdown]
# ## The lop3 trick: int4 → fp16 in two instructions
#
# fp16 `0x6400` is 1024.0, and between 1024 and 2048 its ten mantissa bits count in steps of
# exactly 1. So OR-ing a 4-bit code `v` into the low mantissa bits *is* the number `1024 + v`;
# subtracting 1032 gives `v - 8`, the signed weight, exactly. One `lop3` instruction computes
# `(q AND mask) OR 0x6400` for both 16-bit halves of a register at once, so two fp16 weights
# cost one `lop3` and one `__hsub2`. The high nibble of each byte lands at `1024 + 16v` and is
# fixed with one fused multiply-add (`x · 1/16 − 72`).

# %%
v = np.arange(16, dtype=np.uint16)
patterns = (v | 0x6400).view(np.float16)
bits = ((v[:, None] | 0x6400) >> np.arange(15, -1, -1)) & 1
fig, ax = plt.subplots(figsize=(9, 4))
field = np.broadcast_to(np.r_[0, [1] * 5, [2] * 6, [3] * 4], (16, 16))
nb.draw_grid(ax, field, "0x6400 | v: sign | exponent (=25) | mantissa | code v", labels=bits, cmap="Pastel2")
ax.set_yticks(range(16)); ax.set_yticklabels([f"v={i:2d} -> {float(p):.0f}" for i, p in enumerate(patterns)], fontsize=7)
plt.show()

# %% [markdown]
# Bit for bit, for every code in every nibble position, the model of the kernel's
# dequantization against plain `q - 8`:

# %%
all_codes = np.arange(16, dtype=np.uint32)
ok = True
for nibble in range(8):
    word = all_codes << np.uint32(4 * nibble)
    got = ml.lop3_dequantize_word(word)[:, ml.VALUE_OF_NIBBLE[nibble]]
    ok &= np.array_equal(got, (all_codes.astype(np.float16) - 8))
print("lop3 model == q - 8 for all 16 codes x 8 nibble positions:", ok)
print("whole layout (words, permuted scales, lop3, scale) == reference.dequantize:",
      np.array_equal(ml.dequantize_marlin(words, ml.permute_scales(qw.scales), 128), ref.dequantize(qw)))

# %%
nb.show_source("csrc/s4_fragments.cuh", "struct Fp16 :")

# %% [markdown]
# The kernels take the element type as a template parameter: `marlin::Fp16` above holds the
# three things that depend on it (this dequantization, the `mma` instruction, the final
# rounding). s5 and s6 also compile with `marlin::Bf16` for bf16 models. bf16 has only 7
# mantissa bits, so its magic number is `0x4300` (128, whose last place is 1) and the high
# nibble, which would reach into the exponent, is shifted down instead of scaled: one more
# instruction per pair. The reference models both, bit for bit
# (`ml.lop3_dequantize_word(word, dtype=...)`).

# %%
nb.show_source("csrc/s4_fragments.cuh", "struct Bf16 :")

# %% [markdown]
# ## The scale permutation
#
# Lane `4g + c` multiplies columns `16j + 8h + g` of its strip (tile `j`, half `h`). Reordering
# each 64-column chunk so those eight scales sit side by side is an 8×8 transpose: one
# 128-bit load, and it stays in registers for the whole group.

# %%
cols = np.arange(64)[None].astype(np.float16)
perm = ml.permute_scales(cols).astype(int)[0]
fig, ax = plt.subplots(figsize=(11, 1.3))
nb.draw_grid(ax, (perm // 8)[None], "position p holds the scale of column ... (colour: lane group g = column % 8)",
             labels=perm[None], cmap="tab10")
plt.show()

# %% [markdown]
# ## The kernel
#
# Four warps per 64-column strip, taking every fourth k16 step of K. Per batch, each lane
# requests its weight words; meanwhile the block copies the batch's rows of A and its scales
# into shared memory once. Per k16 step the warp then reads its A fragments with `ldmatrix` and
# runs `multiply_k16` (dequantize + 8 mmas) on one 128-bit weight word:

# %%
nb.show_source("csrc/s4_marlin_layout.cu", "s4_marlin_layout(")

# %% [markdown]
# ## Prediction
#
# The bytes are now exactly the floor's bytes, each touched by one load instruction, and the
# dequantization costs about one instruction per weight. What is missing is *latency
# hiding*: a warp can only have as many loads in flight as it has registers to receive them
# (`LOADS_AHEAD` words, requested before the first is used), and four warps share each
# 64-column strip.

# %%
nb.show_source("csrc/s4_marlin_layout.cu", "constexpr int LOADS_AHEAD")

# %% [markdown]
# By Little's law, bandwidth = bytes in flight / latency:

# %%
K, N, sms, source = nb.benchmark_shape()
latency_us = 0.8  # a typical HBM round trip under load
loads_ahead = 16  # LOADS_AHEAD at M <= 16, from the line above
warps = 4 * N // 64  # four warps per 64-column strip
in_flight = warps * 32 * 16 * loads_ahead  # warps x lanes x 16 bytes x loads ahead
print(f"{warps} warps x {32 * 16 * loads_ahead // 1024} KB = {in_flight / 1e6:.2f} MB in flight -> at most {in_flight / latency_us / 1e3:,.0f} GB/s")
print(f"the floor needs {nb.floor(K, N).gbps:,.0f} GB/s x {latency_us} us = {nb.floor(K, N).gbps * latency_us / 1e3:.1f} MB in flight")

# %% [markdown]
# On paper that is plenty, but only if every warp keeps its loads outstanding all the time.
# It does not: each batch of loads is followed by a stretch of compute during which that warp
# has nothing in flight, and the next batch starts with a full round trip. A first version of
# this rung also loaded A and the scales from global memory right before every k16 step, and
# was *slower* than rung 3: every step waited for L2. This version copies each batch's rows of
# A and its scales into shared memory once per block, while the weight loads are in flight.
# Expect it to beat rung 3 at small M, and still sit far from the floor.

# %% [markdown]
# ## Is it right?
#
# The rung runs once on random data and every output is held to the reference's bound
# `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA rung says so and is
# skipped.

# %%
nb.check("s4_marlin_layout", M=16, K=1024, N=512)

# %% [markdown]
# ## Measured
#
# From the GPU results committed in `docs/results/`, the newest GPU first (CUDA-graph replay,
# weights rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the
# benchmark shape and summed over the four linear layers of Llama-2-7B. The gain is the rung
# below's time divided by this rung's. Under it, the rows of the Nsight Compute profile (one
# launch per kernel, M = 16, benchmark shape) for the two rungs, where the profile has them.

# %%
nb.measured("s4_marlin_layout", below="s3_tensor_cores")

# %% [markdown]
# ## Explanation
#
# The prediction holds at small M: s4 is ahead of rung 3 on the benchmark shape and on the
# Llama-2-7B sum, and the profile shows DRAM throughput above rung 3's. It is a modest step,
# not a large one, because the Little's-law estimate above assumed every warp keeps its
# loads outstanding all the time; in fact each batch ends in compute with nothing in flight,
# and the next begins with an unhidden round trip. At M = 32 (the table below) s4 falls
# behind rung 3 again: a 32-row slab halves `LOADS_AHEAD` so that A still fits in 32 KB of
# shared memory, which halves the bytes in flight per warp. The lesson of the rung: the
# layout removes work, but the latency has to be hidden before that shows, which is rung 5's
# job.

# %% [markdown]
# ## The whole table
#
# Beside FP16 cuBLAS at every stored batch size, with the floor. On a GPU this cell measures
# live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); elsewhere
# it shows the GPU results committed in `docs/results/`, the newest GPU first.

# %%
nb.benchmark("s4_marlin_layout", below="s3_tensor_cores")

# %% [markdown]
# ## Try this
#
# * Change `LOADS_AHEAD` in `csrc/s4_marlin_layout.cu` to 4, then 32: fewer or more loads in flight.
# * Write the inverse of `permute_scales` without looking: it is its own inverse. Why?
