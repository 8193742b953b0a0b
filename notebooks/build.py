"""Write the notebooks of the ladder: `python notebooks/build.py` (rewrites notebooks/*.ipynb).

The notebooks are kept here as data so they are easy to edit and review: one function
per chapter returns its cells. They are written without outputs and with fixed cell
ids, so rebuilding unchanged cells changes no byte. Outputs come from executing them
(`scripts/execute_notebooks_on_gpu.sh` on a GPU; tests/test_notebooks.py on a CPU).
`--keep-outputs` keeps the outputs of every code cell whose code (comments aside) is
unchanged, so prose and comments can be edited without losing a GPU run's outputs.
Shared helpers live in `steps.harness.notebook_support`, imported as `nb`.
"""

from __future__ import annotations

import difflib
import io
import sys
import tokenize
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
from pathlib import Path

# Without a GPU, rung 1 runs in Numba's CUDA simulator; that must be chosen before Numba is imported.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import matplotlib.pyplot as plt
import numpy as np

import reference as ref
from steps.harness import notebook_support as nb"""


def md(text: str) -> tuple[str, str]:
    return "markdown", text.strip()


def code(text: str) -> tuple[str, str]:
    return "code", text.strip()


def header(number: int, name: str, title: str, below: str | None) -> list[tuple[str, str]]:
    prev = f"Previous rung: `{below}`." if below else "This is the first rung."
    return [
        md(f"# {number:02d} · {title}\n\n*Rung `{name}` of the marlin-ladder.* {prev}"),
        code(SETUP),
        code(f'nb.rung_status("{name}")'),
    ]


MEASURED = """\
def cell(row):
    return f"{row['us']:9.1f} us {row['speedup_vs_fp16']:7.3g}x" if row else f"{'not stored':>21s}"

for preset in ("ideal", "llama-7b"):
    this, prev = nb.stored_by_batch(rung, preset), nb.stored_by_batch(below, preset)
    if not this:
        print(f"{preset}: no stored measurement of {rung} exists yet.")
        continue
    print(f"{preset}, shape {next(iter(this.values()))['shape']}, H100 (time, speedup over FP16):")
    print(f"{'M':>4s}  {below:>21s}  {rung:>21s}  gain over the rung below")
    for M in (1, 16, 64):
        a, b = prev.get(M), this.get(M)
        gain = f"{a['us'] / b['us']:.3g}x" if a and b else "no stored pair"
        print(f"{M:4d}  {cell(a)}  {cell(b)}  {gain}")
nb.ncu_rows(below, rung)"""


def measured(name: str, below: str, check_args: str, explanation: str) -> list[tuple[str, str]]:
    """The live correctness check, the stored H100 measurement against the rung below with
    the explanation of how it compares with the prediction, and the benchmark table."""
    return [
        md(
            "## Is it right?\n\nThe rung runs once on random data and every output is held to the "
            "reference's bound `c·u·(|A|@|W|)`, with the rung's own constant `c`. Without a GPU a CUDA "
            "rung says so and is skipped."
        ),
        code(f'nb.check("{name}", {check_args})'),
        md(
            "## Measured\n\nFrom the H100 results committed in `docs/results/` (CUDA-graph replay, weights "
            "rotated past the L2): this rung and the rung below at M = 1, 16 and 64, on the benchmark shape "
            "and summed over the four linear layers of Llama-2-7B. The gain is the rung below's time divided "
            "by this rung's. Under it, the rows of the Nsight Compute profile (one launch per kernel, M = 16, "
            "benchmark shape) for the two rungs, where the profile has them."
        ),
        code(f'rung, below = "{name}", "{below}"\n' + MEASURED),
        md("## Explanation\n\n" + explanation.strip()),
        md(
            "## The whole table\n\nBeside FP16 cuBLAS at every stored batch size, with the floor. On a GPU "
            "this cell measures live (`steps.harness.bench.run`, CUDA-graph replay, weights rotated past the L2); "
            "elsewhere it shows the H100 results committed in `docs/results/`."
        ),
        code(f'nb.benchmark("{name}", below="{below}")'),
    ]


FLOOR = code("""\
K, N, sms, source = nb.benchmark_shape()
int4 = nb.floor(K, N, group_size=128)
fp16 = nb.Floor(2 * K * N, int4.gbps, int4.bandwidth_source)
print(f"benchmark shape K={K} x N={N}: {sms} SMs ({source})")
print(f"int4 + g128 scales: {int4}")
print(f"fp16 weights:       {fp16}")
print(f"best possible speedup over FP16 while both are memory-bound: {fp16.us / int4.us:.2f}x")""")


# -- 00 ---------------------------------------------------------------------------------
def reference_chapter():
    return header(0, "s0_numpy", "The reference: what every rung computes", None) + [
        md("""
## The idea

A large language model generating text multiplies a handful of activation rows `A` (M×K,
one row per sequence in the batch) by every weight matrix `W` (K×N) of the model, once per
token. With M between 1 and a few dozen there is almost no arithmetic per weight: each
weight is read from memory, used M times, and thrown away. The time is the time to *read
the weights*. Storing them in 4 bits instead of 16 therefore promises up to 4× — if a
kernel can turn those 4 bits back into fp16 numbers without slowing the stream down.

