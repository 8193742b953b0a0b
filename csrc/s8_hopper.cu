// Rung 8: Hopper-native. Stop issuing copies and start specializing warps.
//
// s6 streams the weights at ~98 % of an H100's read bandwidth, but on an H200 (1.45x the
// bandwidth, the same SMs and clocks) it reaches ~70 %: every one of its 256 threads issues
// 16-byte cp.asyncs, waits at a block barrier, dequantizes and multiplies, so the bytes an SM
// keeps in flight and the instructions it issues per weight are both fixed by one role.
// Here a block (one per SM, persistent over s6's striped run of tiles) splits the roles:
//
//      producer warpgroup (warpgroup 2, 40 regs)        consumer warpgroups 0 and 1 (232 registers)
//      ------------------------------------------       --------------------------------------------
//      wait  empty[s]                                    wait  full[s]
//      thread 0: weights (one tensor-map copy,     -->   ld.shared the lane's 16-byte weight word,
//        8 x 2 KB), scale rows, the activation           dequantize (s4's lop3 trick, unchanged),
//        tile (two tensor-map copies), their bytes       multiply the transposed product, the
//        reported to full[s]; at 49-64 rows the          weights as A (registers), the
//        128 threads cp.async the activations
//                                                          activations as B (shared memory):
//                                                          mma.sync m16n8k16 (<= 16 rows) or
//                                                          wgmma m64 x (16 * M_BLOCKS) x k16,
//                                                          WGMMA_GROUPS k16 steps in flight
//                                              <--       arrive on empty[s] once done with it
//
// The ring has STAGES slots of one 128 x 256 weight tile each (16 KB) plus its activations
// and scales; with 6-8 slots ~100 KB of weights are in flight per SM, against the ~30-60 KB
// that the H200's bandwidth-latency product asks of each SM. The two consumer warpgroups
// take the tiles in turn, warpgroup 0 the even ones and 1 the odd, each all 8 k16 steps of its
// tile, so they work on two slots at once and each warp waits and releases once per 8 steps
// (taking alternate k16 steps of one tile, as s6's two k-warps do, was 4-14 % slower: more
// waits and releases per weight, and all 8 warps stalled on the same slot). At the end of a
// column slice they add their sums through shared memory; the slice's partial sums, of only the
// tokens the launch has, are then added across blocks as in s6 (no block waits; the last to
// arrive adds all in block order), so results stay bit-identical run to run. From 65 rows on
// both warpgroups take every tile instead, each half of its columns (SPLIT_COLUMNS, below).
//
// The consumers are the rung's cost at M <= 16, and they must be well below the byte floor,
// not just at it: producer and consumers each near the floor, coupled through a finite ring,
// lose time to each other's stalls (docs/rungs.md, round 3). So on the mma.sync path the
// scales multiply each tile's fp32 sums instead of every weight (SCALE_SUMS).
//
// Which instruction multiplies depends on the batch (measured on the H200, docs/rungs.md):
// with the dequantization taken out, a tile still took about 42 cycles of its SM per wgmma at
// n = 16 (64 at n = 64): at n = 16 its 32 wgmmas outlast the ~1000 cycles its bytes take to
// arrive. The tile's 128-256 mma.sync m16n8k16 cost less, and skip the upper 8 tokens of a
// slab that has none. From 17 rows up the two are level, and from 64 up wgmma is ahead.
//
// wgmma is asynchronous: a warpgroup issues one k16 step's wgmmas as a group, then loads and
// dequantizes the next step while they run. With one group queued behind the running one
// (WGMMA_GROUPS 2) the queue can run dry meanwhile. Four groups in flight (their A registers
// stay live until wgmma.wait_group retires them) were 2-15 % faster from 64 rows up in a
// same-run comparison, but at 32 rows, where groups are shortest, between 1.5 % slower and 5 %
// faster: the queue is not all of the "fixed" cycles above (docs/rungs.md, round 6).
//
//   stage s (1024-byte aligned)
//   +---------------------------+--------------------------+-----------+-------------+
//   | activations: 16*M_BLOCKS  | weights: 8 k16 rows x    | scales:   | zero points |
//   | rows x 128 k, as 2 atom   | 256 columns, MARLIN      | group rows| (optional)  |
//   | columns of 64 k (128-byte | layout (2 KB per k16 row;| x 256     |             |
//   | swizzle: wgmma's B)       | warp w reads 512 B)      | columns   |             |
//   +---------------------------+--------------------------+-----------+-------------+
//
// Tensor maps (steps/_tensor_map.py, built on the host, passed by value) let one instruction of
// one thread copy a whole tile: the weights' 8 k16 rows, which lie a row of the MARLIN layout
// apart, and the activation tile in wgmma's 128-byte-swizzled atoms, zero-filled past the batch.
// Each bulk copy costs thread 0 tens of nanoseconds in sequence: eight weight rows a tile took
// more than half of the time a tile may take on the benchmark shape, and the consumers'
// arithmetic on the same schedulers stretched that chain further (docs/rungs.md, rounds 9-10).
#include "s6_stripes.cuh"  // rungs 4-6: fragments, dequantization, cp.async, the striped schedule
#include "s8_hopper.cuh"

#ifndef M_BLOCKS
#define M_BLOCKS 1  // 16-row blocks of A per slab: 1..4, or 8 (SPLIT_COLUMNS; wgmma n = 16 * M_BLOCKS)
#endif
#ifndef STAGES
#define STAGES 8  // slots in the shared-memory ring
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 128  // rows of K per scale, as reference.QuantizedWeight: -1 is one group of all K rows
#endif
#ifndef ZERO_POINTS
#define ZERO_POINTS 0  // 1: w = (q - z) * s with a zero point z per group and column (Z)
#endif
#ifndef WGMMA
#define WGMMA 1  // 1: the consumers multiply with wgmma m64 x (16 * M_BLOCKS) x k16; 0: with mma.sync m16n8k16
#endif
#ifndef BF16
#define BF16 0  // 1: bf16 activations, scales, zero points and output; 0: fp16
#endif
#ifndef TMA_WEIGHTS  // 1: a tile's weights in one tensor-map copy (8 k16 rows of 2 KB); 0: eight bulk copies
#define TMA_WEIGHTS 1
#endif
#ifndef TMA_ACTIVATIONS  // 1: thread 0 copies the activation tile by tensor map; 0: the producer's 128 threads, cp.async
#define TMA_ACTIVATIONS 1  // the host passes 0 with 4 m-blocks, where ptxas spilled (steps/s8_hopper.py, config)
#endif
#ifndef WGMMA_GROUPS  // k16 steps of wgmma in flight per warpgroup; 3 where ptxas spills with 4
#define WGMMA_GROUPS (M_BLOCKS == 3 && !BF16 ? 3 : 4)
#endif

using Element = marlin::ElementOf<BF16 != 0>::type;
using marlin::FragA;
using marlin::FragB;
using marlin::FragC;

