# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · MARLIN: the SM-striped schedule
#
# *Rung `s6_marlin` of the marlin-ladder.* Previous rung: `s5_async_pipeline`.

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
nb.rung_status("s6_marlin")

# %% [markdown]
# ## The idea
#
# Give the GPU exactly one block per SM and cut the *work* evenly instead of the matrix:
# number the TILE_K × TILE_N weight tiles column slice by column slice, K innermost, and let
# block `b` take the contiguous run of `iters` tiles from `b · iters`. Every block streams the
# same number of bytes whatever the shape. A run walks down a column slice and may continue
# at the top of the next. A slice shared by several blocks needs their partial sums added:
# each block stores its fp32 partials in a workspace and counts itself in the slice's
# counter, and the last to arrive adds them all in block order (a fixed order, so results
# are bit-identical run to run) and writes the output. Nobody waits for anybody.

# %% [markdown]
# ## The stripes
#
# `reference.marlin_layout.striped_schedule`, the model the kernel mirrors, on a small example:
# 6 column slices of 8 k-tiles on 10 SMs.

# %%
from reference.marlin_layout import striped_schedule

def stripes(k_tiles, n_tiles, sms, slabs=1):
    iters, schedule = striped_schedule(slabs, k_tiles, n_tiles, sms)
    owner = np.full((k_tiles, n_tiles * slabs), -1)
    sharers = np.zeros_like(owner)
    for segments in schedule:
        for s in segments:
            owner[s.row0:s.row0 + s.rows, s.slab * n_tiles + s.col] = s.block
            sharers[s.row0:s.row0 + s.rows, s.slab * n_tiles + s.col] = s.contributors
    return iters, schedule, owner, sharers

iters, schedule, owner, sharers = stripes(8, 6, 10)
fig, ax = plt.subplots(figsize=(6, 4))
nb.draw_grid(ax, owner, f"k-tile (down) x column slice (across): block; label = blocks sharing the slice",
             labels=sharers, cmap="tab10")
plt.show()
print(f"{len(schedule)} blocks, {iters} tiles each")

# %% [markdown]
# Every tile is computed exactly once, and the blocks that share a slice are exactly the ones
# its last block adds up:

