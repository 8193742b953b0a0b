# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Numba: one GPU thread per output
#
# *Rung `s1_numba_naive` of the marlin-ladder.* Previous rung: `s0_numpy`.

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
nb.rung_status("s1_numba_naive")

# %% [markdown]
# ## The idea
#
# Move the product to the GPU in the most direct way: one thread per output element `C[m, n]`.
# The thread walks down column `n` of the packed weights, pulls each 4-bit code out of its
# word, multiplies it by its group's scale and accumulates `a · w` in fp32. Neighbouring
# threads take neighbouring columns, so when a warp loads "row r of the words" it reads 32
# consecutive words: one coalesced 128-byte transaction.
#
# The kernel is written in Python with Numba; without a GPU the very same kernel runs in
# Numba's CUDA simulator, slowly, which is how this notebook checks it on a CPU.

# %%
nb.show_source("steps/_s1_kernel.py", "@cuda.jit")

# %% [markdown]
# ## Which thread computes what
#
# The launch is a 2-D grid: blocks of 128 threads along N, one block row per row of A. The
# picture colours a small C by block, and shows which words one warp reads at one step of K.

# %%
from steps.s1_numba_naive import THREADS_PER_BLOCK

M, N = 4, 512
block = np.broadcast_to(np.arange(N) // THREADS_PER_BLOCK, (M, N)) + 4 * np.arange(M)[:, None]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 2.2))
nb.draw_grid(a, block, f"C ({M}x{N}): one thread per element, blocks of {THREADS_PER_BLOCK} threads (colours)")
words = np.zeros((16, 64), dtype=int); words[3, :32] = 1
nb.draw_grid(b, words, "packed words (K/8 x N): one warp at k-row 3 reads 32 adjacent words", cmap="Greys")
plt.show()

# %% [markdown]
# ## Prediction
#
# Nothing is shared between threads. Every thread re-reads its whole row of A, and every
# weight word is read once per row of A: M times. A thread spends several integer
# instructions (shift, mask, convert, scale) on each weight before its single FMA. The
# kernel is limited by instructions and load traffic, not by DRAM bandwidth: expect it to be
# far *slower than FP16 cuBLAS* even at M = 1, and to get slower in proportion to M.
#
# There is no gain over rung 0 to predict: s0 runs on the CPU, so the two are not timed on the
# same machine. What this rung should show is the distance a straightforward GPU kernel keeps
# from FP16, and that the distance grows with M.

# %%
K, N, sms, source = nb.benchmark_shape()
for M in (1, 16, 64):
    loads = M * N * K / 8 + M * N * K  # weight-word loads + activation loads, one per thread per step
    print(f"M={M:3d}: {loads / 1e9:6.1f} G scalar loads for {nb.weight_bytes(K, N) / 1e6:.0f} MB of weights")

# %% [markdown]
# ## Is it right?
#
# The rung runs once on random data and every output is held to the reference's bound
# `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA rung says so and is
# skipped.

# %%
nb.check("s1_numba_naive", M=2, K=128, N=64, group_size=32)

# %% [markdown]
# ## Measured
#
# From the GPU results committed in `docs/results/`, the newest GPU first (CUDA-graph replay,
# weights rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the
# benchmark shape and summed over the four linear layers of Llama-2-7B. The gain is the rung
# below's time divided by this rung's. Under it, the rows of the Nsight Compute profile (one
# launch per kernel, M = 16, benchmark shape) for the two rungs, where the profile has them.

# %%
nb.measured("s1_numba_naive", below="s0_numpy")

# %% [markdown]
# ## Explanation
#
# The prediction holds. Every printed speedup over FP16 is a tiny fraction of one, even at
# M = 1, and the floor is further away still. On the Llama-2-7B sum the time
# grows with M because every row of A re-reads every weight word: from M = 16 to M = 64 the
# growth is close to the four-fold of the weight loads, while from M = 1 to 16 it is less than
# sixteen-fold, most likely because at M = 1 each thread's fixed work (its walk down K, the
# index
# arithmetic, the launch) is a larger share. The benchmark shape is stored at M = 16 only, so
# its other rows say *not stored*. The rung below has no GPU rows, so no gain is printed, and
# the Nsight Compute workload (`scripts/ncu_ladder.py`) profiles the compiled rungs s2 to s6,
# not this Numba kernel.

# %% [markdown]
# ## The whole table
#
# Beside FP16 cuBLAS at every stored batch size, with the floor. On a GPU this cell measures
# live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); elsewhere
# it shows the GPU results committed in `docs/results/`, the newest GPU first.

# %%
nb.benchmark("s1_numba_naive", below="s0_numpy")

# %% [markdown]
# ## Try this
#
# * Swap the roles: let consecutive threads take consecutive *rows* `m` instead of columns.
#   The weight loads of a warp stop being coalesced; on a GPU the time grows several-fold.
# * In the simulator, `print` inside the kernel works: print `code` for thread (0, 0).