This chapter defines the function every rung computes. A weight is a 4-bit code `q` in
0..15 and a scale `s` shared by a group of 128 rows of one column:

    W[k, n] = fp16((q[k, n] - 8) · s[k // 128, n])

and `C = A @ W`, computed by the reference in float64 with one rounding to fp16 at the end.
`s0_numpy` does exactly this with NumPy: unpack, dequantize, one matrix product."""),
        md("## Quantizing a weight matrix\n\nRound-to-nearest, one fp16 scale per 64 rows here so the groups are visible:"),
        code("""\
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
print("scales of column 0, one per group:", qw.scales[:, 0])"""),
        md("""
The codes travel packed, eight to a 32-bit word along K: word `(r, n)` holds rows `8r..8r+7`
of column `n`, row `8r+i` in bits `4i..4i+3`. This is also how GPTQ checkpoints store `qweight`."""),
        code("""\
from reference.packing import pack_int4_along_k

word = int(pack_int4_along_k(qw.codes[:8, :1])[0, 0]) & 0xFFFFFFFF
bits = np.array([(word >> b) & 1 for b in range(31, -1, -1)])[None]
fig, ax = plt.subplots(figsize=(11, 1.1))
nb.draw_grid(ax, np.repeat(np.arange(7, -1, -1), 4)[None], f"word 0x{word:08X}: nibble i (bits 4i..4i+3) = code of row i",
             labels=bits, cmap="Pastel1")
for i in range(8):
    ax.text(31 - 4 * i - 1.5, -0.75, f"row {i}: q={qw.codes[i, 0]}", ha="center", fontsize=7)
plt.show()"""),
        md("## The rung's code\n\nThe whole of `s0_numpy`'s product, from `steps/s0_numpy.py`:"),
        code('nb.show_source("steps/s0_numpy.py", "def _run")'),
        md("""
## How right is "right"?

A GPU kernel adds its products in a different order and in fp32, so it cannot match the
float64 reference bit for bit. `reference.error_bound` says how far it may be off, element
by element: `c · u · (|A| @ |W|) + 2⁻²⁴` with `u = 2⁻¹¹`, the fp16 unit roundoff. Using
`|A| @ |W|` instead of `|C|` matters: when positive and negative products cancel, `C` is
small but the rounding errors are as large as the products. Each rung states its `c`
(s0: 4). Below, every output of s0 against its bound:"""),
        code("""\
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
print("largest error / bound:", ref.error_excess(C, A, qw, s0.error_c))"""),
        md("""
## The floor, and the prediction for the whole ladder

The benchmark shape scales with the GPU: K = 256·SMs, N = 128·SMs, so every SM has work.
No kernel can beat the time to read its weights once at the GPU's streaming-read
bandwidth. That bound, for 4-bit weights with one fp16 scale per 128 rows, against the
same bound for fp16 weights, is the speedup MARLIN is after:"""),
        FLOOR,
        md("""
The ratio is `2 / (0.5 + 2/128) ≈ 3.88`: the scales cost 3% of the int4 bytes. The
rest of the ladder is the story of getting close to that number.

s0 itself runs on the CPU, so its benchmark is live here, against a NumPy float32 product
on a small 1024×1024 weight. It is slower than a plain float product: dequantizing
every weight on every call costs more than the product saves."""),
        code('nb.benchmark("s0_numpy")'),
        md("""
## Try this

* Quantize with `group_size=-1` (one scale per column) and with `symmetric=False`; compare
  the largest `|W - W_deq|` to `s / 2`.
* Replace `A` by activations with one huge outlier column and watch the error bound follow.
* `python -m steps check` runs every rung this machine has against the reference."""),
    ]


# -- 01 ---------------------------------------------------------------------------------
def numba_chapter():
    return header(1, "s1_numba_naive", "Numba: one GPU thread per output", "s0_numpy") + [
        md("""
## The idea

Move the product to the GPU in the most direct way: one thread per output element `C[m, n]`.
The thread walks down column `n` of the packed weights, pulls each 4-bit code out of its
word, multiplies it by its group's scale and accumulates `a · w` in fp32. Neighbouring
threads take neighbouring columns, so when a warp loads "row r of the words" it reads 32
consecutive words: one coalesced 128-byte transaction.

The kernel is written in Python with Numba; without a GPU the very same kernel runs in
Numba's CUDA simulator, slowly, which is how this notebook checks it on a CPU."""),
        code('nb.show_source("steps/_s1_kernel.py", "@cuda.jit")'),
        md("""
## Which thread computes what

The launch is a 2-D grid: blocks of 128 threads along N, one block row per row of A. The
picture colours a small C by block, and shows which words one warp reads at one step of K."""),
        code("""\
from steps.s1_numba_naive import THREADS_PER_BLOCK

M, N = 4, 512
block = np.broadcast_to(np.arange(N) // THREADS_PER_BLOCK, (M, N)) + 4 * np.arange(M)[:, None]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 2.2))
nb.draw_grid(a, block, f"C ({M}x{N}): one thread per element, blocks of {THREADS_PER_BLOCK} threads (colours)")
words = np.zeros((16, 64), dtype=int); words[3, :32] = 1
nb.draw_grid(b, words, "packed words (K/8 x N): one warp at k-row 3 reads 32 adjacent words", cmap="Greys")
plt.show()"""),
        md("""
## Prediction

Nothing is shared between threads. Every thread re-reads its whole row of A, and every
weight word is read once per row of A: M times. A thread spends several integer
instructions (shift, mask, convert, scale) on each weight before its single FMA. The
kernel is limited by instructions and load traffic, not by DRAM bandwidth: expect it to be
far *slower than FP16 cuBLAS* even at M = 1, and to get slower in proportion to M.

There is no gain over rung 0 to predict: s0 runs on the CPU, so the two are not timed on the
same machine. What this rung should show is the distance a straightforward GPU kernel keeps
from FP16, and that the distance grows with M."""),
        code("""\
K, N, sms, source = nb.benchmark_shape()
for M in (1, 16, 64):
    loads = M * N * K / 8 + M * N * K  # weight-word loads + activation loads, one per thread per step
    print(f"M={M:3d}: {loads / 1e9:6.1f} G scalar loads for {nb.weight_bytes(K, N) / 1e6:.0f} MB of weights")"""),
    ] + measured("s1_numba_naive", "s0_numpy", "M=2, K=128, N=64, group_size=32", """
The prediction holds. Every printed speedup over FP16 is a tiny fraction of one, even at
M = 1, and the floor is further away still. On the Llama-2-7B sum the time
grows with M because every row of A re-reads every weight word: from M = 16 to M = 64 the
growth is close to the four-fold of the weight loads, while from M = 1 to 16 it is less than
sixteen-fold, most likely because at M = 1 each thread's fixed work (its walk down K, the index
arithmetic, the launch) is a larger share. The benchmark shape is stored at M = 16 only, so
its other rows say *not stored*. The rung below has no GPU rows, so no gain is printed, and
the Nsight Compute workload (`scripts/ncu_ladder.py`) profiles the compiled rungs s2 to s6,
not this Numba kernel.""") + [
        md("""
## Try this

* Swap the roles: let consecutive threads take consecutive *rows* `m` instead of columns.
  The weight loads of a warp stop being coalesced; on a GPU the time grows several-fold.
* In the simulator, `print` inside the kernel works: print `code` for thread (0, 0)."""),
    ]


# -- 02 ---------------------------------------------------------------------------------
def smem_chapter():
    return header(2, "s2_smem_tiling", "Shared-memory tiling", "s1_numba_naive") + [
        md("""
## The idea

Rung 1 read each weight M times and each activation N times. Here a *block* of 128 threads
owns a tile of C — BM rows × 128 columns — and walks K in slices of 64. For each slice it
loads A and the packed weights once, with 16-byte coalesced loads, dequantizes every
weight once into shared memory, and then all its threads reuse those values from shared
memory. Each thread keeps a small TM × 8 block of outputs in fp32 registers, so every value
it reads from shared memory feeds several FMAs. The loads of slice k+1 are issued before
the FMAs of slice k, so memory and arithmetic overlap."""),
        md("## The tiling, drawn from the kernel's own constants"),
        code("""\
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
plt.show()"""),
        md("""
Why two runs 64 columns apart rather than 8 adjacent columns? A warp's 32 threads then read
one contiguous 512-byte row of the weight tile from shared memory with `float4` loads — no
bank conflicts — and again for the second run."""),
        code('nb.show_source("csrc/s2_smem_tiling.cu", "__device__ __forceinline__ void fma_slice")'),
        md("""
## Prediction

Traffic to DRAM is now close to the weight bytes, but the multiply-adds run on the fp32
units. 2·M·K·N flops at the H100's ~67 TFLOP/s of non-tensor fp32 against the memory floor:"""),
        code("""\
K, N, sms, source = nb.benchmark_shape()
f = nb.floor(K, N)
print(f"memory floor: {f.us:.0f} us")
for M in (1, 4, 16, 64):
    print(f"M={M:3d}: fp32 FMA time at 67 TFLOP/s = {2 * M * K * N / 67e12 * 1e6:7.0f} us")"""),
        md("""
Beyond M ≈ 4 the FMAs, not the bytes, set the pace, and each weight is also turned into an
fp32 value in shared memory before any FMA sees it. Against rung 1 each weight is loaded
once per block instead of once per row of A, so DRAM traffic should fall to the floor's
bytes and the gain over rung 1 should be large and grow with M. Against FP16 cuBLAS (which
uses tensor cores) expect this rung still slower for M ≥ 16, and at M = 64, where FMAs set
the pace, slower than at M = 16."""),
    ] + measured("s2_smem_tiling", "s1_numba_naive", "M=16, K=1024, N=512", """
The gain over rung 1 is as large as predicted, and larger at higher M, since rung 1's
weight traffic grows with M and this rung's does not. The profile's *DRAM read* column
confirms the first half of the prediction: the kernel reads the floor's bytes, no more.

What misses is small M. Where the FMA estimate says the bytes should set the pace, the
rung still sits far above the floor and slower than FP16, and the profile says why: DRAM
throughput is a small fraction of peak, so the time goes elsewhere. At M = 16 the grid is
one block of four warps per SM (see *blocks* and the single-digit *achieved occupancy*), so
few loads are in flight, and writing the dequantized fp32 tile into shared memory causes
a flood of store bank conflicts (the *smem store bank conflicts* column). Above M = 16 the rung switches to 64-row blocks and
becomes FMA-bound, as predicted, which is why its time roughly doubles from M = 16 to
M = 64.""") + [
        md("""
## Try this

* `S2_BM` picks the rows of A per block (16 or 64): time both at M = 64 (the host side is
  `steps/s2_smem_tiling.py`, `block_m`).
* Make `BK` 32 or 128 and watch registers and occupancy (`nvcc --resource-usage`)."""),
    ]


# -- 03 ---------------------------------------------------------------------------------
def tensor_core_chapter():
    return header(3, "s3_tensor_cores", "Tensor cores: mma.sync m16n8k16", "s2_smem_tiling") + [
        md("""
## The idea

One `mma.sync.m16n8k16` instruction multiplies a 16×16 fp16 tile of A by a 16×8 tile of W
and adds into a 16×8 fp32 tile of C: 2048 multiply-adds for one warp, in one go. The catch
is that the operands must sit in the warp's registers in a fixed pattern: each of the 32
lanes holds a few specific elements. `ldmatrix` loads 8×8 blocks from shared memory straight
into that pattern. So rung 3 keeps rung 2's tiling, stores fp16 instead of fp32 in shared
memory, and lets `ldmatrix` + `mma` do the rest. The arithmetic all but disappears."""),
        md("""
## The fragments, lane by lane

Lane `l = 4g + c` holds: of A, rows `g` and `g+8` at columns `2c, 2c+1` and `2c+8, 2c+9`; of
B, column `g` at rows `2c, 2c+1` and `2c+8, 2c+9`; of C, rows `g, g+8` at columns `2c, 2c+1`.
The B pattern below comes from `reference.marlin_layout.FRAGMENT_ROWS`, the model the MARLIN
rungs are tested against; A and C follow the formulas in `csrc/common.cuh`."""),
        code("""\
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
plt.show()"""),
        code('nb.show_source("csrc/s3_tensor_cores.cu", "__device__ __forceinline__ void mma_slice")'),
        md("""
## Prediction

The H100's fp16 tensor cores do ~990 TFLOP/s (dense), so at M = 16 the math takes a fifth of
the time the weights take to arrive: the kernel is a weight stream again. (At M = 64 the two
are about equal — this is where every int4 kernel's advantage over FP16 starts to fade, as
FP16 itself stops being memory-bound.) But each weight still takes a
detour — global → registers → dequantize → shared memory → `ldmatrix` → registers — and
every slice ends in a `__syncthreads`. Against rung 2 the FMA limit disappears (one `mma`
does the work of 2048 FMAs), so the rung should become memory-latency-bound and several times
faster than rung 2. Expect the first rung *faster than FP16* at small M, but well short of
the floor."""),
        code("""\
K, N, sms, source = nb.benchmark_shape()
print(f"memory floor: {nb.floor(K, N).us:.0f} us")
for M in (1, 16, 64):
    print(f"M={M:3d}: tensor-core time at 990 TFLOP/s = {2 * M * K * N / 990e12 * 1e6:5.1f} us")"""),
    ] + measured("s3_tensor_cores", "s2_smem_tiling", "M=16, K=1024, N=512", """
Both halves of the prediction hold on the benchmark shape: the rung is several times
faster than rung 2, and at small M it is faster than FP16. But it is still far above the
floor (the whole table below prints its share of the read bandwidth). The profile shows the tensor pipe mostly idle and
DRAM mostly idle too: the warps are waiting. Three causes, all visible in the kernel:
each block stages a single K slice in registers before writing it to shared memory, so only
one slice of loads per block is in flight; each code is converted with a plain
integer-to-half conversion; and the high *registers / thread* allow only two blocks (eight
warps) per SM. At M = 64 the advantage over FP16 is gone, as the tensor-core arithmetic
above warned: FP16 stays memory-bound while this rung's extra work per weight grows with M.
On the Llama-2-7B sum the layers are narrower than the GPU is wide, fewer blocks are
launched, and the rung stays below FP16 even at M = 1. Rungs 4 and 5 attack the causes in
turn: cheaper dequantization, then far more bytes in flight.""") + [
        md("""
## Try this

* Remove the 8-element padding of the shared-memory rows (`A_STRIDE`, `W_STRIDE`) and
  count the bank conflicts with Nsight Compute: `ldmatrix` reads 8 rows at once.
* Compare `S3_M_TILES` 1, 2, 4 at M = 64."""),
    ]


# -- 04 ---------------------------------------------------------------------------------
def marlin_layout_chapter():
    return header(4, "s4_marlin_layout", "The MARLIN layout: weights straight into fragments", "s3_tensor_cores") + [
        md("""
## The idea

Rung 3 reshuffled every weight at run time, through shared memory, into the order `mma`
wants. But the order never changes: it can be done *once, offline*. MARLIN permutes the
packed weights so that one 128-bit load by lane `l` brings exactly the 32 codes of its B
fragments for four 16×16 tiles side by side (its warp's 64-column strip, 16 rows of K).
No shared memory, no `ldmatrix` for the weights: every weight bit is loaded by the lane
that multiplies it, once. The scales are permuted the same way."""),
        md("""
## The weight permutation

From `reference.marlin_layout`, the model the kernel's packing calls. Left: the first 16×16
tile of a 16×64 block, each code labelled with the lane that loads it — the B-fragment
pattern of the previous chapter. Right: the whole block, with the 32 codes of lane 0's one
128-bit load labelled `word.nibble`: four words, one per tile, eight nibbles each."""),
        code("""\
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
plt.show()"""),
        md("""
The nibbles inside each 32-bit word are interleaved 0, 2, 4, 6, 1, 3, 5, 7: the
dequantization below extracts nibbles in pairs (0, 4), (1, 5), … — one from each 16-bit half —
and each pair must be two neighbouring fragment values."""),
        code("""\
print("fragment value held by nibble 0..7:", ml.VALUE_OF_NIBBLE)
rng = np.random.default_rng(0)
qw = ref.random_quantized_weight(rng, 256, 256, group_size=128)
words = ml.pack_marlin_weights(qw)
print("pack -> unpack is exact:", np.array_equal(ml.unpack_marlin_weights(words), qw.codes))"""),
        md("""
## The lop3 trick: int4 → fp16 in two instructions

fp16 `0x6400` is 1024.0, and between 1024 and 2048 its ten mantissa bits count in steps of
exactly 1. So OR-ing a 4-bit code `v` into the low mantissa bits *is* the number `1024 + v`;
subtracting 1032 gives `v - 8`, the signed weight, exactly. One `lop3` instruction computes
`(q AND mask) OR 0x6400` for both 16-bit halves of a register at once, so two fp16 weights
cost one `lop3` and one `__hsub2`. The high nibble of each byte lands at `1024 + 16v` and is
fixed with one fused multiply-add (`x · 1/16 − 72`)."""),
        code("""\
v = np.arange(16, dtype=np.uint16)
patterns = (v | 0x6400).view(np.float16)
bits = ((v[:, None] | 0x6400) >> np.arange(15, -1, -1)) & 1
fig, ax = plt.subplots(figsize=(9, 4))
field = np.broadcast_to(np.r_[0, [1] * 5, [2] * 6, [3] * 4], (16, 16))
nb.draw_grid(ax, field, "0x6400 | v: sign | exponent (=25) | mantissa | code v", labels=bits, cmap="Pastel2")
ax.set_yticks(range(16)); ax.set_yticklabels([f"v={i:2d} -> {float(p):.0f}" for i, p in enumerate(patterns)], fontsize=7)
plt.show()"""),
        md("Bit for bit, for every code in every nibble position, the model of the kernel's dequantization against plain `q - 8`:"),
        code("""\
all_codes = np.arange(16, dtype=np.uint32)
ok = True
for nibble in range(8):
    word = all_codes << np.uint32(4 * nibble)
    got = ml.lop3_dequantize_word(word)[:, ml.VALUE_OF_NIBBLE[nibble]]
    ok &= np.array_equal(got, (all_codes.astype(np.float16) - 8))
print("lop3 model == q - 8 for all 16 codes x 8 nibble positions:", ok)
print("whole layout (words, permuted scales, lop3, scale) == reference.dequantize:",
      np.array_equal(ml.dequantize_marlin(words, ml.permute_scales(qw.scales), 128), ref.dequantize(qw)))"""),
        code('nb.show_source("csrc/marlin_core.cuh", "struct Fp16 :")'),
        md("""
The kernels take the element type as a template parameter: `marlin::Fp16` above holds the
three things that depend on it (this dequantization, the `mma` instruction, the final
rounding). s5 and s6 also compile with `marlin::Bf16` for bf16 models. bf16 has only 7
mantissa bits, so its magic number is `0x4300` (128, whose last place is 1) and the high
nibble, which would reach into the exponent, is shifted down instead of scaled: one more
instruction per pair. The reference models both, bit for bit
(`ml.lop3_dequantize_word(word, dtype=...)`)."""),
        code('nb.show_source("csrc/marlin_core.cuh", "struct Bf16 :")'),
        md("""
## The scale permutation

Lane `4g + c` multiplies columns `16j + 8h + g` of its strip (tile `j`, half `h`). Reordering
each 64-column chunk so those eight scales sit side by side is an 8×8 transpose: one
128-bit load, and it stays in registers for the whole group."""),
        code("""\
cols = np.arange(64)[None].astype(np.float16)
perm = ml.permute_scales(cols).astype(int)[0]
fig, ax = plt.subplots(figsize=(11, 1.3))
nb.draw_grid(ax, (perm // 8)[None], "position p holds the scale of column ... (colour: lane group g = column % 8)",
             labels=perm[None], cmap="tab10")
plt.show()"""),
        md("## The kernel\n\nFour warps per 64-column strip, taking every fourth k16 step of K. Per batch, each lane requests its weight words; meanwhile the block copies the batch's rows of A and its scales into shared memory once. Per k16 step the warp then reads its A fragments with `ldmatrix` and runs `multiply_k16` (dequantize + 8 mmas) on one 128-bit weight word:"),
        code('nb.show_source("csrc/s4_marlin_layout.cu", "s4_marlin_layout(")'),
        md("""
## Prediction

The bytes are now exactly the floor's bytes, each touched by one load instruction, and the
dequantization costs about one instruction per weight. What is missing is *latency
hiding*: a warp can only have as many loads in flight as it has registers to receive them
(`LOADS_AHEAD` words, requested before the first is used), and four warps share each
64-column strip."""),
        code('nb.show_source("csrc/s4_marlin_layout.cu", "constexpr int LOADS_AHEAD")'),
        md("By Little's law, bandwidth = bytes in flight / latency:"),
        code("""\
K, N, sms, source = nb.benchmark_shape()
latency_us = 0.8  # a typical HBM round trip under load
loads_ahead = 16  # LOADS_AHEAD at M <= 16, from the line above
warps = 4 * N // 64  # four warps per 64-column strip
in_flight = warps * 32 * 16 * loads_ahead  # warps x lanes x 16 bytes x loads ahead
print(f"{warps} warps x {32 * 16 * loads_ahead // 1024} KB = {in_flight / 1e6:.2f} MB in flight -> at most {in_flight / latency_us / 1e3:,.0f} GB/s")
print(f"the floor needs {nb.floor(K, N).gbps:,.0f} GB/s x {latency_us} us = {nb.floor(K, N).gbps * latency_us / 1e3:.1f} MB in flight")"""),
        md("""
On paper that is plenty, but only if every warp keeps its loads outstanding all the time.
It does not: each batch of loads is followed by a stretch of compute during which that warp
has nothing in flight, and the next batch starts with a full round trip. A first version of
this rung also loaded A and the scales from global memory right before every k16 step, and
was *slower* than rung 3: every step waited for L2. This version copies each batch's rows of
A and its scales into shared memory once per block, while the weight loads are in flight.
Expect it to beat rung 3 at small M, and still sit far from the floor."""),
    ] + measured("s4_marlin_layout", "s3_tensor_cores", "M=16, K=1024, N=512", """
The prediction holds at small M: s4 is ahead of rung 3 on the benchmark shape and on the
Llama-2-7B sum, and the profile shows DRAM throughput above rung 3's. It is a modest step,
not a large one, because the Little's-law estimate above assumed every warp keeps its
loads outstanding all the time; in fact each batch ends in compute with nothing in flight,
and the next begins with an unhidden round trip. At M = 32 (the table below) s4 falls
behind rung 3 again: a 32-row slab halves `LOADS_AHEAD` so that A still fits in 32 KB of
shared memory, which halves the bytes in flight per warp. The lesson of the rung: the
layout removes work, but the latency has to be hidden before that shows, which is rung 5's
job.""") + [
        md("""
## Try this

* Change `LOADS_AHEAD` in `csrc/s4_marlin_layout.cu` to 4, then 32: fewer or more loads in flight.
* Write the inverse of `permute_scales` without looking: it is its own inverse. Why?"""),
    ]


# -- 05 ---------------------------------------------------------------------------------
def pipeline_chapter():
    return header(5, "s5_async_pipeline", "The cp.async pipeline", "s4_marlin_layout") + [
        md("""
## The idea

To stream at full bandwidth, a GPU needs megabytes of loads in flight (bandwidth ×
latency). A register can only hold a load while the warp waits for it; `cp.async` copies
global → shared memory *without* holding registers and without stalling the warp. So each
block keeps STAGES − 1 tiles of A, weights and scales in flight while it computes on one:
a ring of shared-memory buffers. The weight copies carry an L2 *evict-first* hint (they are
read once), the register fragments are double-buffered, and 8 warps share each tile —
some side by side along N, the rest splitting K and adding their sums in shared memory."""),
        md("## How many stages fit\n\nThe rung chooses its tiles and stage count on the host (`steps/s5_async_pipeline.py`):"),
        code('nb.show_source("steps/s5_async_pipeline.py", "def config")'),
        code("""\
from steps.s4_marlin_layout import m_blocks_for
from steps.s5_async_pipeline import TileConfig, tile_shapes_for

s5 = nb.rung("s5_async_pipeline")
for M in (1, 16, 64):
    plan = s5.tile_plan(M, 4096, None)
    tk, tn = tile_shapes_for(4096, 4096, plan)
    stage = TileConfig(m_blocks_for(M), tn, tk, 1, 128).stage_bytes
    stages = min(plan.max_stages, plan.smem_budget // stage)
    print(f"M={M:3d}: tiles {tk}x{tn}, {stage / 1024:.1f} KB per stage, {stages} stages "
          f"({plan.smem_budget // 1024} KB budget), {(stages - 1) * stage / 1024:.0f} KB in flight per block")"""),
        md("""
## The timeline

A model of the loop in `marlin::Pipeline::consume` (`csrc/marlin_core.cuh`): while tile *t* is
multiplied, the copy of tile *t + STAGES − 1* is issued into the slot tile *t − 1* just
freed; `cp.async.wait_group` then waits until tile *t + 1* has landed. The reference has no
model of this pipeline, so the picture is drawn from the loop itself, with a copy taking
2.5 times as long as multiplying a tile: three stages keep two copies in flight and the
tensor cores wait every tile; four keep three and never wait once the pipeline is full."""),
        code("""\
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
fig.tight_layout(); plt.show()"""),
        code('nb.show_source("csrc/marlin_core.cuh", "__device__ __forceinline__ void consume(")'),
        md("""
## Prediction

With tens of KB in flight per block and a block per column slice, the bytes in flight
reach the megabytes that Little's law asks for — *when there are enough blocks*. The grid is
N / TILE_N column slices: on the benchmark shape that is exactly one wave (N = 128·SMs), so
expect this rung close to the floor there. On a 4096-wide layer it is 32 blocks for 132 SMs:
most of the GPU idles. Rung 6 fixes that. Against rung 4, whose time was lost waiting on
memory, this should be the biggest step up in speedup over FP16 on the whole ladder, on the
benchmark shape, and a smaller one on the Llama-2-7B layers."""),
        code("""\
K, N, sms, source = nb.benchmark_shape()
for name, n in (("benchmark shape", N), ("Llama-2-7B q/k/v/o (N=4096)", 4096)):
    print(f"{name}: {n // 128} blocks of 128 columns for {sms} SMs")"""),
    ] + measured("s5_async_pipeline", "s4_marlin_layout", "M=16, K=1024, N=512", """
A hit. No other rung adds as much speedup over FP16 as this one, and on the benchmark shape
at M ≤ 16 the rung streams the weights close to the floor (the whole table below prints
the share of the read bandwidth). The profile shows why: DRAM throughput jumps to the top of the table
while *registers / thread* fall, because the copies in flight wait in shared memory, not in
registers. Up to 32 rows it runs 4 stages: a sweep over 4, 6 and 8 put 4 at or ahead of the
deeper pipelines, because three 16 KB tiles in flight per SM already cover the latency. At
M = 64 the time grows well beyond M = 16's: there the limit is the arithmetic of
`mma.sync`, no longer the bytes. The Llama-2-7B sum shows the predicted weak spot: one
block per 128-column slice leaves most SMs idle on a 4096-wide layer, so the speedup over
FP16 there is well below the benchmark shape's.""") + [
        md("""
## Try this

* Benchmark with `EVICT_FIRST 0` (a define of `csrc/s5_async_pipeline.cu`) on a shape whose
  weights fit in L2 several times, and on one that does not.
* Force 3 stages and then 8 (`max_stages`, `smem_budget`): where does the gain stop?"""),
    ]


# -- 06 ---------------------------------------------------------------------------------
def marlin_chapter():
    return header(6, "s6_marlin", "MARLIN: the SM-striped schedule", "s5_async_pipeline") + [
        md("""
## The idea

Give the GPU exactly one block per SM and cut the *work* evenly instead of the matrix:
number the TILE_K × TILE_N weight tiles column slice by column slice, K innermost, and let
block `b` take the contiguous run of `iters` tiles from `b · iters`. Every block streams the
same number of bytes whatever the shape. A run walks down a column slice and may continue
at the top of the next. A slice shared by several blocks needs their partial sums added:
each block stores its fp32 partials in a workspace and counts itself in the slice's
counter, and the last to arrive adds them all in block order (a fixed order, so results
are bit-identical run to run) and writes the output. Nobody waits for anybody."""),
        md("## The stripes\n\n`reference.marlin_layout.striped_schedule`, the model the kernel mirrors, on a small example: 6 column slices of 8 k-tiles on 10 SMs."),
        code("""\
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
print(f"{len(schedule)} blocks, {iters} tiles each")"""),
        md("Every tile is computed exactly once, and the blocks that share a slice are exactly the ones its last block adds up:"),
        code("""\
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
          f"{shared} of {len(parts)} slices shared; sharers consistent: {sharers_ok}")"""),
        md("""
## What the stripes buy

SM utilisation of rung 5's grid (one block per column slice, all of K) against the striped
schedule, for the four linear layers of Llama-2-7B on the benchmark GPU:"""),
        code("""\
from steps.harness.bench import LLAMA_2_7B

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
plt.bar(x - 0.2, plain, 0.4, label="s5: one block per column slice")
plt.bar(x + 0.2, striped, 0.4, label="s6: striped")
plt.xticks(x, names); plt.ylabel("busy share of SM-time"); plt.ylim(0, 1.2); plt.legend(fontsize=8, ncol=2); plt.show()"""),
        code('nb.show_source("csrc/marlin_core.cuh", "__device__ __forceinline__ void run_stripes")'),
        code('nb.show_source("csrc/marlin_core.cuh", "__device__ __forceinline__ bool add_partial_sums")'),
        md("""
## Prediction

On the benchmark shape rung 5's grid already matches the SM count (N / 128 = SMs), so s6
should gain over it only the ragged tail: a few percent. On the narrower Llama-2-7B layers
it should gain a lot, because every SM gets an equal run of tiles instead of a quarter of
them getting one column slice each. The paper reports ~3.9× over FP16 up to batch 16–32
for this schedule. The price is a reduction: blocks that share a column slice must add their
partial sums. MARLIN does it in the fp16 output, one block after another, each waiting for
a lock; here each block stores fp32 partials and the last to arrive adds them, so nobody
waits and the sum is rounded once."""),
    ] + measured("s6_marlin", "s5_async_pipeline", "M=16, K=1024, N=512", """
On the benchmark shape the prediction holds: at M ≤ 16 s6 and rung 5 both stream at about
the measured read bandwidth, and the two profile rows are nearly the same: with rung 5's
256 × 128 tiles the striped schedule gives each block exactly one column slice here, which is
rung 5's grid. Above 16 rows, where there are at least half as many 256-wide column slices
as SMs (the benchmark shape among them), s6 uses 256-wide tiles, which its striped grid
allows (rung 5 needs many column slices to fill the SMs). There the limit is arithmetic rather than bytes: with `mma.sync`
the M = 64 profile showed the tensor pipe busy more than half the time and DRAM under half
of peak. On Hopper s6 therefore switches to `wgmma`, the warpgroup MMA that the
original MARLIN (written for Ampere) does not use: the dequantized weights become its
register operand, the activations its shared-memory operand, and the tensor cores run
asynchronously while the warps dequantize the next step. That took M = 64 from about 190 to
about 155 µs, short of the predicted 110-130 µs (docs/rungs.md says where the rest goes),
and is why s6 now pulls away from rung 5 at M = 64 in the table below.

On the Llama-2-7B sum s6 is ahead of rung 5 at every printed M, as predicted. That took
three tries. With MARLIN's serial reduction (each block waits for the previous one, then
reads, adds and writes the fp16 partials) s6 was *behind* rung 5 at M = 16 and 64, because
on layers this small the chain of hand-offs cost about as much as streaming the weights;
the no-wait fp32 reduction removed the chain. Then the fixed costs per block: the pipeline
now keeps fetching the next slice's tiles while a block reduces the current one, and a
block's run is made longer when that spares it a shared slice (`stripe_length` with a
reduction cost). docs/rungs.md has each prediction and what was measured.""") + [
        md("""
## Try this

* Plot `stripes(k, n, sms)` for a layer with fewer tiles than SMs: how many blocks are
  launched, and how long are their runs?
* `MAX_SLICE_BLOCKS` caps how many blocks share a slice (and so how many partials the last
  block adds). Set it to 2 and look at how many blocks `stripes` launches for a 4096 × 4096
  layer."""),
    ]


# -- 07 ---------------------------------------------------------------------------------
def sparse_chapter():
    return header(7, "s7_sparse_marlin", "Sparse-MARLIN: 2:4 weights", "s6_marlin") + [
        md("""
## The idea

Ampere and Hopper tensor cores have a *sparse* mode: if in every group of 4 consecutive
values along K at most 2 are non-zero, `mma.sp` (m16n8k32) takes only the 2 kept values plus
a 2-bit index for each, and does the work of the dense instruction in half the time. For a
memory-bound kernel the compute does not matter; the bytes do: half the codes, plus 2 bits
of metadata per kept code. Pruning a model to 2:4 costs accuracy that has to be recovered by
fine-tuning, which is why this is a separate rung.

First the 2:4 pruning and compression of the reference, on a small matrix:"""),
        code("""\
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
plt.show()"""),
        md("""
The metadata is what the hardware reads to route the kept values to the right rows of A:
two 2-bit indices per group of 4, increasing, i.e. 4 bits per 4 rows per column.

## The metadata, lane by lane

`mma.sp` takes the *sparse* operand as its left factor, so the kernel multiplies W^T by
A^T and each 16-column tile of W is one sparse A operand. Its metadata must sit in the
registers the instruction reads: per k32 step and 64-column strip, every lane holds two
32-bit words, and lane 4g + 2s + h serves K half h of tile rows g and g + 8 through
selector s. `reference/sparse_marlin.py` packs them that way (`pack_sparse_metadata`, with
its exact inverse tested); here is which lane holds the 4-bit metadata of each group of 4
rows (down) of each column (across) in one k32 step:"""),
        code("""\
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
plt.show()"""),
        md("""
## Floor

Half the codes, the same scales, and the metadata:"""),
        code("""\
K, N, sms, source = nb.benchmark_shape()
dense, sparse = nb.floor(K, N), nb.floor(K, N, sparse_2_4=True)
fp16 = nb.Floor(2 * K * N, dense.gbps, dense.bandwidth_source)
print(f"dense int4: {dense}\\n2:4 int4:   {sparse}")
print(f"best speedup over FP16: dense {fp16.us / dense.us:.2f}x, 2:4 {fp16.us / sparse.us:.2f}x")"""),
        md("""
## Prediction

Half the codes plus 2-bit metadata is 3 bits per weight instead of 4, so the floor falls
by a quarter: where rung 6 already streams close to its floor (the benchmark shape, M ≤ 16)
s7 should gain up to 4/3 over it. `mma.sp` also halves the multiply work, which matters
where rung 6 is limited by arithmetic instead of bytes (M = 64). The paper's Sparse-MARLIN
reaches up to ~5.3× over FP16: close to this floor."""),
    ] + measured("s7_sparse_marlin", "s6_marlin", "M=16, K=1024, N=512", """
A hit, on the second attempt. The first version was a miss: a few percent ahead of rung 6
at M ≤ 16, behind it from M = 32 up. Its stall profile showed warps waiting on their own
shared-memory reads (the A fragments were read inside the substep), and the machine code
showed why the loop was long: `ldmatrix` returned the two K halves of 16 rows, while
`mma.sp` wants the four K quarters of 8 rows in one register quad, so every operand was
assembled by register moves, about a third of the loop at M = 64. Now one `ldmatrix.x4` per
8 rows returns the operand exactly as `mma.sp` reads it, and up to M = 32 the A fragments
are loaded a substep ahead like rung 6's. Executed instructions fell by a fifth at M = 16
and by a third at M = 64; s7 now streams its 3 bits per weight at nearly the full read
bandwidth and stays ahead of rung 6 at every batch size of the committed results, also
where rung 6 multiplies with `wgmma` (M ≥ 32 on Hopper).""") + [
        md("""
## Try this

* Prune a real-looking weight (rows of very different scale) and measure the relative error
  `|W - prune_2_4(W)| / |W|`: magnitude pruning keeps the large rows.
* Compress a matrix with fewer than 2 non-zeros in some group: where do the indices go?"""),
    ]


# -- 08 ---------------------------------------------------------------------------------
def end_to_end_chapter():
    return [
        md("# 08 · End to end: a decoder with MARLIN layers\n\n*The ladder's last chapter: from one matrix product to a model.*"),
        code(SETUP),
        md("""
## The plan

A kernel is only useful inside a model. The last step of the project wraps the fastest rung
in a `MarlinLinear` module (built from an `nn.Linear` or from GPTQ / AWQ tensors) that calls
a `torch.library.custom_op` with a fake implementation, so it survives `torch.compile` and
CUDA-graph capture; then every linear layer of a Llama-architecture decoder (built from a
config with random weights — nothing is downloaded) is replaced and decode tokens/s is
measured against FP16 for batch 1..128.

## What to expect

Decoding one token reads every weight once. For Llama-2-7B's linear layers at the
streaming-read bandwidth:"""),
        code("""\
from steps.harness.bench import LLAMA_2_7B

layers = 32
fp16_bytes = layers * sum(2 * k * n for k, n in LLAMA_2_7B)
int4_bytes = layers * sum(nb.weight_bytes(k, n, 128) for k, n in LLAMA_2_7B)
gbps = nb.floor(4096, 4096).gbps
for name, b in (("fp16", fp16_bytes), ("int4 g128", int4_bytes)):
    ms = b / (gbps * 1e6)
    print(f"{name:10s} {b / 1e9:5.2f} GB per token -> {ms:.2f} ms -> at most {1e3 / ms:,.0f} tokens/s at batch 1")"""),
        md("""
Attention over the KV cache, norms, sampling and launch gaps do not shrink with the
weights, so the end-to-end gain is lower than the per-layer one: the MARLIN paper reports
about 2.8× in vLLM.

## The ladder so far

Every rung's speedup over FP16 from the stored GPU results (the same data as the README
table), or a note if none are stored yet:"""),
        code("""\
rows = nb.stored_rows(None, "ideal")
if rows:
    from steps.harness.report import headline_groups, _rung_order
    for (gpu, preset, shape, g), rs in headline_groups(rows).items():
        plt.figure(figsize=(7, 4))
        for r in _rung_order(rs):
            pts = sorted((x["M"], x["speedup_vs_fp16"]) for x in rs if x["rung"] == r)
            plt.plot(*zip(*pts), marker="o", label=r)
        plt.xscale("log", base=2); plt.yscale("log", base=2); plt.grid(alpha=0.3)
        plt.xlabel("batch M"); plt.ylabel("speedup over FP16"); plt.title(f"{gpu}, {shape}"); plt.legend(fontsize=7)
        plt.show()
else:
    print("No GPU results are stored in docs/results/ yet.")"""),
        md("""
## The torch layer

If this checkout has `MarlinLinear`, a small fp16 MLP gets its linear layers swapped for it
(on this machine's device: the fastest rung that runs there), and its output is compared to
the original's. The difference is the 4-bit quantization of the weights, not the kernel."""),
        code("""\
import importlib
import importlib.util

module = nb.torch_layer_module()
if module is None or importlib.util.find_spec("torch") is None:
    print("No torch layer (MarlinLinear) in this checkout, or no torch here: nothing to swap in yet.")
else:
    import torch
    layer = importlib.import_module(module)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.SiLU(), torch.nn.Linear(2048, 1024)).half().to(device)
    x = torch.randn(16, 1024, dtype=torch.float16, device=device)
    with torch.no_grad():
        before = mlp(x)
        replaced = layer.replace_linear_layers(mlp)
        after = mlp(x)
    rel = ((after - before).float().norm() / before.float().norm()).item()
    print(f"replaced {replaced} with {[type(m).__name__ + ' on ' + m.step for m in mlp if hasattr(m, 'step')]}")
    print(f"relative difference of the output after 4-bit quantization: {rel:.3%}")"""),
        md("""
## Measured end to end

`python -m steps e2e` on the GPU (Llama-2-7B dimensions with all 32 layers, and Llama-2-70B
dimensions with 8, 16 or 32 of its 80 layers; eager, compiled, and compiled with fused
projections and grouped decode attention), stored in `docs/results/e2e/` and shown here from there:"""),
        code("""\
from IPython.display import Markdown, display

stored = nb.REPO / "docs" / "results" / "e2e" / "README.md"
if stored.is_file():
    display(Markdown(stored.read_text().split("\\n", 2)[2].replace("](e2e.png)", "](../docs/results/e2e/e2e.png)")))
else:
    print("No end-to-end results are stored in docs/results/e2e/ yet.")"""),
        md("""
Up to batch 16 the linear layers take about half the FP16 time or less; at batch 128 they
are slower than FP16's, and so is the whole 7B model. At every batch size the *rest*
column (norms, rotary embedding, cache writes, residual adds, the SiLU gate, lm_head and
the gaps between these many small kernels) is the same in both models and is a large
share of a 7B decode step, so the end-to-end gain is well below the linear layers' gain.
The 70B layers are wider, so the rest is a smaller share and the end-to-end gain is
larger. `--compile` (both models' decode step under `torch.compile`) fuses the small
kernels of the rest, and `--fuse` gives every block one q|k|v and one gate|up layer, as
serving engines run them, and lets each k/v head be read once for its group of query
heads instead of copied for each (on a GPU with a small Triton decode kernel, faster than
SDPA's kernel at these short caches): the tables marked so are where the quantized model
comes closest to its layers' gain. What is left at larger batches is attention and the FP16
`lm_head`, the same in both models (docs/torch_layer.md follows it kernel by kernel).

## Try this

* `python -m steps bench --shapes llama-7b --batch 1 16 64` sums the four layers of the
  model: compare its summed speedup with the estimate above.
* Re-run the estimate for Llama-2-70B (`steps.harness.bench.LLAMA_2_70B`, 80 layers)."""),
    ]


NOTEBOOKS = {
    "00_reference": reference_chapter,
    "01_numba_naive": numba_chapter,
    "02_smem_tiling": smem_chapter,
    "03_tensor_cores": tensor_core_chapter,
    "04_marlin_layout": marlin_layout_chapter,
    "05_async_pipeline": pipeline_chapter,
    "06_marlin": marlin_chapter,
    "07_sparse_marlin": sparse_chapter,
    "08_end_to_end": end_to_end_chapter,
}


def build(stem: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(source, id=f"{stem}-{i:02d}"))
    nbformat.validate(nb)
    return nb


def _code_only(source: str) -> list[str]:
    """A code cell's tokens without comments and layout: what can change its outputs."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    return [t.string for t in tokens if t.type not in skip]


def keep_outputs(fresh: nbformat.NotebookNode, old: nbformat.NotebookNode) -> None:
    """Copy outputs (and the executing kernel's metadata) from `old` into the code cells of
    `fresh` that hold the same code."""
    fresh.metadata = old.metadata
    old_code = [c for c in old.cells if c.cell_type == "code"]
    new_code = [c for c in fresh.cells if c.cell_type == "code"]
    matcher = difflib.SequenceMatcher(
        a=[tuple(_code_only(c.source)) for c in old_code], b=[tuple(_code_only(c.source)) for c in new_code], autojunk=False
    )
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            previous, new = old_code[block.a + k], new_code[block.b + k]
            new.outputs, new.execution_count = previous.outputs, previous.execution_count


def main() -> None:
    for stem, chapter in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        fresh = build(stem, chapter())
        if "--keep-outputs" in sys.argv and path.exists():
            keep_outputs(fresh, nbformat.read(path, as_version=4))
        nbformat.write(fresh, path)


if __name__ == "__main__":
    main()