# %%
K, N, sms, source = nb.benchmark_shape()
for shape, (k, n) in {"benchmark": (K, N), "Llama-2-7B o_proj (4096x4096)": (4096, 4096)}.items():
    iters, schedule, owner, sharers = stripes(k // 128, n // 128, sms)
    covered = (owner >= 0).all()
    parts = {}
    for seg in schedule:
        for s in seg:
            parts.setdefault((s.slab, s.col), []).append(s)
    sharers_ok = all(sorted(s.block for s in p) == list(p[0].blocks) for p in parts.values())
    shared = sum(p[0].contributors > 1 for p in parts.values())
    print(f"{shape}: {len(schedule)} blocks on {sms} SMs, {iters} tiles each; covered once: {covered}; "
          f"{shared} of {len(parts)} slices shared; sharers consistent: {sharers_ok}")

# %% [markdown]
# ## What the stripes buy
#
# SM utilisation of rung 5's grid (one block per column slice, all of K) against the striped
# schedule, for the four linear layers of Llama-2-7B on the benchmark GPU:

# %%
from steps.harness.bench import LLAMA_2_7B
from steps.harness.report import rung_colour

names, plain, striped = [], [], []
for k, n in LLAMA_2_7B:
    slices = n // 128
    waves = -(-slices // sms)
    plain.append(slices / (waves * sms))
    iters, schedule = striped_schedule(1, k // 128, slices, sms)
    work = slices * (k // 128)
    striped.append(work / (-(-len(schedule) // sms) * sms * iters))
    names.append(f"{k}x{n}")
x = np.arange(len(names))
plt.figure(figsize=(7, 3))
plt.bar(x - 0.2, plain, 0.4, label="s5: one block per column slice", color=rung_colour("s5_async_pipeline"))
plt.bar(x + 0.2, striped, 0.4, label="s6: striped", color=rung_colour("s6_marlin"))
plt.xticks(x, names); plt.ylabel("busy share of SM-time"); plt.ylim(0, 1.2); plt.legend(fontsize=8, ncol=2); plt.show()

# %%
nb.show_source("csrc/s6_stripes.cuh", "__device__ __forceinline__ void run_stripes")

# %%
nb.show_source("csrc/s6_stripes.cuh", "__device__ __forceinline__ bool add_partial_sums")

# %% [markdown]
# ## Prediction
#
# On the benchmark shape rung 5's grid already matches the SM count (N / 128 = SMs), so s6
# should gain over it only the ragged tail: a few percent. On the narrower Llama-2-7B layers
# it should gain a lot, because every SM gets an equal run of tiles instead of a quarter of
# them getting one column slice each. The paper reports ~3.9× over FP16 up to batch 16–32
# for this schedule. The price is a reduction: blocks that share a column slice must add their
# partial sums. MARLIN does it in the fp16 output, one block after another, each waiting for
# a lock; here each block stores fp32 partials and the last to arrive adds them, so nobody
# waits and the sum is rounded once.

# %% [markdown]
# ## Is it right?
#
# The rung runs once on random data and every output is held to the reference's bound
# `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA rung says so and is
# skipped.

# %%
nb.check("s6_marlin", M=16, K=1024, N=512)

# %% [markdown]
# ## Measured
#
# From the GPU results committed in `docs/results/`, the newest GPU first (CUDA-graph replay,
# weights rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the
# benchmark shape and summed over the four linear layers of Llama-2-7B. The gain is the rung
# below's time divided by this rung's. Under it, the rows of the Nsight Compute profile (one
# launch per kernel, M = 16, benchmark shape) for the two rungs, where the profile has them.

# %%
nb.measured("s6_marlin", below="s5_async_pipeline")

# %% [markdown]
# ## Explanation
#
# On the benchmark shape the prediction holds: at M ≤ 16 s6 and rung 5 both stream at about
# the measured read bandwidth, and the two profile rows are nearly the same: with rung 5's
# 256 × 128 tiles the striped schedule gives each block exactly one column slice here, which is
# rung 5's grid. Above 16 rows, where there are at least half as many 256-wide column slices
# as SMs (the benchmark shape among them), s6 uses 256-wide tiles, which its striped grid
# allows (rung 5 needs many column slices to fill the SMs). There the limit is arithmetic
# rather than bytes: with `mma.sync`
# the M = 64 profile showed the tensor pipe busy more than half the time and DRAM under half
# of peak. s6 stays the paper's kernel here, on `mma.sync`; Hopper's warpgroup MMA, with the
# dequantized weights as its register operand, belongs to rung 8 (`s8_hopper`), where warps
# specialise into a producer and consumers. (An earlier version of s6 switched to `wgmma` on
# Hopper above 16 rows: M = 64 went from about 190 to about 155 µs on the H100; results
# measured with it are marked by their date in docs/results.)
#
# On the Llama-2-7B sum s6 is ahead of rung 5 at every printed M, as predicted. That took
# three tries. With MARLIN's serial reduction (each block waits for the previous one, then
# reads, adds and writes the fp16 partials) s6 was *behind* rung 5 at M = 16 and 64, because
# on layers this small the chain of hand-offs cost about as much as streaming the weights;
# the no-wait fp32 reduction removed the chain. Then the fixed costs per block: the pipeline
# now keeps fetching the next slice's tiles while a block reduces the current one, and a
# block's run is made longer when that spares it a shared slice (`stripe_length` with a
# reduction cost). docs/rungs.md has each prediction and what was measured.

# %% [markdown]
# ## The whole table
#
# Beside FP16 cuBLAS at every stored batch size, with the floor. On a GPU this cell measures
# live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); elsewhere
# it shows the GPU results committed in `docs/results/`, the newest GPU first.

# %%
nb.benchmark("s6_marlin", below="s5_async_pipeline")

# %% [markdown]
# ## Try this
#
# * Plot `stripes(k, n, sms)` for a layer with fewer tiles than SMs: how many blocks are
#   launched, and how long are their runs?
# * `MAX_SLICE_BLOCKS` caps how many blocks share a slice (and so how many partials the last
#   block adds). Set it to 2 and look at how many blocks `stripes` launches for a 4096 × 4096
#   layer.
