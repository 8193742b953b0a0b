// s5_pipeline.cuh -- rung 5's idea: keep several tiles of weights in flight per block with
// cp.async, so the weight stream never waits for a memory round trip.
//
// s4 loaded each weight word into a register and then waited for it: one warp per
// 64-column strip could not keep enough bytes in flight to cover ~1 us of memory latency.
// cp.async copies global -> shared without passing through registers, so a copy in flight
// costs nothing while it waits. A block keeps kStages - 1 tiles of A, weights and scales
// in flight in a ring of shared-memory stages while it multiplies the oldest one:
//
//     ring of kStages slots (4 here)      each slot (one tile, 16-byte units):
//     +-------+--------+--------+-------+  +--------+-----------------+--------+-------+
//     | read  | landed | copies | fill  |  | A tile | weights         | scales | zeros |
//     | (mma) | or in  | in     | (just |  | (swz.) | (copied & read  |        | (opt.)|
//     |       | flight | flight | read) |  |        |  by one thread) |        |       |
//     +-------+--------+--------+-------+  +--------+-----------------+--------+-------+
//     once per tile, one barrier: the slot read before this one is refilled (copies go out),
//     the next slot's copy group is waited for and published to every warp; both cursors
//     then move one slot on, round the ring
//
// The weight copies carry an L2 evict-first hint (read once; they should not push A, the
// scales or the outputs out of L2), the register fragments of substep k+1 are loaded from
// shared memory while substep k multiplies, and 8 warps share a block: TILE_N / 64 side by
// side along N, the rest (K_WARPS) splitting each tile's k16 steps, their partial sums added
// in shared memory at the end (s4's reduce_k_warp_partials). The per-weight work --
// fragments, lop3 dequantization, mma -- is rung 4's, unchanged (s4_fragments.cuh).
//
// A block walks one column slice of the weights (SliceCursor), all of K. Rung 6 (s6_stripes.cuh)
// hands the same pipeline a cursor that runs on across column slices.
#pragma once

#include "s4_fragments.cuh"

namespace marlin {

// ---------------------------------------------------------------------------------
// Global -> shared: cp.async, 16 bytes at a time, bypassing L1 (.cg).
// ---------------------------------------------------------------------------------

// The destination is a 32-bit shared-memory address (smem_address).
//
// Rows of A past the batch are zero-filled (source size 0) rather than skipped, so a
// partial slab multiplies zeros, never stale shared memory. The source address is still
// formed, so callers clamp it to a valid row.
__device__ __forceinline__ void cp_async16_zfill(unsigned smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async16(unsigned smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem));
}

// The quantized weights are read exactly once per product, so they should not push A,
// the scales and the partial sums of the global reduction out of L2. An evict-first
// cache policy, created once per thread and passed as a 64-bit operand to every weight
// copy, tells L2 to drop these lines first. (The policy register is created outside the
// copy's own asm block: the kernels were validated on an H100 in this form.)
//
// One machine-code form of this copy faults on the H100 with "illegal instruction": a
// shared address made of a register plus a uniform register (SASS `LDGSTS [R+UR+imm],
// desc[UR]`; the original MARLIN's 128 x 128 variant faults the same way). ptxas chooses
// it when it can see a uniform part in the destination (the shared-memory base, a slot
// number times the stage size), so the pipelines address their copies from a FillCursor
// (below); tests/test_nvcc.py disassembles every shipped variant and rejects the form.
__device__ __forceinline__ unsigned long long make_evict_first_policy() {
  unsigned long long policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void cp_async16_evict_first(unsigned smem, const void* gmem, unsigned long long policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "l"(policy));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// One 16-byte shared-memory load at a 32-bit shared address.
__device__ __forceinline__ int4 load_shared16(unsigned smem) {
  int4 v;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem));
  return v;
}

// The A operand's share of a pipeline stage, for the dense (s5, s6) and sparse (s7)
// pipelines alike: 16 * kMBlocks rows of kTileK fp16, copied by the block's threads 16
// bytes each into the swizzled layout ldmatrix reads, rows past the batch zero-filled.
template <int kMBlocks, int kTileK, int kThreads>
struct ATileCopy {
  static constexpr int ROW_CHUNKS = kTileK / 8;
  static constexpr int CHUNKS = 16 * kMBlocks * ROW_CHUNKS;
  static constexpr int COPIES = (CHUNKS + kThreads - 1) / kThreads;

