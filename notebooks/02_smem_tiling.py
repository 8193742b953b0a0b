# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Shared-memory tiling
#
# *Rung `s2_smem_tiling` of the marlin-ladder.* Previous rung: `s1_numba_naive`.

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
nb.rung_status("s2_smem_tiling")

# %% [markdown]
# ## The idea
#
# Rung 1 read each weight M times and each activation N times. Here a *block* of 128 threads
# owns a tile of C — BM rows × 128 columns — and walks K in slices of 64. For each slice it
# loads A and the packed weights once, with 16-byte coalesced loads, dequantizes every
# weight once into shared memory, and then all its threads reuse those values from shared
# memory. Each thread keeps a small TM × 8 block of outputs in fp32 registers, so every value
# it reads from shared memory feeds several FMAs. The loads of slice k+1 are issued before
# the FMAs of slice k, so memory and arithmetic overlap.

# %% [markdown]
# ## The tiling, drawn from the kernel's own constants

# %%
c = nb.cuda_constants("csrc/s2_smem_tiling.cu")
print({k: c[k] for k in ("THREADS", "BN", "BK", "THREADS_N", "RUN") if k in c})
BM, BN, THREADS_N, RUN = 16, c["BN"], c["THREADS_N"], c["RUN"]  # BM = 16 is the decode-sized block
THREADS_M = c["THREADS"] // THREADS_N
TM = BM // THREADS_M
owner = np.zeros((BM, BN), dtype=int)
for t in range(c["THREADS"]):
    tm, tn = t // THREADS_N * TM, t % THREADS_N * RUN
    for half in (0, BN // 2):
        owner[tm:tm + TM, tn + half:tn + half + RUN] = t
fig, ax = plt.subplots(figsize=(11, 2.2))
nb.draw_grid(ax, owner % 20, f"a {BM} x {BN} tile of C: thread t owns {TM} rows x two runs of {RUN} columns, {BN // 2} apart",
             labels=np.where(np.arange(BN) % RUN == 0, owner, ""), cmap="tab20")
plt.show()

# %% [markdown]
# Why two runs 64 columns apart rather than 8 adjacent columns? A warp's 32 threads then read
# one contiguous 512-byte row of the weight tile from shared memory with `float4` loads — no
# bank conflicts — and again for the second run.

# %%
nb.show_source("csrc/s2_smem_tiling.cu", "__device__ __forceinline__ void fma_slice")

# %% [markdown]
# ## Prediction
#
# Traffic to DRAM is now close to the weight bytes, but the multiply-adds run on the fp32
# units. 2·M·K·N flops at the H100's ~67 TFLOP/s of non-tensor fp32 against the memory floor:

# %%
K, N, sms, source = nb.benchmark_shape()
f = nb.floor(K, N)
print(f"memory floor: {f.us:.0f} us")
for M in (1, 4, 16, 64):
    print(f"M={M:3d}: fp32 FMA time at 67 TFLOP/s = {2 * M * K * N / 67e12 * 1e6:7.0f} us")

# %% [markdown]
# Beyond M ≈ 4 the FMAs, not the bytes, set the pace, and each weight is also turned into an
# fp32 value in shared memory before any FMA sees it. Against rung 1 each weight is loaded
# once per block instead of once per row of A, so DRAM traffic should fall to the floor's
# bytes and the gain over rung 1 should be large and grow with M. Against FP16 cuBLAS (which
# uses tensor cores) expect this rung still slower for M ≥ 16, and at M = 64, where FMAs set
# the pace, slower than at M = 16.

# %% [markdown]
# ## Is it right?
#
# The rung runs once on random data and every output is held to the reference's bound
# `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA rung says so and is
# skipped.

# %%
nb.check("s2_smem_tiling", M=16, K=1024, N=512)

# %% [markdown]
# ## Measured
#
# From the GPU results committed in `docs/results/`, the newest GPU first (CUDA-graph replay,
# weights rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the
# benchmark shape and summed over the four linear layers of Llama-2-7B. The gain is the rung
# below's time divided by this rung's. Under it, the rows of the Nsight Compute profile (one
# launch per kernel, M = 16, benchmark shape) for the two rungs, where the profile has them.

# %%
nb.measured("s2_smem_tiling", below="s1_numba_naive")

# %% [markdown]
# ## Explanation
#
# The gain over rung 1 is as large as predicted, and larger at higher M, since rung 1's
# weight traffic grows with M and this rung's does not. The profile's *DRAM read* column
# confirms the first half of the prediction: the kernel reads the floor's bytes, no more.
#
# What misses is small M. Where the FMA estimate says the bytes should set the pace, the
# rung still sits far above the floor and slower than FP16, and the profile says why: DRAM
# throughput is a small fraction of peak, so the time goes elsewhere. At M = 16 the grid is
# one block of four warps per SM (see *blocks* and the single-digit *achieved occupancy*), so
# few loads are in flight, and writing the dequantized fp32 tile into shared memory causes
# a flood of store bank conflicts (the *smem store bank conflicts* column). Above M = 16 the
# rung switches to 64-row blocks and
# becomes FMA-bound, as predicted, which is why its time roughly doubles from M = 16 to
# M = 64.

# %% [markdown]
# ## The whole table
#
# Beside FP16 cuBLAS at every stored batch size, with the floor. On a GPU this cell measures
# live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); elsewhere
# it shows the GPU results committed in `docs/results/`, the newest GPU first.

# %%
nb.benchmark("s2_smem_tiling", below="s1_numba_naive")

# %% [markdown]
# ## Try this
#
# * `S2_BM` picks the rows of A per block (16 or 64): time both at M = 64 (the host side is
#   `steps/s2_smem_tiling.py`, `block_m`).
# * Make `BK` 32 or 128 and watch registers and occupancy (`nvcc --resource-usage`).
