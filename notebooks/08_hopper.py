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
# * **tensor maps** (`cp.async.bulk.tensor`): the same engine, told a 2-D tensor's shape and
#   strides once (a 128-byte descriptor built on the host), moves a whole box with one
#   instruction: the tile's eight 2 KB rows at once, or the activation tile straight into the
#   swizzled layout the consumers read, with zeros for rows past the batch.
# * **`wgmma`**: 4 warps issue one asynchronous matrix product. Rung 4's dequantized fragments
#   become its register operand, and the activations are read from shared memory.
#
# So the block splits into a producer warpgroup and two consumer warpgroups, and `setmaxnreg`
# moves registers from the producer to the consumers:
#
# ```
#   producer warpgroup                          consumer warpgroups 0, 1
#   wait empty[s]                               wait full[s]
#   thread 0: one tensor-map copy of      --->  ld.shared weight word, dequantize (rung 4)
#     weights, scale rows, two tensor-map       up to 16 rows: mma.sync m16n8k16 (rung 7's
#     copies of activations (49-64 rows:          transposed product); more: 4 x wgmma
#     the 128 threads cp.async those)             m64 n(16 m-blocks) k16, 4 k16 steps in flight
#                                         <---  arrive empty[s] once done with the slot
# ```
#
# The two consumer warpgroups take the tiles in turn. From 65 rows a slab is 128 rows, and one
# warpgroup's sums of a 256-column tile would not fit its registers; there both take every tile,
# each half of its columns, with `wgmma` n128.
#
# Why not `wgmma` at every batch size? Measured, not assumed: with n = 16 a tile's 32 `wgmma`s
# cost more than its bytes take to arrive, while its 128-256 `mma.sync`s do not (the Explanation
# below, and `docs/rungs.md`).
#
# The schedule (SM-striped runs of tiles), the workspace and the numerics are rung 6's: the same
# error-bound constant, and bit-identical repeats. The partial sums across blocks are added as
# in rung 6, but only the tokens the launch has are stored and read.

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
# tensor-core floor at M = 64. That first version (one producer warp, `wgmma` everywhere) missed
# by a factor of two; the second round below started from measurements, and each of its
# changes was predicted before it ran.

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
# Round 1 was a miss: correct (within the error bound, bit-identical repeats, memcheck clean)
# but slower than rung 6 everywhere, about 1 µs per 128 × 256 tile per SM.
#
# Round 2 measured before changing anything. Compiled-in ablations showed that consumers doing
# nothing but waiting for a slot and handing it back still took 82 µs on the benchmark shape
# (the floor is 67 µs), and 241 µs at M = 64: the single producer warp was the limit. Its
# activation copies were long chains of address arithmetic. Spread over the producer's 128
# threads, with addresses stepped by a constant, the stream-only time fell to 68 µs and the
# kernel from 137 to 108 µs (M ≤ 16) and from 350 to 160 µs (M = 64).
#
# Then the consumers: with the dequantization removed a tile still cost about 42 cycles per
# m64n16k16 `wgmma`, more than its bytes take to arrive. Up to 16 rows the consumers now use
# `mma.sync`, which brought M ≤ 8 to 93 µs (2.75× over FP16). Four consumer warpgroups instead
# of two were tried and were slower (more instructions per tile, more warps competing for
# issue), so they were not kept.
#
# Round 3 found that the consumers alone (the producer handing over empty slots) took 62 µs
# and the producer alone 67 µs, but the two together 90 µs: each near the floor, coupled
# through a finite ring, they lose each other's stalls. The consumers need a margin under the
# floor. Three changes gave it: on the `mma.sync` path the scales multiply each tile's fp32
# sums instead of every weight (the error bound's constant becomes 11), a few instructions of
# address arithmetic per tile were kept in registers, and the two warpgroups now take whole
# tiles in turn rather than alternate k16 steps of each tile. M ≤ 8 went to 81 µs (3.1× over
# FP16).
#
# Round 4 went after the fixed cost of a launch. On the 4096 × 4096 layer the producer alone
# took 7.6 µs for 1.9 µs of bytes: the gap between two kernels, the first tiles' latency and
# the reduction tail, which decoding pays once per layer. Each launch is now a *programmatic
# dependent launch*: the kernel starts while the previous one in the stream finishes, and since
# the weights are constants that no kernel writes, its producer requests the first ring of
# them before it waits (`griddepcontrol.wait`) for the activations. That layer went from 9.8
# to 7.5 µs, the Llama-2-7B sum to 2.15× over FP16 at M = 1. The same round found that the
# kernel runs at the H200's 700 W power cap (the SM clock drops to 1860 MHz while the weights
# stream), that the ring's depth is not what limits it, and that a ring of an odd number of
# slots hung: it is even now, so each slot serves one consumer warpgroup.
# With that, rung 8 is ahead of rung 6 or within 2 % on every layer measured up to 16 rows,
# and `MarlinLinear` takes it by itself on Hopper. A third consumer warpgroup (round 5) was
# tried and was not faster.
#
# Round 6 looked above 64 rows, where the batch was cut into 64-row slabs: every weight tile
# was read and dequantized once per 64 rows. Now both consumer warpgroups take every tile of a
# 128-row slab, each half its columns, with twice as many tokens per `wgmma`. M = 128 on the
# benchmark shape went from 0.92× to 1.14× over FP16, M = 256 from 0.71× to 0.89×, about 15 %
# short of the prediction: the profile shows the tensor pipe two thirds busy with issue and
# bytes to spare. Keeping four `wgmma` groups in flight instead of two bought 2-15 % in a
# same-run comparison from 64 rows up, and nothing at 32 rows.
#
# Round 7 went back to the narrow layers, by leaving parts of the kernel out (`no-reduce`,
# `launch-only` in `scripts/s8_variants.py`) and by timing each launch after a kernel that
# knows nothing of dependent launches, as a GEMM in a model follows a norm or an activation.
# Adding the partial sums across blocks cost about 2 µs of a 4096 × 4096 layer's 7: the blocks
# now store, and the last one reads, only the tokens the launch has (1 KB a block at M = 1
# instead of 16). And that layer had run on 64 of the 132 SMs: the schedule's bound on the
# blocks sharing a slice assumed one more than the exact count. Counted exactly it runs on 128.
# After another kernel, as in a model, it went from 9.6 to 8.4 µs at M = 1 (11.0 to 9.7 at 16
# rows); in the benchmark, where each launch overlaps the one before, it is level at M = 1 and
# half a microsecond slower at 16 rows, because there the idle half of the GPU had let the next
# launch start early, and now the last block reads eight contributors' partial sums, not four. The same measurement shows what the benchmark does
# not: in a model, rung 8 at 16 rows costs more per launch than rung 6.
#
# Round 8 shortened the waits at a slice's end. A run's first segment is the bottom of a slice
# whose top another block reaches only at the end of its own run, so there the block almost never
# arrives last: it now stores its partial sums, counts itself in and goes on to its next tiles,
# and looks at the count's answer only when its run is done. At a run's final segment the other
# blocks have often all arrived already; thread 0 reads the counter while the warpgroups hand
# over their sums, and if everyone else is in, the block adds the slice without a fence or an
# atomic of its own. Exactly one block still writes each slice, in the same order, so the
# outputs are bit for bit the same as before.
#
# Round 9 changed nothing in the kernel and found where the rest of the time goes at 16 rows or
# fewer. The producer alone streams the benchmark shape in 65 µs, the consumers alone take 56, the
# kernel 84. Neither the slots the consumers hold nor the power cap explains the difference (at
# M = 1 the clock drops 3 %). What does: every tile waits for the activation copies of all 128
# producer threads, and while the consumers' warps issue arithmetic on the same schedulers, each
# of those threads gets its turn later. Leaving the copies out (a wrong result, a right timing)
# takes the kernel to 73.5 µs. Copying the tile from one thread instead, with one bulk copy per
# row, made each copy wait for the one before, which was slower from 8 rows. Letting memory run
# ahead of the ring into L2 made everything slower: L2 then looked up every weight twice.
#
# Round 10 built that copy with a *tensor map*: a descriptor of a 2-D tensor, encoded on the host,
# with which one instruction moves a whole box. The activation tile now arrives in two copies,
# already swizzled, with zeros for the rows past the batch, and a tile's eight weight rows in one.
# The surprise was which of the two mattered. The activations' map alone gained 3 µs at M = 1, the
# weights' map alone 12: thread 0's nine copies a tile, each waiting for the one before, had used
# more than half of the ~540 ns that each tile may take, and any delay of that thread from the
# consumers' arithmetic made the tile late. With both, the benchmark shape runs at 72-73 µs up to
# 8 rows (3.5× over FP16), within 3 µs of the producer alone, and from 16 rows the consumers are
# the limit.
#
# Round 11 changed one field of the tensor maps: no L2 promotion. Each weight byte is read once, and
# without promotion the benchmark shape runs at 67-69 µs up to 8 rows, 96-98 % of the bandwidth
# measured in the run (3.7× over FP16). It also timed each launch after another kernel, as a model
# runs it, on 17 layer shapes: there rung 8 pays about 8 µs per launch before its first byte counts,
# 2 µs more than back to back (the dependent launch has nothing to overlap with) and 2 µs more than
# rung 6, while it streams faster. So `MarlinLinear` now hands 9-16-row launches to rung 6 only for
# weights below the size where the two lines cross.
#
# `docs/rungs.md` has the numbers, the misses and the next levers.

# %% [markdown]
# ## The whole table

# %%
nb.benchmark("s8_hopper", below="s6_marlin", preset="llama-7b")

# %% [markdown]
# ## Try this
#
# * Read `docs/results/tuning/*s8v*`: the producer designs, the ablations and the instruction
#   choice, side by side. `scripts/s8_variants.py` reruns them on a Hopper GPU, and
#   `stream-only` shows what the ring alone delivers.
# * Compare `stream-only` with `busy-stream` and `busy-stream,no-activation-copies`: arithmetic
#   that touches no memory still slows the weights down, through the producer's threads.
# * Time `base tma_weights=0 tma_activations=0` with `scripts/s8_variants.py`: each copy path
#   back to round 9's, one at a time, with bit-identical outputs.
# * Count the instructions between two `HGMMA`s in the machine code:
#   `cuobjdump -sass` of `nvcc -cubin -gencode=arch=compute_90a,code=sm_90a csrc/s8_hopper.cu`.
