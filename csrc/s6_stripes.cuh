// s6_stripes.cuh -- rung 6's idea: cut the work into equal runs of weight tiles, one run per
// SM, and add the partial sums of a column slice shared by several runs without waiting.
//
// s5 gave each block one column slice of TILE_N columns and all of K: N / TILE_N blocks
// whatever the GPU, so a 4096-wide layer on 132 SMs left 100 SMs idle, and even a good fit
// ends in a ragged last wave. Here the tiles are numbered column slice by column slice, K
// innermost, and block b takes the contiguous run [b * iters, (b + 1) * iters):
//
//            col 0    col 1    col 2    col 3          (column slices of TILE_N columns;
//          +--------+--------+--------+--------+        k-tiles of TILE_K rows downwards)
//   k = 0  | b0     | b1     | b2     | b4     |
//          | b0     | b1     | b3     | b4     |        every block streams the same bytes;
//          | b0     | b2     | b3     | b4     |        a run walks down a slice and goes on
//          | b1     | b2     | b3     | b5     |        at the top of the next; slices shared
//          +--------+--------+--------+--------+        by several blocks (col 1: b1, b2)
//                                                        need their partial sums added
//
// Each contributor stores its fp32 partials in a workspace and counts itself in the slice's
// counter; the last to arrive adds them all in block order and writes the output. No block
// spins (the original MARLIN adds them serially in the fp16 output, each block waiting for
// the previous), the order is fixed (bit-identical results run to run) and the sum stays
// fp32 until the one final rounding. Several 64-row slabs of A (M > 64) are just more
// column slices in the same numbering. reference/marlin_layout.py (striped_schedule) models
// the partition exactly and supplies `iters`.
//
// What changes in rung 5's pipeline is only its cursor (RunCursor: a run crosses slices, and
// the fetches run on into the next slice while the block reduces this one) and where the
// k-warp reduction goes (StripedPipeline: shared memory of its own, since the stages hold
// those tiles in flight). s7 reuses the walk and the reduction with its sparse pipeline.
#pragma once

#include "s5_pipeline.cuh"

namespace marlin {

// s5's cursor for a run that may cross column slices: `left` counts the tiles of the
// current slice still to fetch, and when it reaches 0 the next fetch enters a new slice.
template <int kMBlocks, int kTileK, int kTileN, int kThreads>
struct RunCursor : SliceCursor<kMBlocks, kTileK, kTileN, kThreads> {
  using Slice = SliceCursor<kMBlocks, kTileK, kTileN, kThreads>;
  int left;  // tiles of the current slice still to fetch

  __device__ __forceinline__ void start(int t_begin, int t_end) {
    Slice::start(t_begin, t_end);
    left = 0;
  }

  __device__ __forceinline__ bool entering_slice() const { return left == 0; }

  __device__ __forceinline__ int enter_slice(int t_) {
    int slab;
    const int col = this->locate(t_, slab);
    left = min(this->k_tiles - this->k_tile, this->end - t_);
    this->move_a(slab);
    return col;
  }