  static constexpr int ROWS_PER_COPY = kThreads / ROW_CHUNKS;

  const int4* next;  // this thread's first chunk of the next tile (clamped row)
  int stride;        // 16-byte units per row of A
  bool valid[COPIES];
  unsigned smem_offset[COPIES];  // each copy's chunk in the stage, in bytes from chunk threadIdx.x

  __device__ __forceinline__ void init(int K) { stride = K / 8; }

  // Point at the slab starting at A (rows_valid real rows), k-tile k_tile0.
  __device__ __forceinline__ void begin(const int4* A, int rows_valid, int k_tile0) {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < COPIES; ++i) {
      const int chunk = t + kThreads * i;
      const int row = chunk / ROW_CHUNKS;
      valid[i] = chunk < CHUNKS && row < rows_valid;
      const int swizzled = a_swizzle<ROW_CHUNKS>(row, chunk % ROW_CHUNKS);
      smem_offset[i] = 16u * (swizzled - t);
    }
    const int row = t / ROW_CHUNKS;
    next = A + size_t(row < rows_valid ? row : 0) * stride + size_t(k_tile0) * ROW_CHUNKS + t % ROW_CHUNKS;
  }

  // Issue this thread's copies of the next tile into the stage whose chunk threadIdx.x is
  // at shared address `mine` (FillCursor::here).
  __device__ __forceinline__ void copy(unsigned mine) const {
    const int t = threadIdx.x;
    const int4* src = next;
#pragma unroll
    for (int i = 0; i < COPIES; ++i) {
      if (CHUNKS % kThreads == 0 || kThreads * i + t < CHUNKS)
        cp_async16_zfill(mine + smem_offset[i], valid[i] ? src : next, valid[i]);
      src += size_t(ROWS_PER_COPY) * stride;
    }
  }

  __device__ __forceinline__ void advance() { next += ROW_CHUNKS; }
};

// Where a pipeline's next fetch writes, for the dense and sparse pipelines alike: the
// shared address of chunk threadIdx.x of the stage it fills, stepped stage by stage
// through the ring. It is carried from fetch to fetch rather than computed from a slot
// number, so ptxas sees no uniform part to split off (make_evict_first_policy says why);
// for the same reason the first fetches are issued in a loop that is not unrolled.
template <int kStages, int kStageChunks>
struct FillCursor {
  unsigned first, here;
  int slot;

  __device__ __forceinline__ void start(const int4* smem) {
    first = smem_address(smem + threadIdx.x);
    here = first;
    slot = 0;
  }

  __device__ __forceinline__ void advance() {
    if (++slot == kStages) {
      slot = 0;
      here = first;
    } else {
      here += 16 * kStageChunks;
    }
  }
};

// Refill the slot consumed before the one being read (the fill cursor's), then wait for
// the next tile and make it visible to every warp, for the dense and sparse pipelines
// alike. If every read of that slot was issued (and so done) before the previous barrier
// (kSlotFree), the copies go out first. If reads of it may still be under way -- issued
// after that barrier (s7 above two m-blocks) -- the slot is free only past this barrier:
// the barrier comes first and the copies after it, one tile less being in flight at the wait.
template <int kStages, bool kSlotFree, class Fetch>
__device__ __forceinline__ void refill_and_publish(Fetch fetch) {
  if constexpr (kSlotFree) {
    fetch();
    cp_async_wait<kStages - 2>();
  } else {
    cp_async_wait<kStages - 3>();
  }
  __syncthreads();
  if constexpr (!kSlotFree) fetch();
}

// Where a pipeline's next fetch comes from: the next tile of a block's run [t, end), tiles
// numbered t = (slab * n_tiles + col) * k_tiles + k_tile, and the A rows of its slab. In
// rung 5 a run is the k_tiles tiles of one column slice, entered by its first fetch:
// enter_slice(t) moves A to the slice's slab and returns the column, at which the pipeline
// points its own streams.
template <int kMBlocks, int kTileK, int kTileN, int kThreads>
struct SliceCursor {
  static constexpr int SLAB_ROWS = 16 * kMBlocks;

  const int4* A;
  int M, k_tiles, n_tiles;
  int t, end;  // the next tile to fetch, the run's end
  int begin;   // the run's first tile
  int k_tile;  // k-tile (within its slice) of the next fetch, for the scale rows
  ATileCopy<kMBlocks, kTileK, kThreads> a_tile;

