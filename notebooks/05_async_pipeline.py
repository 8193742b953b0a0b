# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · The cp.async pipeline
#
# *Rung `s5_async_pipeline` of the marlin-ladder.* Previous rung: `s4_marlin_layout`.

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
nb.rung_status("s5_async_pipeline")

# %% [markdown]
# ## The idea
#
# To stream at full bandwidth, a GPU needs megabytes of loads in flight (bandwidth ×
# latency). A register can only hold a load while the warp waits for it; `cp.async` copies
# global → shared memory *without* holding registers and without stalling the warp. So each
# block keeps STAGES − 1 tiles of A, weights and scales in flight while it computes on one:
# a ring of shared-memory buffers. The weight copies carry an L2 *evict-first* hint (they are
# read once), the register fragments are double-buffered, and 8 warps share each tile —
# some side by side along N, the rest splitting K and adding their sums in shared memory.

# %% [markdown]
# ## How many stages fit
#
# The rung chooses its tiles and stage count on the host (`steps/s5_async_pipeline.py`):

# %%
nb.show_source("steps/s5_async_pipeline.py", "def config")

# %%
from steps.s4_marlin_layout import m_blocks_for
from steps.s5_async_pipeline import TileConfig, tile_shapes_for

s5 = nb.rung("s5_async_pipeline")
for M in (1, 16, 64):
    plan = s5.tile_plan(M, 4096, None)
    tk, tn = tile_shapes_for(4096, 4096, plan)
    stage = TileConfig(m_blocks_for(M), tn, tk, 1, 128).stage_bytes
    stages = min(plan.max_stages, plan.smem_budget // stage)
    print(f"M={M:3d}: tiles {tk}x{tn}, {stage / 1024:.1f} KB per stage, {stages} stages "
          f"({plan.smem_budget // 1024} KB budget), {(stages - 1) * stage / 1024:.0f} KB in flight per block")


# %% [markdown]
# ## The timeline
#
# A model of the loop in `marlin::ring_consume` (`csrc/s5_pipeline.cuh`): while tile *t*
# is
# multiplied, the copy of tile *t + STAGES − 1* is issued into the slot tile *t − 1* just
# freed; `cp.async.wait_group` then waits until tile *t + 1* has landed. The reference has no
# model of this pipeline, so the picture is drawn from the loop itself, with a copy taking
# 2.5 times as long as multiplying a tile: three stages keep two copies in flight and the
# tensor cores wait every tile; four keep three and never wait once the pipeline is full.

# %%
def timeline(ax, stages, latency, tiles=12):
    issue, start, clock = {t: 0.0 for t in range(stages - 1)}, {}, 0.0
    for t in range(tiles):
        start[t] = max(clock, issue[t] + latency)  # wait until tile t has landed
        if t + stages - 1 < tiles:
            issue[t + stages - 1] = start[t]  # refill the slot freed by tile t - 1
        clock = start[t] + 1.0
    for t in range(tiles):
        slot = t % stages
        ax.broken_barh([(issue[t], latency)], (slot - 0.4, 0.35), color="tab:blue", alpha=0.5)
        ax.broken_barh([(start[t], 1.0)], (slot + 0.05, 0.35), color="tab:orange")
        ax.text(start[t] + 0.5, slot + 0.22, str(t), ha="center", va="center", fontsize=7)
    idle = clock - tiles - latency  # time the tensor cores waited after the first tile
    ax.set(yticks=range(stages), yticklabels=[f"slot {s}" for s in range(stages)],
           title=f"{stages} stages, copy latency {latency} steps: tensor cores idle {idle:.1f} steps after the ramp")

fig, axes = plt.subplots(2, 1, figsize=(11, 5), sharex=True)
timeline(axes[0], 3, 2.5)
timeline(axes[1], 4, 2.5)
axes[1].set_xlabel("time (one step = multiplying one tile); blue: copy in flight, orange: multiply")
fig.tight_layout(); plt.show()

# %%
nb.show_source("csrc/s5_pipeline.cuh", "__device__ __forceinline__ void ring_consume(")

# %% [markdown]
# ## Prediction
#
# With tens of KB in flight per block and a block per column slice, the bytes in flight
# reach the megabytes that Little's law asks for — *when there are enough blocks*. The grid is
# N / TILE_N column slices: on the benchmark shape that is exactly one wave (N = 128·SMs), so
# expect this rung close to the floor there. On a 4096-wide layer it is 32 blocks for 132 SMs:
# most of the GPU idles. Rung 6 fixes that. Against rung 4, whose time was lost waiting on
# memory, this should be the biggest step up in speedup over FP16 on the whole ladder, on the
# benchmark shape, and a smaller one on the Llama-2-7B layers.

# %%
K, N, sms, source = nb.benchmark_shape()
for name, n in (("benchmark shape", N), ("Llama-2-7B q/k/v/o (N=4096)", 4096)):
    print(f"{name}: {n // 128} blocks of 128 columns for {sms} SMs")

# %% [markdown]
# ## Is it right?
#
# The rung runs once on random data and every output is held to the reference's bound
# `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA rung says so and is
# skipped.

# %%
nb.check("s5_async_pipeline", M=16, K=1024, N=512)

# %% [markdown]
# ## Measured
#
# From the GPU results committed in `docs/results/`, the newest GPU first (CUDA-graph replay,
# weights rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the
# benchmark shape and summed over the four linear layers of Llama-2-7B. The gain is the rung
# below's time divided by this rung's. Under it, the rows of the Nsight Compute profile (one
# launch per kernel, M = 16, benchmark shape) for the two rungs, where the profile has them.

# %%
nb.measured("s5_async_pipeline", below="s4_marlin_layout")

# %% [markdown]
# ## Explanation
#
# A hit. No other rung adds as much speedup over FP16 as this one, and on the benchmark shape
# at M ≤ 16 the rung streams the weights close to the floor (the whole table below prints
# the share of the read bandwidth). The profile shows why: DRAM throughput jumps to the top of
# the table
# while *registers / thread* fall, because the copies in flight wait in shared memory, not in
# registers. Up to 32 rows it runs 4 stages: a sweep over 4, 6 and 8 put 4 at or ahead of the
# deeper pipelines, because three 16 KB tiles in flight per SM already cover the latency. At
# M = 64 the time grows well beyond M = 16's: there the limit is the arithmetic of
# `mma.sync`, no longer the bytes. The Llama-2-7B sum shows the predicted weak spot: one
# block per 128-column slice leaves most SMs idle on a 4096-wide layer, so the speedup over
# FP16 there is well below the benchmark shape's.

# %% [markdown]
# ## The whole table
#
# Beside FP16 cuBLAS at every stored batch size, with the floor. On a GPU this cell measures
# live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); elsewhere
# it shows the GPU results committed in `docs/results/`, the newest GPU first.

# %%
nb.benchmark("s5_async_pipeline", below="s4_marlin_layout")

# %% [markdown]
# ## Try this
#
# * Benchmark with `EVICT_FIRST 0` (a define of `csrc/s5_async_pipeline.cu`) on a shape whose
#   weights fit in L2 several times, and on one that does not.
# * Force 3 stages and then 8 (`max_stages`, `smem_budget`): where does the gain stop?
