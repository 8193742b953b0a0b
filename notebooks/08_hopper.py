# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Hopper: specialized warps, bulk copies, wgmma
#
# *Rung `s8_hopper` of the marlin-ladder.* Previous rung: `s6_marlin` (rung 7 is its sparse branch).

# %%
import os
from pathlib import Path

# Without a GPU, rung 1 runs in Numba's CUDA simulator; that must be chosen before Numba is imported.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from steps.harness import notebook_support as nb

# %%
nb.rung_status("s8_hopper")

# %% [markdown]
# ## The idea
#
# Stop issuing copies and start specializing warps. In rung 6 every thread does everything:
# it issues its share of 16-byte `cp.async` copies, waits at the block barrier, dequantizes
# and multiplies. That one role fixes both how many bytes a block keeps in flight and how many
# instructions it spends per weight. Hopper has hardware for each part of the job:
#
# * **mbarriers**: counters in shared memory. A phase completes when enough threads have
#   arrived *and* the promised bytes have landed. Consumers wait on "slot full" and producers
#   on "slot empty", so nobody waits at a block barrier.
# * **the bulk copy engine** (`cp.async.bulk`): one instruction from one thread moves a
#   contiguous block of memory and reports its bytes to an mbarrier. In the MARLIN layout, a
#   k16 row of a 256-column tile is 2 KB of contiguous memory, so a 128 × 256 tile takes eight
#   copies instead of 1024 per-thread ones.
# * **`wgmma`**: 4 warps issue one asynchronous matrix product. Rung 4's dequantized fragments
#   become its register operand, and the activations are read from shared memory.
#
# So the block splits into a producer warp and two consumer warpgroups, and `setmaxnreg`
# moves registers from the producer to the consumers:
#
# ```
#   producer warp                               consumer warpgroups 0, 1
#   wait empty[s]                               wait full[s], fence (async proxy)
#   8 bulk copies of weights, scale rows  --->  ld.shared weight word, dequantize (rung 4)
#   cp.async activations, arrive on landing     4 x wgmma m64 n(16 m-blocks) k16, one group in flight
#                                         <---  arrive empty[s] once the slot's group is done
# ```
#
# The schedule (SM-striped runs of tiles), the partial sums, the workspace and the numerics are
# rung 6's: the same error-bound constant, and bit-identical repeats.

# %%
nb.show_source("csrc/s8_hopper.cu", "__device__ __forceinline__ void produce(")

# %% [markdown]
# ## Floor

# %%
K, N, sms, source = nb.benchmark_shape()
print(nb.floor(K, N))

# %% [markdown]
# ## Prediction
#
# We counted the consumers' machine code before the first GPU run: about 81 instructions per
# warp for each k16 step. Both warpgroups together then need about 160 issue cycles per step
# on a scheduler, while the byte floor leaves about 250. Issue has room to spare, and a ring
# of up to 8 slots keeps about 128 KB of weights in flight per SM. The prediction was
# therefore the byte floor within 10 % at M ≤ 16 on the benchmark shape, and close to the
# tensor-core floor at M = 64.

# %% [markdown]
# ## Is it right?

# %%
nb.check("s8_hopper", M=16, K=1024, N=512)

# %% [markdown]
# ## Measured
#
# These are the GPU results committed in `docs/results/`, newest GPU first.

# %%
nb.measured("s8_hopper", below="s6_marlin")

# %% [markdown]
# ## Explanation
#
# A miss. The rung is correct: it stays within the error bound and repeats bit for bit
# everywhere it was checked on the H200, and memcheck is clean. But it is slower than rung 6
# at every shape and batch size measured so far: about 1 µs per 128 × 256 tile per SM at
# M ≤ 16, three times what issue needs. So the consumers are latency-bound or starved.
#
# Two changes to the producer made no difference. One fenced its own `cp.async` activations
# a few tiles late. The other lets them arrive on the mbarrier as they land. The producer is
# therefore not the limit.
#
# The suspects left are these:
#
# * the wait after every k16 step, which leaves one `wgmma` group in flight per warpgroup;
# * too few consumer warps to hide the dequantization's dependency chains.
#
# `docs/rungs.md` lists them with the next experiments. Until the rung beats rung 6,
# `MarlinLinear` does not choose it by itself (`chosen_by_default = False`).

# %% [markdown]
# ## The whole table

# %%
nb.benchmark("s8_hopper", below="s6_marlin", preset="llama-7b")

# %% [markdown]
# ## Try this
#
# * Read `docs/results/tuning/*s8v*`: the three producer designs, side by side.
# * Count the instructions between two `HGMMA`s in the machine code:
#   `cuobjdump -sass` of `nvcc -cubin -gencode=arch=compute_90a,code=sm_90a csrc/s8_hopper.cu`.