  __device__ __forceinline__ void init(const int4* A_, int M_, int K, int N) {
    A = A_;
    M = M_;
    k_tiles = K / kTileK;
    n_tiles = N / kTileN;
    a_tile.init(K);
  }

  __device__ __forceinline__ void start(int t_begin, int t_end) {
    t = t_begin;
    end = t_end;
    begin = t_begin;
  }

  __device__ __forceinline__ bool entering_slice() const { return t == begin; }

  __device__ __forceinline__ int enter_slice(int t_) {
    int slab;
    const int col = locate(t_, slab);
    move_a(slab);
    return col;
  }

  // The column of tile t_ (returned), its slab, and its k-tile within the slice.
  __device__ __forceinline__ int locate(int t_, int& slab) {
    const int slice = t_ / k_tiles;
    slab = slice / n_tiles;
    const int col = slice - slab * n_tiles;
    k_tile = t_ - slice * k_tiles;
    return col;
  }

  // Point the A copies at the slab's rows, from k_tile on.
  __device__ __forceinline__ void move_a(int slab) {
    a_tile.begin(A + size_t(slab) * SLAB_ROWS * a_tile.stride, min(SLAB_ROWS, M - slab * SLAB_ROWS), k_tile);
  }

  // Count the tile just fetched; its streams (a_tile included) advance themselves.
  __device__ __forceinline__ void advance() {
    ++k_tile;
    ++t;
  }
};

// ---------------------------------------------------------------------------------
// The ring's skeleton, for the dense pipeline below and the sparse one of rung 7 alike. A
// pipeline `P` holds the ring state (next: its cursor, fill: its FillCursor, smem, read_slot,
// SLOTS: kStages, SUBSTEPS) and supplies what differs: point_at(t) and copy_streams(dst) /
// advance_streams() for the weight-side streams of a tile, and a substep's registers
// (Fragments, load_fragments(slot, substep, f), multiply(slot, substep, f, acc)).
// ---------------------------------------------------------------------------------

// Issue the copies of the next tile of the run into the next slot of the ring (nothing past
// the run's end), and always commit a group, so "wait until at most SLOTS - 2 groups are
// pending" keeps meaning "the tile consumed next has landed". Destinations are offsets from
// the fill cursor, sources pointers stepped along: this runs once per tile, inside the loop.
template <class P>
__device__ __forceinline__ void ring_fetch(P& p) {
  if (p.next.t < p.next.end) {
    if (p.next.entering_slice()) p.point_at(p.next.t);
    p.next.a_tile.copy(p.fill.here);
    p.copy_streams(p.fill.here);
    p.next.a_tile.advance();
    p.advance_streams();
    p.next.advance();
  }
  cp_async_commit();
  p.fill.advance();
}

// Prime the ring with the first SLOTS - 1 tiles of the run [t_begin, t_end).
template <class P>
__device__ __forceinline__ void ring_start(P& p, int t_begin, int t_end) {
  p.next.start(t_begin, t_end);
  p.fill.start(p.smem);
#pragma unroll 1
  for (int i = 0; i < P::SLOTS - 1; ++i) p.fetch();
  cp_async_wait<P::SLOTS - 2>();
  __syncthreads();
  p.read_slot = 0;
}

// Multiply the next `tiles` tiles of the run into acc (zeroed here). Double-buffered
// fragments: substep sub + 1's registers load while sub multiplies, and the first substep of
// the next tile's while the last of this one does. The fetches go on past the tiles
// consumed: nothing is drained. P::SLOT_FREE: see refill_and_publish.
template <class P, int kMBlocks>
__device__ __forceinline__ void ring_consume(P& p, FragC (&acc)[kMBlocks][4][2], int tiles) {
  typename P::Fragments f[2];
  zero_accumulators<kMBlocks>(acc);
  p.load_fragments(p.read_slot, 0, f[0]);
  for (int tile = 0; tile < tiles; ++tile) {
    const int slot = p.read_slot;
    p.read_slot = slot + 1 == P::SLOTS ? 0 : slot + 1;
#pragma unroll
    for (int sub = 0; sub < P::SUBSTEPS; ++sub) {
      if (sub + 1 < P::SUBSTEPS) p.load_fragments(slot, sub + 1, f[(sub + 1) % 2]);
      if (sub == P::SUBSTEPS - 2) refill_and_publish<P::SLOTS, P::SLOT_FREE>([&] { p.fetch(); });
      if (sub == P::SUBSTEPS - 1) p.load_fragments(p.read_slot, 0, f[0]);
      p.multiply(slot, sub, f[sub % 2], acc);
    }
  }
}

