# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Tensor cores: mma.sync m16n8k16
#
# *Rung `s3_tensor_cores` of the marlin-ladder.* Previous rung: `s2_smem_tiling`.

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
nb.rung_status("s3_tensor_cores")

# %% [markdown]
# ## The idea
#
# One `mma.sync.m16n8k16` instruction multiplies a 16×16 fp16 tile of A by a 16×8 tile of W
# and adds into a 16×8 fp32 tile of C: 2048 multiply-adds for one warp, in one go. The catch
# is that the operands must sit in the warp's registers in a fixed pattern: each of the 32
# lanes holds a few specific elements. `ldmatrix` loads 8×8 blocks from shared memory straight
# into that pattern. So rung 3 keeps rung 2's tiling, stores fp16 instead of fp32 in shared
# memory, and lets `ldmatrix` + `mma` do the rest. The arithmetic all but disappears.

# %% [markdown]
# ## The fragments, lane by lane
#
# Lane `l = 4g + c` holds: of A, rows `g` and `g+8` at columns `2c, 2c+1` and `2c+8, 2c+9`; of
# B, column `g` at rows `2c, 2c+1` and `2c+8, 2c+9`; of C, rows `g, g+8` at columns `2c, 2c+1`.
# The B pattern below comes from `reference.marlin_layout.FRAGMENT_ROWS`, the model the MARLIN
# rungs are tested against; A and C follow the formulas in `csrc/common.cuh`.

# %%
from reference.marlin_layout import FRAGMENT_ROWS

lanes = np.arange(32)
g, c = lanes // 4, lanes % 4
A_owner = np.zeros((16, 16), int); B_owner = np.zeros((16, 8), int); C_owner = np.zeros((16, 8), int)
for l in lanes:
    for r in (g[l], g[l] + 8):
        A_owner[r, [2 * c[l], 2 * c[l] + 1, 2 * c[l] + 8, 2 * c[l] + 9]] = l
        C_owner[r, [2 * c[l], 2 * c[l] + 1]] = l
    B_owner[2 * c[l] + FRAGMENT_ROWS[:4], g[l]] = l
fig, axes = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1, 1]})
for ax, owner, name in zip(axes, (A_owner, B_owner, C_owner), ("A 16x16 (row-major)", "B 16x8 (column-major)", "C 16x8 (fp32)")):
    nb.draw_grid(ax, owner % 20, f"{name}: owning lane", labels=owner)
plt.show()

# %%
nb.show_source("csrc/s3_tensor_cores.cu", "__device__ __forceinline__ void mma_slice")

# %% [markdown]
# ## Prediction
#
# The H100's fp16 tensor cores do ~990 TFLOP/s (dense), so at M = 16 the math takes a fifth of
# the time the weights take to arrive: the kernel is a weight stream again. (At M = 64 the two
# are about equal — this is where every int4 kernel's advantage over FP16 starts to fade, as
# FP16 itself stops being memory-bound.) But each weight still takes a
# detour — global → registers → dequantize → shared memory → `ldmatrix` → registers — and
# every slice ends in a `__syncthreads`. Against rung 2 the FMA limit disappears (one `mma`
# does the work of 2048 FMAs), so the rung should become memory-latency-bound and several times
# faster than rung 2. Expect the first rung *faster than FP16* at small M, but well short of
# the floor.

# %%
K, N, sms, source = nb.benchmark_shape()
print(f"memory floor: {nb.floor(K, N).us:.0f} us")
for M in (1, 16, 64):
    print(f"M={M:3d}: tensor-core time at 990 TFLOP/s = {2 * M * K * N / 990e12 * 1e6:5.1f} us")

# %% [markdown]
# ## Is it right?
#
# The rung runs once on random data and every output is held to the reference's bound
# `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA rung says so and is
# skipped.

# %%
nb.check("s3_tensor_cores", M=16, K=1024, N=512)

# %% [markdown]
# ## Measured
#
# From the GPU results committed in `docs/results/`, the newest GPU first (CUDA-graph replay,
# weights rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the
# benchmark shape and summed over the four linear layers of Llama-2-7B. The gain is the rung
# below's time divided by this rung's. Under it, the rows of the Nsight Compute profile (one
# launch per kernel, M = 16, benchmark shape) for the two rungs, where the profile has them.

# %%
nb.measured("s3_tensor_cores", below="s2_smem_tiling")

# %% [markdown]
# ## Explanation
#
# Both halves of the prediction hold on the benchmark shape: the rung is several times
# faster than rung 2, and at small M it is faster than FP16. But it is still far above the
# floor (the whole table below prints its share of the read bandwidth). The profile shows the
# tensor pipe mostly idle and
# DRAM mostly idle too: the warps are waiting. Three causes, all visible in the kernel:
# each block stages a single K slice in registers before writing it to shared memory, so only
# one slice of loads per block is in flight; each code is converted with a plain
# integer-to-half conversion; and the high *registers / thread* allow only two blocks (eight
# warps) per SM. At M = 64 the advantage over FP16 is gone, as the tensor-core arithmetic
# above warned: FP16 stays memory-bound while this rung's extra work per weight grows with M.
# On the Llama-2-7B sum the layers are narrower than the GPU is wide, fewer blocks are
# launched, and the rung stays below FP16 even at M = 1. Rungs 4 and 5 attack the causes in
# turn: cheaper dequantization, then far more bytes in flight.

# %% [markdown]
# ## The whole table
#
# Beside FP16 cuBLAS at every stored batch size, with the floor. On a GPU this cell measures
# live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); elsewhere
# it shows the GPU results committed in `docs/results/`, the newest GPU first.

# %%
nb.benchmark("s3_tensor_cores", below="s2_smem_tiling")

# %% [markdown]
# ## Try this
#
# * Remove the 8-element padding of the shared-memory rows (`A_STRIDE`, `W_STRIDE`) and
#   count the bank conflicts with Nsight Compute: `ldmatrix` reads 8 rows at once.
# * Compare `S3_M_TILES` 1, 2, 4 at M = 64.