  __device__ __forceinline__ void advance() {
    Slice::advance();
    --left;
  }
};

// s5's pipeline over a striped run. The fetches run on into the block's next column slice
// while it reduces the current one, so the k-warp reduction gets shared memory of its own,
// after the stages.
template <int kMBlocks, int kTileN, int kTileK, int kStages, int kGroupSize, bool kEvictFirst, bool kZeroPoints,
          class E = Fp16>
struct StripedPipeline
    : Pipeline<kMBlocks, kTileN, kTileK, kStages, kGroupSize, kEvictFirst, kZeroPoints, E,
               RunCursor<kMBlocks, kTileK, kTileN, PIPELINE_THREADS>> {
  using Base = Pipeline<kMBlocks, kTileN, kTileK, kStages, kGroupSize, kEvictFirst, kZeroPoints, E,
                        RunCursor<kMBlocks, kTileK, kTileN, PIPELINE_THREADS>>;
  static constexpr int SMEM_BYTES = 16 * (kStages * Base::STAGE_CHUNKS + Base::REDUCE_CHUNKS);

  __device__ __forceinline__ void reduce_across_k_warps(FragC (&acc)[kMBlocks][4][2]) {
    reduce_k_warp_partials<kMBlocks, Base::N_STRIPS, Base::K_WARPS>(
        acc, reinterpret_cast<float*>(this->smem + kStages * Base::STAGE_CHUNKS), this->k_warp, this->strip);
  }
};

// ---------------------------------------------------------------------------------
// The SM-striped schedule (reference/marlin_layout.py: striped_schedule).
//
// Weight tiles are numbered t = (slab * n_tiles + col) * k_tiles + k_tile and block b
// takes the run [b * iters, (b + 1) * iters). A run cuts through at most two column
// slices that other blocks share: its first segment (the bottom of a slice, or a whole
// one) and its last (the top of a slice). Each of those has its own fp32 buffer of
// partial sums in the workspace, "slot" 0 and 1 of the block.
// ---------------------------------------------------------------------------------
struct StripeSegment {
  int slice, slab, col;  // column slice (numbered across slabs), its slab and column
  int row0, rows;        // this block's k-tiles of the slice
  int first_block;       // the slice's contributors are first_block .. first_block + contributors - 1
  int contributors;
  int slot;              // which of this block's two partial-sum buffers the segment uses
};

__device__ __forceinline__ StripeSegment stripe_segment(int t, int end, int k_tiles, int n_tiles, int iters) {
  StripeSegment s;
  s.slice = t / k_tiles;
  s.row0 = t - s.slice * k_tiles;
  s.rows = min(k_tiles - s.row0, end - t);
  s.slab = s.slice / n_tiles;
  s.col = s.slice - s.slab * n_tiles;
  s.first_block = (s.slice * k_tiles) / iters;
  s.contributors = ((s.slice + 1) * k_tiles - 1) / iters - s.first_block + 1;
  s.slot = t == int(blockIdx.x) * iters ? 0 : 1;
  return s;
}

// The slot block b used for the slice starting at tile `slice_t0`: 0 if its run starts in
// the slice (the segment is its first), 1 if the run started earlier.
__device__ __forceinline__ int partial_slot(int block, int iters, int slice_t0) {
  return block * iters >= slice_t0 ? 0 : 1;
}

// A contributor counts itself in its slice's counter, once every thread of `sync` has stored
// its partial sums and made them visible, and learns whether it arrived last; the last resets the
// counter, so the workspace stays zeroed for the next launch. Every thread of `sync` gets the
// answer (thread 0's count, by its vote).
template <class Sync>
__device__ __forceinline__ bool arrives_last(int* counter, int contributors, const Sync& sync) {
  sync.sync();
  int arrived = 0;
  if (threadIdx.x == 0)
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(arrived) : "l"(counter) : "memory");
  const bool is_last = threadIdx.x == 0 && arrived == contributors - 1;
  if (is_last) asm volatile("st.relaxed.gpu.global.b32 [%0], %1;\n" ::"l"(counter), "r"(0) : "memory");
  return sync.any(is_last);
}