constexpr int PIPELINE_THREADS = 256;  // 8 warps: TILE_N / 64 strips x K_WARPS

// The host computes the launch figures of a pipelined kernel itself (steps/s5_async_pipeline.py,
// TileConfig) and passes them in; a kernel compiled with them checks they are its own.
#if defined(LAUNCH_THREADS) && defined(LAUNCH_SMEM_BYTES)
#define MARLIN_CHECK_LAUNCH(Pipe)                                                                      \
  static_assert(Pipe::THREADS == LAUNCH_THREADS, "the host launches a different number of threads"); \
  static_assert(Pipe::SMEM_BYTES == LAUNCH_SMEM_BYTES, "the host's shared-memory figure is not the kernel's")
#else
#define MARLIN_CHECK_LAUNCH(Pipe) static_assert(true, "compiled without the host's launch figures")
#endif

// ---------------------------------------------------------------------------------
// The multi-stage pipeline over a block's run of weight tiles.
//
// A block of 8 warps computes a 16*kMBlocks x kTileN output tile, kTileK rows of K per
// pipeline stage. kTileN / 64 warps lie side by side along N (one 64-column strip each);
// the other factor, K_WARPS, splits each stage's kTileK / 16 k16 steps between warps, so
// every warp has work even when kTileN is small, and the block's partial sums are added
// in shared memory at the end of a column (reduce_across_k_warps).
//
// start(t0, t1) primes the pipeline with the first tiles of the run [t0, t1) that Cursor
// walks; consume(acc, n) multiplies the next n tiles into acc. The fetches run ahead of the
// consumer; nothing is drained, so a cursor whose run goes on past the tiles consumed keeps
// the weight stream busy meanwhile (rung 6).
//
// Stage layout in shared memory (16-byte units): A tile | weights | scales | zero points
// (only with kZeroPoints: permuted like the scales, one per group and column); scales and
// zero points are of the element type E, fp16 or bf16, like A and the output. Thread t
// copies weight chunks t, t + 256, ... of a stage and -- because chunk index =
// 256 * substep + 32 * warp + lane is exactly what the consuming lane needs -- later
// reads back the very chunks it copied. Only A is truly shared between warps.
// ---------------------------------------------------------------------------------
template <int kMBlocks, int kTileN, int kTileK, int kStages, int kGroupSize, bool kEvictFirst, bool kZeroPoints,
          class E = Fp16, class Cursor = SliceCursor<kMBlocks, kTileK, kTileN, PIPELINE_THREADS>>
struct Pipeline {
  static constexpr int THREADS = PIPELINE_THREADS, SLOTS = kStages;
  static constexpr int TILE_N_COLS = kTileN, TILE_K_ROWS = kTileK, SLAB_ROWS = 16 * kMBlocks;
  static constexpr int N_STRIPS = kTileN / 64;
  static constexpr int K_WARPS = 8 / N_STRIPS;
  static constexpr int K16_STEPS = kTileK / 16;
  static constexpr int SUBSTEPS = K16_STEPS / K_WARPS;  // k16 steps per warp per stage
  static_assert(kTileN % 64 == 0 && 8 % N_STRIPS == 0, "kTileN must be 64, 128, 256 or 512");
  static_assert(SUBSTEPS >= 2 && SUBSTEPS % 2 == 0, "fragment double buffering needs an even number of substeps");
  static_assert(kStages >= 3, "the pipeline keeps kStages - 1 tiles in flight while one is consumed");
  static_assert(kGroupSize == -1 || kGroupSize % 16 == 0, "groups are whole k16 steps");
  static_assert(kGroupSize == -1 || (kGroupSize >= kTileK ? kGroupSize % kTileK == 0 : kTileK % kGroupSize == 0),
                "a group must hold whole tiles or a tile whole groups");