namespace s8 {

constexpr int TILE_N = 256, TILE_K = 128, K16_STEPS = TILE_K / 16;
constexpr int SLAB_ROWS = 16 * M_BLOCKS;
// Up to 64 rows a warpgroup multiplies all 256 columns of its tile (four wgmmas of m64, one per
// 16-column tile j of each warp's strip), and the two warpgroups take the tiles in turn. A
// 128-row slab's sums of 256 columns would take 256 registers a thread, so there (M_BLOCKS 8)
// both warpgroups multiply every tile, warpgroup w the tiles j = 2w, 2w + 1 of each strip, for
// all 128 rows: two wgmmas of m64 n128 per k16 step. The part of a wgmma's cost that does not
// grow with n (below: about 35 cycles) is spread over twice the tokens of n64, and each weight
// is loaded and dequantized once per 128 rows, not once per 64.
//
//   warp w's 64-column strip:  | j=0 | j=1 | j=2 | j=3 |   (16 columns each)
//   M_BLOCKS <= 4:             |  warpgroup 0 (even tiles) or 1 (odd)  |  x 16 * M_BLOCKS rows
//   M_BLOCKS = 8:              |  warpgroup 0  |  warpgroup 1  |          x 128 rows, every tile
constexpr bool SPLIT_COLUMNS = M_BLOCKS > 4;
constexpr int J_TILES = SPLIT_COLUMNS ? 2 : 4;  // 16-column tiles of each strip a warpgroup multiplies
// Warpgroups 0 and 1 consume, warpgroup 2 produces. The register file is split by setmaxnreg:
// the producer needs few, the consumers hold the accumulators.
constexpr int CONSUMERS = 2, CONSUMER_THREADS = 128 * CONSUMERS, THREADS = CONSUMER_THREADS + 128;
// On the mma.sync path, where a scale group spans whole tiles, the scales multiply each tile's
// fp32 sums (4 FFMA per 16 x 8 sums) rather than every weight (16 HMUL2 per lane and k16 step):
// a quarter of the instructions or less, and the weights stay exact small integers (docs/rungs.md:
// the error bound's constant). With smaller groups the fold would cost as much as it saves.
constexpr bool SCALE_SUMS = !WGMMA && (GROUP_SIZE == -1 || GROUP_SIZE >= TILE_K);
// A block starts with the registers ptxas gave every thread for THREADS threads (64 K / THREADS,
// rounded down to a multiple of 8); setmaxnreg only moves them between warpgroups, so a claim
// beyond that pool would wait forever.
constexpr int PRODUCER_REGISTERS = 40, CONSUMER_REGISTERS = 232;
static_assert(128 * (CONSUMERS * CONSUMER_REGISTERS + PRODUCER_REGISTERS) <= THREADS * (65536 / THREADS / 8 * 8),
              "the warpgroups claim more registers than the block was launched with");
constexpr int A_BYTES = SLAB_ROWS * TILE_K * 2;
constexpr int W_ROW_BYTES = TILE_N * 8;  // one k16 row of a tile: 256 columns x 16 codes x 4 bits
constexpr int W_BYTES = K16_STEPS * W_ROW_BYTES;
constexpr int S_ROWS = (GROUP_SIZE == -1 || GROUP_SIZE >= TILE_K) ? 1 : TILE_K / GROUP_SIZE;
constexpr int S_ROW_BYTES = TILE_N * 2;
constexpr int S_BYTES = S_ROWS * S_ROW_BYTES, Z_BYTES = ZERO_POINTS ? S_BYTES : 0;
constexpr int STAGE_BYTES = (A_BYTES + W_BYTES + S_BYTES + Z_BYTES + 1023) / 1024 * 1024;
constexpr int REDUCE_BYTES = 4 * 32 * 32 * 4;  // one m-block of one warpgroup's accumulators
// Dynamic shared memory: 1024 bytes of slack to align the ring (wgmma's swizzle atoms), the
// ring, the warpgroups' hand-over buffer, two mbarriers per slot and two words: the vote of
// NamedSync::any and thread 0's count at its first segment's arrival (end_first_segment).
[[maybe_unused]] constexpr int TOTAL_SMEM = 1024 + STAGES * STAGE_BYTES + REDUCE_BYTES + 16 * STAGES + 16;
#ifdef LAUNCH_SMEM_BYTES  // the host's launch figures, checked against the kernel's own
static_assert(LAUNCH_THREADS == THREADS, "the host launches a different number of threads");
static_assert(LAUNCH_SMEM_BYTES == TOTAL_SMEM, "the host's shared-memory figure is not the kernel's");
#endif
static_assert((M_BLOCKS >= 1 && M_BLOCKS <= 4) || M_BLOCKS == 8, "slabs of 16 to 64 rows, or 128");
// On the wgmma path a warpgroup releases its previous tile's slot only after its wait for the
// next one, so each of the two may hold two slots while it waits: with fewer than four slots
// that wait and the producer's wait for a release could block each other.
static_assert(STAGES >= 4, "the ring needs at least four slots");
// A wait names the fill it wants only by its parity, so it must never run two fills ahead of its
// barrier. With the tiles taken in turn and an even ring, every fill of a slot goes to the same
// warpgroup, one after another, so that cannot happen. With an odd ring the two would take a
// slot's fills in turn, and one could wait for its fill while the other's, the one before, had not
// landed: the parity wait would pass at once.
static_assert(STAGES % CONSUMERS == 0, "each slot serves one consumer warpgroup: an even ring");
static_assert(GROUP_SIZE == -1 || GROUP_SIZE % 16 == 0, "groups are whole k16 steps");
static_assert(GROUP_SIZE == -1 || (GROUP_SIZE >= TILE_K ? GROUP_SIZE % TILE_K == 0 : TILE_K % GROUP_SIZE == 0),
              "a group must hold whole tiles or a tile whole groups");
constexpr int PRODUCER_THREADS = THREADS - CONSUMER_THREADS;
constexpr int A_CHUNKS_PER_THREAD = SLAB_ROWS * TILE_K / 8 / PRODUCER_THREADS;  // 16-byte chunks
static_assert(A_CHUNKS_PER_THREAD * PRODUCER_THREADS == SLAB_ROWS * TILE_K / 8 && PRODUCER_THREADS == 128,
              "the producer warpgroup's threads split the activation tile evenly, 16 threads a row");
// The constants' expect-bytes arrival, then the activations': thread 0's expect-bytes arrival for its
// tensor-map copies, or one cp.async arrival per producer thread.
constexpr int FULL_ARRIVALS = 1 + (TMA_ACTIVATIONS ? 1 : PRODUCER_THREADS);
constexpr int EMPTY_ARRIVALS = SPLIT_COLUMNS ? 8 : 4;  // one per warp that consumed the slot

// ---------------------------------------------------------------------------------
// wgmma m64 x n x k16, n = 16 * M_BLOCKS: A = the dequantized weights (registers), B = the
// stage's activations (descriptor). The accumulator of wgmma j lies in acc[m][j][h] as in
// s7's transposed product: chunk 2m + h of 8 tokens; hopper::write_transposed writes it.
// ---------------------------------------------------------------------------------
#define S8_ACC(m)                                                                                         \
  "+f"(acc[m][j][0].v[0]), "+f"(acc[m][j][0].v[1]), "+f"(acc[m][j][0].v[2]), "+f"(acc[m][j][0].v[3]),    \
      "+f"(acc[m][j][1].v[0]), "+f"(acc[m][j][1].v[1]), "+f"(acc[m][j][1].v[2]), "+f"(acc[m][j][1].v[3])
#define S8_IN "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "l"(desc)
#define S8_WGMMA(SHAPE, TYPE, DREGS, AREGS, ...)                                                        \
  asm volatile("wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " {" DREGS "}, {" AREGS "}, " \
               __VA_ARGS__)
#define S8_D8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define S8_D16 S8_D8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define S8_D24 S8_D16 ", %16, %17, %18, %19, %20, %21, %22, %23"
#define S8_D32 S8_D24 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define S8_D64                                                                                       \
  S8_D32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
         "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

template <class E>
__device__ __forceinline__ void wgmma_k16(FragC (&acc)[M_BLOCKS][J_TILES][2], int j, const FragA& a,
                                          unsigned long long desc) {
  constexpr bool bf = E::IS_BF16;
  if constexpr (M_BLOCKS == 1) {
    if constexpr (bf) S8_WGMMA("m64n16k16", "bf16", S8_D8, "%8, %9, %10, %11", "%12, 1, 1, 1, 0;\n" : S8_ACC(0) : S8_IN);
    else S8_WGMMA("m64n16k16", "f16", S8_D8, "%8, %9, %10, %11", "%12, 1, 1, 1, 0;\n" : S8_ACC(0) : S8_IN);
  } else if constexpr (M_BLOCKS == 2) {
    if constexpr (bf)
      S8_WGMMA("m64n32k16", "bf16", S8_D16, "%16, %17, %18, %19", "%20, 1, 1, 1, 0;\n" : S8_ACC(0), S8_ACC(1) : S8_IN);
    else
      S8_WGMMA("m64n32k16", "f16", S8_D16, "%16, %17, %18, %19", "%20, 1, 1, 1, 0;\n" : S8_ACC(0), S8_ACC(1) : S8_IN);
  } else if constexpr (M_BLOCKS == 3) {
    if constexpr (bf)
      S8_WGMMA("m64n48k16", "bf16", S8_D24, "%24, %25, %26, %27", "%28, 1, 1, 1, 0;\n"
               : S8_ACC(0), S8_ACC(1), S8_ACC(2) : S8_IN);
    else
      S8_WGMMA("m64n48k16", "f16", S8_D24, "%24, %25, %26, %27", "%28, 1, 1, 1, 0;\n"
               : S8_ACC(0), S8_ACC(1), S8_ACC(2) : S8_IN);
  } else if constexpr (M_BLOCKS == 4) {
    if constexpr (bf)
      S8_WGMMA("m64n64k16", "bf16", S8_D32, "%32, %33, %34, %35", "%36, 1, 1, 1, 0;\n"
               : S8_ACC(0), S8_ACC(1), S8_ACC(2), S8_ACC(3) : S8_IN);
    else
      S8_WGMMA("m64n64k16", "f16", S8_D32, "%32, %33, %34, %35", "%36, 1, 1, 1, 0;\n"
               : S8_ACC(0), S8_ACC(1), S8_ACC(2), S8_ACC(3) : S8_IN);
  } else {
    if constexpr (bf)
      S8_WGMMA("m64n128k16", "bf16", S8_D64, "%64, %65, %66, %67", "%68, 1, 1, 1, 0;\n"
               : S8_ACC(0), S8_ACC(1), S8_ACC(2), S8_ACC(3), S8_ACC(4), S8_ACC(5), S8_ACC(6), S8_ACC(7) : S8_IN);
    else
      S8_WGMMA("m64n128k16", "f16", S8_D64, "%64, %65, %66, %67", "%68, 1, 1, 1, 0;\n"
               : S8_ACC(0), S8_ACC(1), S8_ACC(2), S8_ACC(3), S8_ACC(4), S8_ACC(5), S8_ACC(6), S8_ACC(7) : S8_IN);
  }
}
#undef S8_D64
#undef S8_D32
#undef S8_D24
#undef S8_D16
#undef S8_D8
#undef S8_WGMMA
#undef S8_IN
#undef S8_ACC

// A warpgroup's accumulators as the [m][4][2] array that s4's and s6's helpers take (zeroing,
// the hand-over through shared memory, the partial sums): those only zero, store and add a
// lane's registers one by one, so the same registers in another arrangement serve as well.
using Accumulators = FragC[M_BLOCKS][J_TILES][2];
static_assert(M_BLOCKS * J_TILES % 4 == 0, "whole [m][4][2] blocks");
constexpr int FLAT_M_BLOCKS = M_BLOCKS * J_TILES / 4;
__device__ __forceinline__ FragC (&flat(Accumulators& acc))[FLAT_M_BLOCKS][4][2] {
  return reinterpret_cast<FragC(&)[FLAT_M_BLOCKS][4][2]>(acc);
}

// Keep the compiler from moving ordinary reads or writes of these registers across a
// wgmma fence or wait: the tensor cores read and write them asynchronously.
__device__ __forceinline__ void pin(Accumulators& acc) {
  marlin::for_each_accumulator(flat(acc), [](float& x) { asm volatile("" : "+f"(x)::"memory"); });
}

// A lane's words of one k16 step: weights, scales and zero points of its J_TILES tiles.
struct StepWords {
  unsigned w[J_TILES], s[J_TILES], z[J_TILES];
};

// The lane's A fragments of one k16 step: tile j (16 columns) of its warp's 64-column strip
// as 16 columns x 16 k -- a lane's left and right mma.sync B fragments of the tile are, side by
// side, its A fragment of the transposed product -- dequantized and scaled exactly as in s4-s6
// (kScaled), or left as the exact codes q - z for add_scaled_sums.
template <bool kScaled>
__device__ __forceinline__ void dequantize_k16(const StepWords& x, FragA (&a)[J_TILES]) {
#pragma unroll
  for (int j = 0; j < J_TILES; ++j) {
    FragB left, right;
    if constexpr (kScaled) marlin::dequantize_tile<ZERO_POINTS != 0, Element>(x.w[j], x.s[j], left, right, x.z[j]);
    else marlin::dequantize_codes<ZERO_POINTS != 0, Element>(x.w[j], left, right, x.z[j]);
    a[j] = FragA{{left.r[0], right.r[0], left.r[1], right.r[1]}};
  }
}

// wgmma: the fragments are the A operands of J_TILES wgmmas (warp w's 16 rows of each), the
// step's activations their B operand (descriptor), issued as one group.
__device__ __forceinline__ void multiply_wgmma(FragA (&a)[J_TILES], unsigned long long desc, Accumulators& acc) {
  pin(acc);
#pragma unroll
  for (int j = 0; j < J_TILES; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[j].r[i])::"memory");
  hopper::wgmma_fence();
#pragma unroll
  for (int j = 0; j < J_TILES; ++j) wgmma_k16<Element>(acc, j, a[j], desc);
  hopper::wgmma_commit();
}

// mma.sync m16n8k16, one per tile j and 8 tokens: ldmatrix.x4 at the lane's row `b_row` gives
// m-block m's B fragments, tokens 16m..16m+7 (registers 0, 1: k 0-7 and 8-15 of the step) and
// 16m+8..16m+15 (registers 2, 3). kUpper false skips the upper 8 tokens of a one-block slab
// that has none (M <= 8): half the tensor work, and ldmatrix.x2 half the shared-memory reads.
template <bool kUpper>
__device__ __forceinline__ void multiply_mma(const FragA (&a)[J_TILES], unsigned b_row, Accumulators& acc) {
#pragma unroll
  for (int m = 0; m < M_BLOCKS; ++m) {
    FragA b;
    FragB lower;
    if (kUpper) {
      marlin::ldmatrix_x4(b, b_row + m * 16 * 128);
      lower = FragB{{b.r[0], b.r[1]}};
    } else {
      marlin::ldmatrix_x2(lower, b_row + m * 16 * 128);
    }
#pragma unroll
    for (int j = 0; j < J_TILES; ++j) {
      Element::mma(a[j], lower, acc[m][j][0]);
      if (kUpper) Element::mma(a[j], FragB{{b.r[2], b.r[3]}}, acc[m][j][1]);
    }
  }
}

// acc += s * sums for one group's sums of the unscaled codes, then (restart) sums = 0. In the
// transposed product a lane's sums (m, j, h) hold weight column g of tile j in v[0], v[1] and
// column g + 8 in v[2], v[3] (lane = 4g + c), and the lane's scale word j holds exactly those
// two columns' scales. kUpper false: the slab has no tokens 8-15, whose sums stay zero.
template <bool kUpper>
__device__ __forceinline__ void add_scaled_sums(Accumulators& sums, const unsigned (&scales)[J_TILES], Accumulators& acc,
                                                bool restart) {
#pragma unroll
  for (int j = 0; j < J_TILES; ++j) {
    const float2 scale = Element::widen(Element::as_pair(scales[j]));  // columns g, g + 8
#pragma unroll
    for (int m = 0; m < M_BLOCKS; ++m)
#pragma unroll
      for (int h = 0; h < (kUpper ? 2 : 1); ++h) {
        acc[m][j][h].v[0] = fmaf(scale.x, sums[m][j][h].v[0], acc[m][j][h].v[0]);
        acc[m][j][h].v[1] = fmaf(scale.x, sums[m][j][h].v[1], acc[m][j][h].v[1]);
        acc[m][j][h].v[2] = fmaf(scale.y, sums[m][j][h].v[2], acc[m][j][h].v[2]);
        acc[m][j][h].v[3] = fmaf(scale.y, sums[m][j][h].v[3], acc[m][j][h].v[3]);
        if (restart) sums[m][j][h] = FragC{};  // the next mma.sync then starts from zero
      }
  }
}

struct Ring {
  unsigned base;  // shared address of slot 0
  unsigned bars;  // full[0..STAGES), then empty[0..STAGES), then the two words

