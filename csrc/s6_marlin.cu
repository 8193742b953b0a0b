// Rung 6: the full MARLIN kernel. SM-striped partition of the weight tiles, with the
// partial sums of a column slice reduced serially in the output buffer.
//
// s5 gave each block one column slice of TILE_N columns and all of K, so the grid was
// N / TILE_N blocks whatever the GPU: a 4096-wide layer on 132 SMs left 100 SMs idle,
// and even a good fit ends in a ragged last wave. Here the grid is (at most) one block
// per SM and the work is cut evenly in tiles instead: number the TILE_K x TILE_N weight
// tiles column slice by column slice, K innermost, and give block b the contiguous run
// of `iters` tiles starting at b * iters. Every block streams the same number of bytes;
// a run walks down a column slice and may continue at the top of the next. Several
// 64-row slabs of A (M > 64) are just more column slices in the same numbering, so one
// launch serves any batch up to 16 slabs.
//
// A column slice shared by several blocks needs their partial sums added. They are added
// in place, in the fp16 output, one block after the other in a fixed order (bottom
// k-tiles first: the block holding them started on this slice, so it finishes first),
// sequenced by a per-slice counter in a zeroed workspace that the last block resets to
// zero. The order never depends on timing, so results are bit-identical run to run.
// The partition, the order and the "at most 8 blocks per slice" cap are modelled in
// reference/marlin_layout.py (striped_schedule); `iters` comes from there.
#include "marlin_core.cuh"

#ifndef M_BLOCKS
#define M_BLOCKS 1  // 16-row blocks of A per slab: 1..4
#endif
#ifndef TILE_N
#define TILE_N 128  // output columns per column slice
#endif
#ifndef TILE_K
#define TILE_K 128  // rows of K per tile (one pipeline stage)
#endif
#ifndef STAGES
#define STAGES 4  // tiles in flight + 1
#endif
#ifndef GROUP_ROWS
#define GROUP_ROWS 128  // rows of K per scale; 0 means one scale per column (group size -1)
#endif
#ifndef EVICT_FIRST
#define EVICT_FIRST 1  // L2 evict-first hint on the weight copies
#endif

using Pipe = marlin::Pipeline<M_BLOCKS, TILE_N, TILE_K, STAGES, GROUP_ROWS, EVICT_FIRST != 0>;

// Wait until `turn` blocks have added their part to this slice. One thread spins with
// acquire loads; the barrier then orders the whole block's reads of the output after it.
__device__ __forceinline__ void wait_for_turn(const int* counter, int turn) {
  if (threadIdx.x == 0) {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen != turn);
  }
  __syncthreads();
}

// Hand the slice to the next block: after the barrier every thread's stores to the
// output precede thread 0's release increment. The last block resets the counter, which
// leaves the workspace zeroed for the next launch.
__device__ __forceinline__ void pass_turn(int* counter, bool last) {
  __syncthreads();
  if (threadIdx.x == 0) {
    if (last)
      asm volatile("st.relaxed.gpu.global.b32 [%0], %1;\n" ::"l"(counter), "r"(0) : "memory");
    else
      asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(counter), "r"(1) : "memory");
  }
}

extern "C" __global__ void __launch_bounds__(Pipe::THREADS, 1)
    s6_marlin(const int4* __restrict__ A, const int4* __restrict__ B, const int4* __restrict__ S,
              half* __restrict__ C, int M, int K, int N, int* __restrict__ locks, int iters) {
  extern __shared__ int4 smem[];
  constexpr int SLAB_ROWS = 16 * M_BLOCKS;
  const int k_tiles = K / TILE_K, n_tiles = N / TILE_N;
  const int slabs = (M + SLAB_ROWS - 1) / SLAB_ROWS;
  const int total = slabs * n_tiles * k_tiles;

  Pipe pipe;
  pipe.init(smem, K, N);
  marlin::FragC acc[M_BLOCKS][4][2];

  int t = blockIdx.x * iters;
  const int end = min(t + iters, total);
  while (t < end) {
    // The column slice this part of the run lies in, and this block's share of it.
    const int slice = t / k_tiles, row0 = t - slice * k_tiles;
    const int rows = min(k_tiles - row0, end - t);
    const int slab = slice / n_tiles, col = slice - slab * n_tiles;
    // The slice's contributors are the blocks whose runs meet its k_tiles tiles; the
    // highest-numbered one adds first.
    const int first_block = (slice * k_tiles) / iters, last_block = ((slice + 1) * k_tiles - 1) / iters;
    const int contributors = last_block - first_block + 1, turn = last_block - blockIdx.x;
    const int rows_valid = min(SLAB_ROWS, M - slab * SLAB_ROWS);

    pipe.begin_column(A + size_t(slab) * SLAB_ROWS * (K / 8), B, S, rows_valid, col, row0, rows);
    pipe.run(acc);
    pipe.reduce_across_k_warps(acc);

    if (contributors > 1) wait_for_turn(&locks[slice], turn);
    if (pipe.k_warp == 0)
      marlin::fold_into_output<M_BLOCKS>(acc, C + size_t(slab) * SLAB_ROWS * N, N, rows_valid,
                                         col * TILE_N + 64 * pipe.strip, turn > 0);
    if (contributors > 1) pass_turn(&locks[slice], turn == contributors - 1);
    t += rows;
  }
}