  using ATile = ATileCopy<kMBlocks, kTileK, THREADS>;
  static constexpr int A_ROW_CHUNKS = ATile::ROW_CHUNKS;
  static constexpr int A_CHUNKS = ATile::CHUNKS;
  static constexpr int B_CHUNKS = K16_STEPS * kTileN / 2;  // 16 rows x kTileN codes / 32 per chunk
  static constexpr int B_COPIES = B_CHUNKS / THREADS;      // == SUBSTEPS
  // Group size -1 (one group of all K rows, as in the reference): every tile uses scale row 0.
  static constexpr int S_ROWS = (kGroupSize == -1 || kGroupSize >= kTileK) ? 1 : kTileK / kGroupSize;
  static constexpr int S_ROW_CHUNKS = kTileN / 8;
  static constexpr int S_CHUNKS = S_ROWS * S_ROW_CHUNKS;
  static_assert(S_CHUNKS <= THREADS, "one scale chunk per thread at most");
  static constexpr int Z_CHUNKS = kZeroPoints ? S_CHUNKS : 0;
  static constexpr int STAGE_CHUNKS = A_CHUNKS + B_CHUNKS + S_CHUNKS + Z_CHUNKS;
  // The in-block reduction: (K_WARPS - 1) warps per strip store 32 floats per lane for one
  // m-block at a time, over the stages once they are idle.
  static constexpr int REDUCE_CHUNKS = (K_WARPS - 1) * N_STRIPS * 32 * 32 / 4;
  static constexpr int SMEM_BYTES =
      16 * (kStages * STAGE_CHUNKS > REDUCE_CHUNKS ? kStages * STAGE_CHUNKS : REDUCE_CHUNKS);
  // A lane's ldmatrix row at substep `sub` reads chunk c0 + D * sub of its row (c0 < D =
  // 2 * K_WARPS), XOR-swizzled with row % 8. The swizzle only touches the low 3 bits, so
  // the address is one of A_PHASES per-lane offsets plus a constant: precomputed in init(),
  // the loop adds immediates instead of recomputing the swizzle every substep.
  static constexpr int A_STEP = 2 * K_WARPS;
  static constexpr int A_SWIZZLE_PHASES = A_STEP >= 8 ? 1 : 8 / A_STEP;
  static constexpr int A_PHASES = A_SWIZZLE_PHASES < SUBSTEPS ? A_SWIZZLE_PHASES : SUBSTEPS;

  int4* smem;
  // Shared addresses in stage 0 of this lane's ldmatrix rows (m-block 0, per phase), of its
  // weight chunk at substep 0 and of its scale chunk in group row 0: a stage adds an offset.
  unsigned a_read[A_PHASES], w_read, s_read;
  int warp, lane, k_warp, strip;
  const int4 *B, *S, *Z;
  Cursor next;  // the fetch side
  FillCursor<kStages, STAGE_CHUNKS> fill;
  const int4* b_next;  // this thread's first weight chunk of the next tile
  const int4* s_base;  // this thread's scale chunk in group row 0 of the slice
  const int4* z_base;  // and its zero-point chunk (kZeroPoints)
  int b_stride, s_stride;  // 16-byte units per k16 row of W, per group row (of S and Z)
  int read_slot;     // the stage the consumer reads next
  unsigned long long policy;

  __device__ __forceinline__ void init(int4* smem_, const int4* A_, const int4* B_, const int4* S_, const int4* Z_,
                                       int M_, int K, int N) {
    smem = smem_;
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    k_warp = warp / N_STRIPS;
    strip = warp % N_STRIPS;
#pragma unroll
    for (int p = 0; p < A_PHASES; ++p)
      a_read[p] = smem_address(&smem[a_swizzle<A_ROW_CHUNKS>(lane % 16, A_STEP * p + 2 * k_warp + lane / 16)]);
    w_read = smem_address(&smem[A_CHUNKS + threadIdx.x]);
    s_read = smem_address(&smem[A_CHUNKS + B_CHUNKS + 8 * strip + lane / 4]);
    next.init(A_, M_, K, N);
    B = B_;
    S = S_;
    Z = Z_;
    b_stride = N / 2;
    s_stride = N / 8;
    policy = kEvictFirst ? make_evict_first_policy() : 0ull;
  }