  __device__ __forceinline__ unsigned slot(int s) const { return base + s * STAGE_BYTES; }
  __device__ __forceinline__ unsigned full(int s) const { return bars + 8 * s; }
  __device__ __forceinline__ unsigned empty(int s) const { return bars + 8 * (STAGES + s); }
};

struct Problem {
  int M, K, N, k_tiles, n_tiles, t0, t1, iters;

  __device__ __forceinline__ Problem(int M_, int K_, int N_, int iters_) : M(M_), K(K_), N(N_), iters(iters_) {
    k_tiles = K / TILE_K;
    n_tiles = N / TILE_N;
    const int total = (M + SLAB_ROWS - 1) / SLAB_ROWS * n_tiles * k_tiles;
    t0 = blockIdx.x * iters;
    t1 = min(t0 + iters, total);
  }
};

// ---------------------------------------------------------------------------------
// The producer warpgroup walks the block's run of tiles (s6's numbering t = (slab * n_tiles
// + col) * k_tiles + k_tile) and fills the ring slot by slot. Thread 0 hands the weights and
// scales to the copy engine; all 128 threads copy the activation tile, each its own 16-byte
// chunks, so a tile costs every producer thread a few instructions rather than one warp a
// few hundred (one warp doing it all was the limit: 0.6 us a tile at M = 16, 1.8 us at 64).
//
// Weights and scales are the model's constants, which no kernel writes while layers run; the
// activations are the previous kernel's output. So under a programmatic dependent launch the
// first ring's worth of weights is requested before the wait for the previous kernel: on a
// narrow layer (4096 x 4096: 4 tiles a block) that is the whole of a block's weights, in
// flight while the previous layer's last blocks finish.
// ---------------------------------------------------------------------------------
struct TileCursor {
  int k_tile, col, slab;