// The global reduction of a shared column slice, without waiting: every contributor
// stores its fp32 partial sums in its slot and counts itself in the slice's counter; the
// one that arrives last adds all partials in ascending block order (a fixed order, so
// results are bit-identical run to run), resets the counter (the workspace stays zeroed
// for the next launch) and writes the output. No block ever spins, and the blocks'
// stores, fences and counts overlap; what stays serial is the last block's read of every
// contributor's partials (up to MAX_SLICE_BLOCKS of them, by its k_warp 0 warps only),
// which grows with the tile: 8 KB per partial for 16 x 128, 64 KB for 64 x 256.
// Returns whether this block writes the slice; then the k_warp 0 warps hold the sum.
// A partial is stored [strip][m][value][lane]: 128-byte coalesced rows per warp. `sync`
// joins the threads taking part (the block; s8 passes its consumer warpgroup 0's).
template <int kMBlocks, int kStrips, class Sync = BlockSync>
__device__ __forceinline__ bool add_partial_sums(FragC (&acc)[kMBlocks][4][2], float* __restrict__ partials,
                                                 int* counter, const StripeSegment& s, int iters, int k_tiles,
                                                 int strip, int k_warp, const Sync& sync = Sync{}) {
  if (s.contributors == 1) return true;
  constexpr int PARTIAL_FLOATS = kStrips * kMBlocks * 32 * 32;
  const int lane = threadIdx.x % 32;
  const size_t offset = size_t(strip) * kMBlocks * 32 * 32 + lane;
  if (k_warp == 0) {
    float* mine = partials + size_t(2 * blockIdx.x + s.slot) * PARTIAL_FLOATS + offset;
#pragma unroll
    for (int m = 0; m < kMBlocks; ++m)
#pragma unroll
      for (int v = 0; v < 32; ++v) __stcg(mine + 32 * (32 * m + v), acc[m][v / 8][(v / 4) % 2].v[v % 4]);
    __threadfence();
  }
  if (!arrives_last(counter, s.contributors, sync)) return false;
  if (k_warp == 0) {
    zero_accumulators<kMBlocks>(acc);
    const int slice_t0 = s.slice * k_tiles, end = s.first_block + s.contributors;
    // Each contributor's partials cost an L2 round trip; with one m-block (decode) two
    // are in flight at once. They are still added in ascending block order.
    constexpr int AHEAD = kMBlocks == 1 ? 2 : 1;
    for (int b0 = s.first_block; b0 < end; b0 += AHEAD) {
#pragma unroll
      for (int m = 0; m < kMBlocks; ++m) {
        float v32[AHEAD][32];
#pragma unroll
        for (int i = 0; i < AHEAD; ++i) {
          const int b = b0 + i;
          if (b >= end) continue;
          const float* theirs = partials + size_t(2 * b + partial_slot(b, iters, slice_t0)) * PARTIAL_FLOATS + offset;
#pragma unroll
          for (int v = 0; v < 32; ++v) v32[i][v] = __ldcg(theirs + 32 * (32 * m + v));
        }
#pragma unroll
        for (int i = 0; i < AHEAD; ++i) {
          if (b0 + i >= end) continue;
#pragma unroll
          for (int v = 0; v < 32; ++v) acc[m][v / 8][(v / 4) % 2].v[v % 4] += v32[i][v];
        }
      }
    }
  }
  return true;
}

// The striped walk of s6 and s7, for a pipeline set up with init(): prime it with
// this block's run of tiles, then for each segment of the run multiply its tiles (the
// next segment's are fetched meanwhile), add the block's k-warp partials and then those
// of the other blocks sharing the slice, and let the block that completes the slice
// write it (`write(seg, rows_valid)`, called by the k_warp 0 warps, whose `acc` then
// holds the sum). M is cut into SLAB_ROWS-row slabs, which are just more column slices
// in the numbering.
template <int kMBlocks, class Pipe, class Write>
__device__ __forceinline__ void run_stripes(Pipe& pipe, FragC (&acc)[kMBlocks][4][2], int M, int K, int N,
                                            int* __restrict__ counters, float* __restrict__ partials, int iters,
                                            Write write) {
  const int k_tiles = K / Pipe::TILE_K_ROWS, n_tiles = N / Pipe::TILE_N_COLS;
  const int slabs = (M + Pipe::SLAB_ROWS - 1) / Pipe::SLAB_ROWS;
  const int total = slabs * n_tiles * k_tiles;
  int t = blockIdx.x * iters;
  const int end = min(t + iters, total);
  pipe.start(t, end);
  while (t < end) {
    const StripeSegment seg = stripe_segment(t, end, k_tiles, n_tiles, iters);
    const int rows_valid = min(Pipe::SLAB_ROWS, M - seg.slab * Pipe::SLAB_ROWS);

    pipe.consume(acc, seg.rows);
    pipe.reduce_across_k_warps(acc);

    const bool writes = add_partial_sums<kMBlocks, Pipe::N_STRIPS>(acc, partials, &counters[seg.slice], seg, iters,
                                                                    k_tiles, pipe.strip, pipe.k_warp);
    if (writes && pipe.k_warp == 0) write(seg, rows_valid);
    t += seg.rows;
  }
}

}  // namespace marlin