  // Point the fetches at tile t, the first of a column slice.
  __device__ __forceinline__ void point_at(int t) {
    const int tid = threadIdx.x;
    const int col = next.enter_slice(t);
    // Weight chunk tid of a stage is k16 row tid / (kTileN/2), chunk tid % (kTileN/2) of
    // the tile's row; copy i adds 256 / (kTileN/2) k16 rows.
    b_next = B + size_t(next.k_tile) * K16_STEPS * b_stride + size_t(tid / (kTileN / 2)) * b_stride +
             col * (kTileN / 2) + tid % (kTileN / 2);
    s_base = S + col * S_ROW_CHUNKS + (tid / S_ROW_CHUNKS) * s_stride + tid % S_ROW_CHUNKS;
    if (kZeroPoints) z_base = Z + (s_base - S);
  }

  // The weight-side streams of the next tile, into the slot at `dst`: thread t copies
  // weight chunks t, t + 256, ... (evict-first), and the first S_CHUNKS threads a chunk of
  // scales (and of zero points).
  __device__ __forceinline__ void copy_streams(unsigned dst) const {
    const int t = threadIdx.x;
    const int4* src = b_next;
#pragma unroll
    for (int i = 0; i < B_COPIES; ++i) {
      const unsigned b = dst + 16 * (A_CHUNKS + THREADS * i);
      if (kEvictFirst)
        cp_async16_evict_first(b, src, policy);
      else
        cp_async16(b, src);
      src += size_t(THREADS / (kTileN / 2)) * b_stride;  // k16 rows per copy round
    }
    if (t < S_CHUNKS) {
      // Scales are small and re-read by the next tiles of the same group: no hint.
      const size_t group_offset = size_t(kGroupSize == -1 ? 0 : (next.k_tile * kTileK) / kGroupSize) * s_stride;
      const unsigned s_dst = dst + 16 * (A_CHUNKS + B_CHUNKS);
      cp_async16(s_dst, s_base + group_offset);
      if (kZeroPoints) cp_async16(s_dst + 16 * S_CHUNKS, z_base + group_offset);
    }
  }

  __device__ __forceinline__ void advance_streams() { b_next += size_t(K16_STEPS) * b_stride; }

  __device__ __forceinline__ void fetch() { ring_fetch(*this); }
  __device__ __forceinline__ void start(int t_begin, int t_end) { ring_start(*this, t_begin, t_end); }

  // Registers for one substep: the warp's k16 step of stage `slot`, its A blocks, its 128-bit
  // weight word and the 128-bit words of scales (and zero points) of that step's group.
  // Loaded a substep ahead, so every read of a slot precedes the barrier after which the
  // slot is refilled (SLOT_FREE).
  struct Fragments {
    FragA a[kMBlocks];
    int4 w, s, z;
  };
  static constexpr bool SLOT_FREE = true;

  __device__ __forceinline__ void load_fragments(int slot, int substep, Fragments& f) const {
    const unsigned stage = 16u * slot * STAGE_CHUNKS;
    const unsigned a_row = a_read[substep % A_PHASES] + stage + 16 * ((A_STEP * substep) & ~7);
#pragma unroll
    for (int m = 0; m < kMBlocks; ++m) ldmatrix_x4(f.a[m], a_row + 16 * 16 * m * A_ROW_CHUNKS);
    f.w = load_shared16(w_read + stage + 16 * THREADS * substep);
    const int s_row = S_ROWS == 1 ? 0 : (16 * (k_warp + K_WARPS * substep)) / kGroupSize;
    const unsigned s_addr = s_read + stage + 16 * S_ROW_CHUNKS * s_row;
    f.s = load_shared16(s_addr);
    if (kZeroPoints) f.z = load_shared16(s_addr + 16 * S_CHUNKS);
  }

  __device__ __forceinline__ void multiply(int, int, const Fragments& f, FragC (&acc)[kMBlocks][4][2]) const {
    multiply_k16<kMBlocks, kZeroPoints, E>(f.a, f.w, f.s, acc, f.z);
  }

  __device__ __forceinline__ void consume(FragC (&acc)[kMBlocks][4][2], int tiles) { ring_consume(*this, acc, tiles); }

  // Add the K_WARPS warps' partial sums of a strip into its k_warp 0 warp, through the
  // stages: every warp must be done reading them first.
  __device__ __forceinline__ void reduce_across_k_warps(FragC (&acc)[kMBlocks][4][2]) {
    __syncthreads();
    reduce_k_warp_partials<kMBlocks, N_STRIPS, K_WARPS>(acc, reinterpret_cast<float*>(smem), k_warp, strip);
  }
};

}  // namespace marlin
