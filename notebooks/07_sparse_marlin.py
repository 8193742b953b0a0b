# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Sparse-MARLIN: 2:4 weights
#
# *Rung `s7_sparse_marlin` of the marlin-ladder.* Previous rung: `s6_marlin`.

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
nb.rung_status("s7_sparse_marlin")

# %% [markdown]
# ## The idea
#
# Ampere and Hopper tensor cores have a *sparse* mode: if in every group of 4 consecutive
# values along K at most 2 are non-zero, `mma.sp` (m16n8k32) takes only the 2 kept values plus
# a 2-bit index for each, and does the work of the dense instruction in half the time. For a
# memory-bound kernel the compute does not matter; the bytes do: half the codes, plus 2 bits
# of metadata per kept code. Pruning a model to 2:4 costs accuracy that has to be recovered by
# fine-tuning, which is why this is a separate rung.
#
# First the 2:4 pruning and compression of the reference, on a small matrix:

# %%
rng = np.random.default_rng(0)
W = rng.standard_normal((16, 8)).astype(np.float16)
pruned = ref.prune_2_4(W)
values, indices = ref.compress_2_4(pruned)
print("2:4 after pruning:", ref.is_2_4(pruned), "| round trip exact:",
      np.array_equal(ref.decompress_2_4(values, indices), pruned))
fig, axes = plt.subplots(1, 4, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 1]})
nb.draw_grid(axes[0], np.abs(W.astype(float)), "|W| (16 x 8)", cmap="viridis")
nb.draw_grid(axes[1], np.abs(pruned.astype(float)), "2 largest of every 4 rows kept", cmap="viridis")
nb.draw_grid(axes[2], np.abs(values.astype(float)), "values (8 x 8)", cmap="viridis")
nb.draw_grid(axes[3], indices, "metadata: position 0..3 in its group", labels=indices, cmap="Pastel1")
for ax in axes[:2]:
    for r in range(4, 16, 4):
        ax.axhline(r - 0.5, color="white", lw=1)
plt.show()

# %% [markdown]
# The metadata is what the hardware reads to route the kept values to the right rows of A:
# two 2-bit indices per group of 4, increasing, i.e. 4 bits per 4 rows per column.
#
# ## The metadata, lane by lane
#
# `mma.sp` takes the *sparse* operand as its left factor, so the kernel multiplies W^T by
# A^T and each 16-column tile of W is one sparse A operand. Its metadata must sit in the
# registers the instruction reads: per k32 step and 64-column strip, every lane holds two
# 32-bit words, and lane 4g + 2s + h serves K half h of tile rows g and g + 8 through
# selector s. `reference/sparse_marlin.py` packs them that way (`pack_sparse_metadata`, with
# its exact inverse tested); here is which lane holds the 4-bit metadata of each group of 4
# rows (down) of each column (across) in one k32 step:

# %%
from reference import sparse_marlin as sm

owner = np.full((8, 64), -1)
lanes = np.broadcast_to(np.arange(32)[:, None, None, None], sm.META_TILE_OF.shape)
owner[sm.META_GROUP_OF, 16 * sm.META_TILE_OF + sm.META_ROW_OF] = lanes
assert (owner >= 0).all() and np.bincount(owner.ravel()).tolist() == [16] * 32  # each nibble once, 16 per lane
fig, ax = plt.subplots(figsize=(13, 2.6))
nb.draw_grid(ax, owner % 4, "lane holding each column's metadata nibble for each group of 4 rows "
             "(colour: lane % 4 = 2 x selector + K half)", labels=owner, cmap="Pastel1")
for x in (15.5, 31.5, 47.5):
    ax.axvline(x, color="black", lw=1)
plt.show()

# %% [markdown]
# ## Floor
#
# Half the codes, the same scales, and the metadata:

# %%
K, N, sms, source = nb.benchmark_shape()
dense, sparse = nb.floor(K, N), nb.floor(K, N, sparse_2_4=True)
fp16 = nb.Floor(2 * K * N, dense.gbps, dense.bandwidth_source)
print(f"dense int4: {dense}\n2:4 int4:   {sparse}")
print(f"best speedup over FP16: dense {fp16.us / dense.us:.2f}x, 2:4 {fp16.us / sparse.us:.2f}x")

# %% [markdown]
# ## Prediction
#
# Half the codes plus 2-bit metadata is 3 bits per weight instead of 4, so the floor falls
# by a quarter: where rung 6 already streams close to its floor (the benchmark shape, M ≤ 16)
# s7 should gain up to 4/3 over it. `mma.sp` also halves the multiply work, which matters
# where rung 6 is limited by arithmetic instead of bytes (M = 64). The paper's Sparse-MARLIN
# reaches up to ~5.3× over FP16: close to this floor.

# %% [markdown]
# ## Is it right?
#
# The rung runs once on random data and every output is held to the reference's bound
# `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA rung says so and is
# skipped.

# %%
nb.check("s7_sparse_marlin", M=16, K=1024, N=512)

# %% [markdown]
# ## Measured
#
# From the GPU results committed in `docs/results/`, the newest GPU first (CUDA-graph replay,
# weights rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the
# benchmark shape and summed over the four linear layers of Llama-2-7B. The gain is the rung
# below's time divided by this rung's. Under it, the rows of the Nsight Compute profile (one
# launch per kernel, M = 16, benchmark shape) for the two rungs, where the profile has them.

# %%
nb.measured("s7_sparse_marlin", below="s6_marlin")

# %% [markdown]
# ## Explanation
#
# A hit, on the second attempt. The first version was a miss: a few percent ahead of rung 6
# at M ≤ 16, behind it from M = 32 up. Its stall profile showed warps waiting on their own
# shared-memory reads (the A fragments were read inside the substep), and the machine code
# showed why the loop was long: `ldmatrix` returned the two K halves of 16 rows, while
# `mma.sp` wants the four K quarters of 8 rows in one register quad, so every operand was
# assembled by register moves, about a third of the loop at M = 64. Now one `ldmatrix.x4` per
# 8 rows returns the operand exactly as `mma.sp` reads it, and up to M = 32 the A fragments
# are loaded a substep ahead like rung 6's. Executed instructions fell by a fifth at M = 16
# and by a third at M = 64; s7 now streams its 3 bits per weight at nearly the full read
# bandwidth and stays ahead of rung 6 at every batch size of the committed results (on the
# H100 also where rung 6 then multiplied with `wgmma`, M ≥ 32).

# %% [markdown]
# ## The whole table
#
# Beside FP16 cuBLAS at every stored batch size, with the floor. On a GPU this cell measures
# live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); elsewhere
# it shows the GPU results committed in `docs/results/`, the newest GPU first.

# %%
nb.benchmark("s7_sparse_marlin", below="s6_marlin")

# %% [markdown]
# ## Try this
#
# * Prune a real-looking weight (rows of very different scale) and measure the relative error
#   `|W - prune_2_4(W)| / |W|`: magnitude pruning keeps the large rows.
# * Compress a matrix with fewer than 2 non-zeros in some group: where do the indices go?