  __device__ __forceinline__ explicit TileCursor(const Problem& p)
      : k_tile(p.t0 % p.k_tiles), col(p.t0 / p.k_tiles % p.n_tiles), slab(p.t0 / p.k_tiles / p.n_tiles) {}
  __device__ __forceinline__ void next(const Problem& p) {
    if (++k_tile == p.k_tiles) {
      k_tile = 0;
      if (++col == p.n_tiles) col = 0, ++slab;
    }
  }
};

// Thread 0: announce slot s's bytes on its full barrier and hand the tile's weights and scales
// (and zero points) to the copy engine.
__device__ __forceinline__ void copy_constants(const Ring& ring, int s, const TileCursor& at, const Problem& p,
                                               const int4* __restrict__ B, const int4* __restrict__ S,
                                               const int4* __restrict__ Z, const hopper::TensorMap& w_map,
                                               unsigned long long policy) {
  const unsigned stage = ring.slot(s);
  hopper::mbarrier_arrive_expect_bytes(ring.full(s), W_BYTES + S_BYTES + Z_BYTES);
  // Weights: k16 row r of the tile is 2 KB contiguous in the MARLIN layout (K/16 rows of 2N words);
  // w_map sees those rows as K/16 rows of N 8-byte elements, and its box is a tile's 8 rows x 256.
  if constexpr (TMA_WEIGHTS) {
    hopper::tensor_copy_evict_first(stage + A_BYTES, w_map, at.col * (W_ROW_BYTES / 8), at.k_tile * K16_STEPS,
                                    ring.full(s), policy);
  } else {
    const char* w = reinterpret_cast<const char*>(B) + size_t(at.k_tile) * K16_STEPS * p.N * 8 + size_t(at.col) * W_ROW_BYTES;
#pragma unroll
    for (int r = 0; r < K16_STEPS; ++r)
      hopper::bulk_copy_evict_first(stage + A_BYTES + r * W_ROW_BYTES, w + size_t(r) * p.N * 8, W_ROW_BYTES, ring.full(s),
                                    policy);
  }
  // Scales (and zero points): the tile's group rows, 512 bytes of each.
  const int group_row = GROUP_SIZE == -1 ? 0 : at.k_tile * TILE_K / GROUP_SIZE;
#pragma unroll
  for (int r = 0; r < S_ROWS; ++r) {
    const size_t offset = size_t(group_row + r) * p.N * 2 + size_t(at.col) * S_ROW_BYTES;
    const unsigned dst = stage + A_BYTES + W_BYTES + r * S_ROW_BYTES;
    hopper::bulk_copy(dst, reinterpret_cast<const char*>(S) + offset, S_ROW_BYTES, ring.full(s));
    if (ZERO_POINTS) hopper::bulk_copy(dst + S_BYTES, reinterpret_cast<const char*>(Z) + offset, S_ROW_BYTES, ring.full(s));
  }
}

// Thread 0 with TMA_ACTIVATIONS: the slab's activation tile, one tensor-map copy per 64 k (an
// atom column of 128-byte-swizzled rows, the layout both multiply paths read), rows past the batch
// filled with zeros by the copy engine.
__device__ __forceinline__ void copy_activations(const Ring& ring, int s, const TileCursor& at,
                                                 const hopper::TensorMap& a_map) {
  const unsigned stage = ring.slot(s), full = ring.full(s);
  hopper::mbarrier_arrive_expect_bytes(full, A_BYTES);
#pragma unroll
  for (int atom = 0; atom < TILE_K / 64; ++atom)
    hopper::tensor_copy(stage + atom * SLAB_ROWS * 128, a_map, at.k_tile * TILE_K + 64 * atom, at.slab * SLAB_ROWS, full);
}

__device__ __forceinline__ void produce(const Ring& ring, const Problem& p, const int4* __restrict__ A,
                                        const int4* __restrict__ B, const int4* __restrict__ S,
                                        const int4* __restrict__ Z, const hopper::TensorMap& a_map,
                                        const hopper::TensorMap& w_map) {
  const int thread = threadIdx.x - CONSUMER_THREADS;
  const unsigned long long policy = marlin::make_evict_first_policy();
  const int tiles = p.t1 - p.t0;
  if (thread == 0) {
    TileCursor ahead(p);
    for (int i = 0; i < min(tiles, STAGES); ++i, ahead.next(p)) copy_constants(ring, i, ahead, p, B, S, Z, w_map, policy);
  }
  if (TMA_ACTIVATIONS && thread != 0) return;  // thread 0 copies the activations as well
  hopper::wait_for_previous_grid();

  // This thread's chunks of the activation tile: 16-byte chunk `chunk` of rows first_row + 8 c.
  // In the swizzled atoms row r + 8 lies 1024 bytes past row r (same r % 8, same XOR).
  const int first_row = thread / 16, chunk = thread % 16;
  const size_t row_bytes = size_t(p.K) * 2;
  // The destination travels as a register stepped slot by slot, never as slot * STAGE_BYTES:
  // ptxas would split that into a uniform part, the cp.async form that faults on the H100
  // (s5_pipeline.cuh, make_evict_first_policy).
  const unsigned a_first = ring.slot(0) + hopper::swizzled_chunk<SLAB_ROWS>(first_row, chunk);
  unsigned a_here = a_first;
  TileCursor at(p);
  for (int i = 0; i < tiles; ++i, at.next(p)) {
    const int s = i % STAGES;
    if (i >= STAGES) {
      hopper::mbarrier_wait(ring.empty(s), (i / STAGES - 1) & 1);
      if (thread == 0) copy_constants(ring, s, at, p, B, S, Z, w_map, policy);
    }
    if constexpr (TMA_ACTIVATIONS) {
      copy_activations(ring, s, at, a_map);
      continue;
    }
    // Activations: rows past the batch zero-filled (their source clamped to a valid address).
    const int row0 = at.slab * SLAB_ROWS, rows_valid = min(SLAB_ROWS, p.M - row0);
    const char* src =
        reinterpret_cast<const char*>(A) + size_t(row0 + first_row) * row_bytes + at.k_tile * TILE_K * 2 + chunk * 16;
#pragma unroll
    for (int c = 0; c < A_CHUNKS_PER_THREAD; ++c) {
      const bool valid = first_row + 8 * c < rows_valid;
      marlin::cp_async16_zfill(a_here + 1024 * c, valid ? src + 8 * c * row_bytes : static_cast<const void*>(A), valid);
    }
    hopper::cp_async_arrive(ring.full(s));
    a_here = s == STAGES - 1 ? a_first : a_here + STAGE_BYTES;
  }
  marlin::cp_async_wait<0>();  // leave no copy of this thread in flight behind it
}

// ---------------------------------------------------------------------------------
// The consumers: the two warpgroups take the block's tiles in turn (warpgroup 0 the even ones
// of its run, warpgroup 1 the odd), each all 8 k16 steps of its tile, so that they work on two
// slots at once and each warp waits for a slot and releases it once per 8 steps. At the end of
// a column slice segment both hold sums for the same columns, which go to the output (or to
// the partial sums) as in s4 and s6.
// ---------------------------------------------------------------------------------
template <bool kValue>
struct Flag {
  static constexpr bool value = kValue;
};

// A lane's words of one k16 step for its J_TILES tiles from shared memory, in one load: the
// whole 16-byte word (s5's load_shared16), or with SPLIT_COLUMNS the 8 bytes of its tiles.
__device__ __forceinline__ void load_step_words(unsigned smem, unsigned (&w)[J_TILES]) {
  if constexpr (J_TILES == 4) {
    const int4 v = marlin::load_shared16(smem);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else {
    asm volatile("ld.shared.v2.b32 {%0,%1}, [%2];\n" : "=r"(w[0]), "=r"(w[1]) : "r"(smem));
  }
}

// A warpgroup's sums of a column slice to the output: its warp's strip of the slice, from
// column `offset` of the strip on (its first tile j's), the slab's valid rows only.
__device__ __forceinline__ void write_slice(const Accumulators& acc, Element::scalar* __restrict__ C, const Problem& p,
                                            const marlin::StripeSegment& seg, int strip, int offset) {
  const int rows_valid = min(SLAB_ROWS, p.M - seg.slab * SLAB_ROWS);
  hopper::write_transposed<M_BLOCKS, J_TILES, Element>(acc, C + size_t(seg.slab) * SLAB_ROWS * p.N, p.N, rows_valid,
                                                       seg.col * TILE_N + 64 * strip + offset);
}

// The slice's partial sums across blocks: s6's no-wait reduction (each contributor stores its
// fp32 partials and counts itself in the slice's counter; the last to arrive adds them all in
// ascending block order and writes the output), storing and reading only the tokens the launch
// has. s6 stores each warp's 32 registers a lane whole, [value][lane], which at M = 1 is sixteen
// times the bytes that matter, and its last block reads them two contributors at a time. Here a
// lane's values lie at position 8 c + g of their 32-float rows rather than at its lane number
// 4 g + c, so that the lanes holding the same tokens (the same c) share one 32-byte sector: at
// M = 1 a contributor stores, and the last block reads, 1 KB instead of 16, and on the mma.sync
// path (decode) four contributors' loads are in flight at once. `unit` is the warp's place in
// the slot (its strip, or with SPLIT_COLUMNS its warpgroup's strip).
//
//   slot:  [unit][m][v = 8 j + 4 h + r][8 c + g]  holds acc[m][j][h].v[r] of lane 4 g + c,
//          which is token 16 m + 8 h + 2 c + r % 2 of the slab
struct PartialSums {
  static constexpr int SLOT_FLOATS = 128 * TILE_N;  // a block's slot: a 128-row slab (steps/s8_hopper.py, partial_floats)
  static constexpr int VALUES = J_TILES * 8;        // a lane's values of one m-block
  static_assert((SPLIT_COLUMNS ? 8 : 4) * M_BLOCKS * VALUES * 32 <= SLOT_FLOATS, "the partial sums fit the slot");
  float* __restrict__ workspace;
  const marlin::StripeSegment& seg;
  const Problem& p;
  int lane_offset, rows_valid, c;

  __device__ __forceinline__ PartialSums(float* workspace_, const marlin::StripeSegment& seg_, const Problem& p_, int unit)
      : workspace(workspace_), seg(seg_), p(p_) {
    const int lane = threadIdx.x % 32, g = lane / 4;
    c = lane % 4;
    lane_offset = unit * M_BLOCKS * VALUES * 32 + 8 * c + g;
    rows_valid = min(SLAB_ROWS, p.M - seg.slab * SLAB_ROWS);
  }
  // Whether the slab has the lane's token (m, h, r). On the wgmma path (17 rows and more) the
  // slab goes whole: there a test per value makes ptxas spill registers, and it would save little.
  __device__ __forceinline__ bool has(int m, int h, int r) const {
    return WGMMA || 16 * m + 8 * h + 2 * c + r % 2 < rows_valid;
  }
  static __device__ __forceinline__ int offset(int m, int j, int h, int r) { return (m * VALUES + 8 * j + 4 * h + r) * 32; }
  // f(j, h, r) for each of a lane's values of one m-block, unrolled.
  template <class F>
  static __device__ __forceinline__ void each_value(F f) {
#pragma unroll
    for (int j = 0; j < J_TILES; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 4; ++r) f(j, h, r);
  }

  __device__ __forceinline__ void store(const Accumulators& acc) const {
    float* mine = workspace + size_t(2 * blockIdx.x + seg.slot) * SLOT_FLOATS + lane_offset;
#pragma unroll
    for (int m = 0; m < M_BLOCKS; ++m)
      each_value([&](int j, int h, int r) {
        if (has(m, h, r)) __stcg(mine + offset(m, j, h, r), acc[m][j][h].v[r]);
      });
  }

  // acc = every contributor's partials (this block's own among them), added in ascending block
  // order whoever reads them, so the sum is the same bits run to run. Four contributors' loads
  // are in flight together on the mma.sync path (128 floats a lane), one on the wgmma path,
  // where more spill registers. A thread reads back only what it stored itself: its own store
  // is visible to it without a fence.
  __device__ __forceinline__ void add_all(Accumulators& acc) const {
    marlin::zero_accumulators<FLAT_M_BLOCKS>(flat(acc));
    const int slice_t0 = seg.slice * p.k_tiles, end = seg.first_block + seg.contributors;
    constexpr int AHEAD = WGMMA ? 1 : 4;
    for (int b0 = seg.first_block; b0 < end; b0 += AHEAD) {
#pragma unroll
      for (int m = 0; m < M_BLOCKS; ++m) {
        FragC theirs[AHEAD][J_TILES][2];
#pragma unroll
        for (int i = 0; i < AHEAD; ++i) {
          const int b = b0 + i;
          const float* from =
              workspace + size_t(2 * b + marlin::partial_slot(b, p.iters, slice_t0)) * SLOT_FLOATS + lane_offset;
          each_value([&](int j, int h, int r) {
            theirs[i][j][h].v[r] = b < end && has(m, h, r) ? __ldcg(from + offset(m, j, h, r)) : 0.f;
          });
        }
#pragma unroll
        for (int i = 0; i < AHEAD; ++i) {
          if (b0 + i >= end) continue;
          each_value([&](int j, int h, int r) { acc[m][j][h].v[r] += theirs[i][j][h].v[r]; });
        }
      }
    }
  }
};

// The slice counter under the PTX memory model, at gpu scope. s6 counts in with one
// acquire-release atomic and waits for its answer: a fence for the partials' stores, then the
// atomic's round trip, at every slice end, while the block's next tiles wait. Rung 8 waits
// less (round 8, docs/rungs.md):
//
//  * A run's first segment is the bottom of a slice whose top belongs to the previous block's
//    run, which reaches it only at its end: here the block is almost never the last to arrive.
//    It stores, counts in with a release (no acquire: it reads nothing yet) and goes on to its
//    next tiles without a vote; thread 0 parks the atomic's answer, which the block looks at
//    only at the end of the run, and in the rare case that it was the last adds the slice then.
//  * At a run's final segment the others have often all arrived already (those that started
//    the slice's bottom at the start of their runs). Thread 0 reads the counter before the
//    slice's last hand-over, and if every other contributor is in, the block is the last without
//    counting: no fence and no atomic, only the read of their partials after an acquire fence.
//
// Exactly one block writes each slice: a block that finds contributors - 1 others in never
// counts, so none of those saw contributors - 1 before its own arrival; otherwise all count and
// the one that found contributors - 1 writes. The writer resets the counter (no one counts after
// it), so the workspace stays zeroed for the next launch. No block ever waits for another.
//
// Each piece runs in the threads where `pred` holds, predicated inside the instruction rather
// than branched around: a branch here made ptxas compute the wgmma descriptors of the tile loop
// outside the uniform datapath (about 30 more instructions a tile) and spill registers.
// INSTRUCTION, run where the operand PRED (an int) is nonzero.
#define S8_WHERE(PRED, INSTRUCTION) "{\n .reg .pred p;\n setp.ne.b32 p, " PRED ", 0;\n @p " INSTRUCTION ";\n}\n"
__device__ __forceinline__ int peek_count_if(const int* counter, bool pred) {  // may be stale: it only grows
  int count = 0;
  asm volatile(S8_WHERE("%2", "ld.relaxed.gpu.global.b32 %0, [%1]") : "+r"(count) : "l"(counter), "r"(int(pred)) : "memory");
  return count;
}
__device__ __forceinline__ int count_in_if(int* counter, bool pred) {  // the count before this arrival
  int count = 0;
  asm volatile(S8_WHERE("%2", "atom.release.gpu.global.add.s32 %0, [%1], 1")
               : "+r"(count)
               : "l"(counter), "r"(int(pred))
               : "memory");
  return count;
}
__device__ __forceinline__ void acquire_fence_if(bool pred) {
  asm volatile(S8_WHERE("%0", "fence.acq_rel.gpu")::"r"(int(pred)) : "memory");
}
__device__ __forceinline__ void reset_count_if(int* counter, bool pred) {
  asm volatile(S8_WHERE("%1", "st.relaxed.gpu.global.b32 [%0], 0")::"l"(counter), "r"(int(pred)) : "memory");
}
#undef S8_WHERE

// A final segment's end. `seen` is thread 0's earlier look at the counter. Returns whether this
// block writes the slice (then acc holds the sum).
template <class Sync>
__device__ __forceinline__ bool end_final_segment(Accumulators& acc, const PartialSums& partials, int* counter,
                                                  int seen, const Sync& sync) {
  const bool all_in = threadIdx.x == 0 && seen == partials.seg.contributors - 1;
  acquire_fence_if(all_in);  // before this thread's stores, so that it waits for none of them
  partials.store(acc);
  if (sync.any(all_in)) {
    reset_count_if(counter, threadIdx.x == 0);
  } else if (!marlin::arrives_last(counter, partials.seg.contributors, sync)) {
    // arrives_last's barrier orders every thread's stores before thread 0's acquire-release
    // atomic, which is cumulative (the PTX memory model; cooperative groups' grid barrier and
    // CUTLASS's stream-K barrier rely on the same): s6's fence in every thread is not needed.
    return false;
  }
  partials.add_all(acc);
  return true;
}

// A first segment's end: store, count in, go on. Thread 0 keeps the count before its arrival in
// shared memory (`count_word`) rather than in a register live across the run's tiles, which made
// ptxas spill in the variants that hold the most accumulators.
template <class Sync>
__device__ __forceinline__ void end_first_segment(const Accumulators& acc, const PartialSums& partials, int* counter,
                                                  volatile int* count_word, const Sync& sync) {
  partials.store(acc);
  sync.sync();  // every thread's stores before thread 0's release
  const int count = count_in_if(counter, threadIdx.x == 0);
  if (threadIdx.x == 0) *count_word = count;
}

// At the end of the run: if the first segment's arrival was the last, add and return true.
template <class Sync>
__device__ __forceinline__ bool first_segment_was_last(Accumulators& acc, const PartialSums& partials, int* counter,
                                                       int count, const Sync& sync) {
  const bool last = threadIdx.x == 0 && count == partials.seg.contributors - 1;
  sync.sync();  // no thread still reads the final segment's vote (NamedSync::any)
  acquire_fence_if(last);
  reset_count_if(counter, last);
  if (!sync.any(last)) return false;
  partials.add_all(acc);
  return true;
}

__device__ __forceinline__ void consume(const Ring& ring_in, const Problem& p, Element::scalar* __restrict__ C,
                                        int* __restrict__ counters, float* __restrict__ workspace, float* red,
                                        volatile int* words) {
  // The ring's addresses and the lane's offsets into a slot, each computed once and kept in a
  // register (hopper::opaque): otherwise ptxas recomputes them from the thread and block ids
  // every tile, a chain of some 20 dependent instructions in front of the tile's first load.
  const Ring ring{hopper::opaque(ring_in.base), hopper::opaque(ring_in.bars)};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4, strip = warp % 4;
  // The first of the warpgroup's 16-column tiles j of each strip (SPLIT_COLUMNS: 2w; else 0).
  // A lane's weight word of a k16 step is 16 bytes, one 32-bit word per tile j, and so is its
  // scale (zero point) word: the warpgroup's words start 4 bytes a tile in.
  const int first_j = SPLIT_COLUMNS ? J_TILES * wg : 0;
  const unsigned w_lane = hopper::opaque(A_BYTES + strip * 512 + lane * 16 + 4 * first_j);
  const unsigned s_lane = hopper::opaque(A_BYTES + W_BYTES + strip * 128 + (lane / 4) * 16 + 4 * first_j);
  // A lane's weight words of k16 step `step` and the scales (zero points) of its columns in
  // that step's group row.
  auto load_step = [&](unsigned stage, int step, StepWords& x) {
    load_step_words(stage + w_lane + step * W_ROW_BYTES, x.w);
    const unsigned s_row = stage + s_lane + (S_ROWS == 1 ? 0 : 16 * step / GROUP_SIZE) * S_ROW_BYTES;
    load_step_words(s_row, x.s);
    if (ZERO_POINTS) load_step_words(s_row + S_BYTES, x.z);
    else
      for (unsigned& z : x.z) z = 0;
  };
  // mma.sync's B: lane l points ldmatrix at token row l % 8 + 8 (l / 16) and the 8-k chunk
  // (l / 8) % 2 of its k16 step (matrices 0-3: tokens 0-7 x k 0-7, 0-7 x 8-15, 8-15 x 0-7,
  // 8-15 x 8-15) in the swizzled atoms. Step `step` reads the tile's 8-k chunks 2 step and
  // 2 step + 1: atom column (2 step) / 8, and chunk bits that the swizzle's XOR with the row
  // (l % 8) leaves alone; b_lane holds the rest (reference/hopper_tiles.py replays these reads).
  const int b_row = lane % 8 + 8 * (lane / 16);
  const unsigned b_lane = hopper::opaque(b_row * 128 + ((((lane / 8) % 2) ^ (lane % 8)) * 16));
  Accumulators acc;
  // SCALE_SUMS: the warpgroup's last tile's sums of unscaled codes and its scale words, added to
  // acc at the top of its next tile (or at the segment's end), once that tile's wait and loads
  // are under way: adding them right after the tile's last mma.sync would wait for its result.
  Accumulators sums;
  unsigned sums_scale[J_TILES];
  // The next tile's slot and the parity of that slot's fill, stepped tile by tile (cheaper
  // than a division of a tile count every tile); whether the next tile is this warpgroup's
  // (with SPLIT_COLUMNS every tile is); on the wgmma path the slot of its previous tile, whose
  // last wgmma may still be reading.
  unsigned slot = 0, phase = 0, mine = SPLIT_COLUMNS || wg == 0;
  int held = -1;

  // One tile: the lane's words loaded one step ahead. kUpper (mma.sync path) says whether the
  // slab has tokens 8-15; a compile-time choice, so that no mma.sync is predicated.
  auto tile = [&](auto upper) {
    const unsigned stage = ring.slot(slot);
    hopper::mbarrier_wait(ring.full(slot), phase);
    if (WGMMA && !TMA_ACTIVATIONS) hopper::fence_async_proxy();  // the producer's cp.async activations, for wgmma's reads
    StepWords x[2];
    load_step(stage, 0, x[0]);
    if constexpr (SCALE_SUMS) add_scaled_sums<decltype(upper)::value>(sums, sums_scale, acc, true);
#pragma unroll
    for (int step = 0; step < K16_STEPS; ++step) {
      if (step + 1 < K16_STEPS) load_step(stage, step + 1, x[(step + 1) % 2]);
      FragA a[J_TILES];
      dequantize_k16<!SCALE_SUMS>(x[step % 2], a);
      if constexpr (WGMMA) {
        const unsigned b = stage + (step / 4) * SLAB_ROWS * 128 + (step % 4) * 32;
        multiply_wgmma(a, hopper::swizzled_operand(b), acc);
        hopper::wgmma_wait<WGMMA_GROUPS - 1>();  // the oldest group is done: its registers are free
        // The previous tile's slot: one arrival per warp (its lanes run the wgmma instructions in
        // step), predicated rather than branched around (see mbarrier_arrive_if).
        if (step == WGMMA_GROUPS - 2) hopper::mbarrier_arrive_if(ring.empty(held), held >= 0 && lane == 0);
      } else {
        multiply_mma<decltype(upper)::value>(a, stage + (step / 4) * SLAB_ROWS * 128 + (b_lane ^ ((2 * step % 8) * 16)),
                                             SCALE_SUMS ? sums : acc);
      }
    }
    if constexpr (SCALE_SUMS)  // the tile's one group row
      for (int j = 0; j < J_TILES; ++j) sums_scale[j] = x[0].s[j];
    if (WGMMA) {
      held = slot;
    } else {
      __syncwarp();  // every lane's reads of the slot are done: one arrival releases them all
      hopper::mbarrier_arrive_if(ring.empty(slot), lane == 0);
    }
  };

  // f(unit, sync) in the warps that add a slice's partial sums across blocks, each its place
  // `unit` in the partial-sum slot, on the barrier of those warps; false in the others. With
  // SPLIT_COLUMNS every warp adds its own columns; otherwise warpgroup 0 alone.
  auto in_adding_warps = [&](auto f) {
    if constexpr (SPLIT_COLUMNS) return f(4 * wg + strip, hopper::NamedSync<1, CONSUMER_THREADS>{words});
    else return wg == 0 && f(strip, hopper::NamedSync<2, 128>{words});
  };

  // The output, the counters and the partial sums are the previous kernel's too (programmatic
  // dependent launch: see produce).
  hopper::wait_for_previous_grid();
  for (int t = p.t0; t < p.t1;) {
    const marlin::StripeSegment seg = marlin::stripe_segment(t, p.t1, p.k_tiles, p.n_tiles, p.iters);
    const bool final_segment = t + seg.rows == p.t1;
    marlin::zero_accumulators<FLAT_M_BLOCKS>(flat(acc));
    marlin::zero_accumulators<FLAT_M_BLOCKS>(flat(sums));
    for (unsigned& scale : sums_scale) scale = 0;
    const bool upper = WGMMA || M_BLOCKS > 1 || p.M - seg.slab * SLAB_ROWS > 8;  // tokens 8-15 present
    auto run = [&](auto upper_flag) {
      for (int r = 0; r < seg.rows; ++r) {
        if (mine) tile(upper_flag);
        mine ^= !SPLIT_COLUMNS;
        if (++slot == STAGES) slot = 0, phase ^= 1;
      }
    };
    if (upper) run(Flag<true>{});
    else run(Flag<false>{});
    // The look at a final segment's counter, on its way while the warpgroups hand over their sums.
    const int seen = peek_count_if(&counters[seg.slice], final_segment && seg.contributors > 1 && threadIdx.x == 0);
    if constexpr (SCALE_SUMS) add_scaled_sums<true>(sums, sums_scale, acc, false);  // the warpgroup's last tile
    if (WGMMA) {
      hopper::wgmma_wait<0>();
      pin(acc);
      hopper::mbarrier_arrive_if(ring.empty(held), held >= 0 && lane == 0);
      held = -1;
    }

    // The slice's end, as in s4 and s6 but on named barriers, so that the producer runs on.
    // Returns whether the calling warps write the slice now.
    auto slice_end = [&](int unit, const auto& sync) {
      if (seg.contributors == 1) return true;
      const PartialSums partials(workspace, seg, p, unit);
      if (final_segment) return end_final_segment(acc, partials, &counters[seg.slice], seen, sync);
      end_first_segment(acc, partials, &counters[seg.slice], words + 1, sync);
      return false;
    };
    // With SPLIT_COLUMNS the warpgroups hold sums of different columns, which each warp adds and
    // writes itself. Otherwise both hold sums of the same columns: warpgroup 1 hands its to
    // warpgroup 0 through shared memory, then warpgroup 0 alone adds the partial sums of the
    // blocks sharing the slice, while warpgroup 1 runs on into its next tiles.
    if constexpr (!SPLIT_COLUMNS)
      marlin::reduce_k_warp_partials<FLAT_M_BLOCKS, 4, CONSUMERS>(flat(acc), red, wg, strip,
                                                                  hopper::NamedSync<1, CONSUMER_THREADS>{nullptr});
    if (in_adding_warps(slice_end)) write_slice(acc, C, p, seg, strip, 16 * first_j);
    t += seg.rows;
  }

  // The run's first segment, if it shares its slice and was not also the run's last: its
  // arrival's answer, and the slice, if that arrival was the last.
  const marlin::StripeSegment first = marlin::stripe_segment(p.t0, p.t1, p.k_tiles, p.n_tiles, p.iters);
  if (first.contributors > 1 && first.rows < p.t1 - p.t0) {
    auto check = [&](int unit, const auto& sync) {
      return first_segment_was_last(acc, PartialSums(workspace, first, p, unit), &counters[first.slice],
                                    threadIdx.x == 0 ? words[1] : 0, sync);
    };
    if (in_adding_warps(check)) write_slice(acc, C, p, first, strip, 16 * first_j);
  }
}

}  // namespace s8

extern "C" __global__ void __launch_bounds__(s8::THREADS, 1)
    s8_hopper(const int4* __restrict__ A, const int4* __restrict__ B, const int4* __restrict__ S,
              const int4* __restrict__ Z, Element::scalar* __restrict__ C, int M, int K, int N,
              int* __restrict__ counters, float* __restrict__ partials, int iters,
              const __grid_constant__ hopper::TensorMap a_map, const __grid_constant__ hopper::TensorMap w_map) {
  extern __shared__ int4 smem[];
  const unsigned raw = marlin::smem_address(smem);
  const unsigned base = (raw + 1023u) & ~1023u;
  const s8::Ring ring{base, base + STAGES * s8::STAGE_BYTES + s8::REDUCE_BYTES};
  char* generic_base = reinterpret_cast<char*>(smem) + (base - raw);
  float* red = reinterpret_cast<float*>(generic_base + STAGES * s8::STAGE_BYTES);
  volatile int* words = reinterpret_cast<volatile int*>(generic_base + STAGES * s8::STAGE_BYTES + s8::REDUCE_BYTES +
                                                       16 * STAGES);
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      hopper::mbarrier_init(ring.full(s), s8::FULL_ARRIVALS);
      hopper::mbarrier_init(ring.empty(s), s8::EMPTY_ARRIVALS);
    }
    hopper::mbarrier_init_fence();
  }
  __syncthreads();
  hopper::allow_next_grid();  // its blocks wait for SMs, and then for this grid (produce says why)

  if (threadIdx.x >= s8::CONSUMER_THREADS) {
    hopper::release_registers<s8::PRODUCER_REGISTERS>();
    s8::produce(ring, s8::Problem(M, K, N, iters), A, B, S, Z, a_map, w_map);
  } else {
    hopper::claim_registers<s8::CONSUMER_REGISTERS>();
    s8::consume(ring, s8::Problem(M, K, N, iters), C, counters, partials, red, words);
  }
}
