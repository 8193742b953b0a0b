// Rung 7: Sparse-MARLIN. The weights keep 2 of every 4 values along K, stored compressed,
// and are multiplied with sparse tensor cores (mma.sp.m16n8k32).
//
// Why it is faster: a decode-sized product is bound by streaming the weights. Keeping
// half the codes plus a 2-bit position for each kept one costs 3 bits per weight instead
// of s6's 4, and mma.sp does a 16x8x32 product in the time mma.sync does 16x8x16, so the
// tensor-core work halves too and larger batches stay memory-bound longer.
//
// The transposed product. mma.sp only accepts the sparse operand as A, its 16-row left
// factor, so every warp computes C^T = W^T A^T:
//   * sparse A = a 16 x 32 block of W^T: 16 output columns n, 32 rows of K (one "k32
//     step"). Compressed, that is 16 x 16 kept fp16 values plus metadata.
//   * dense B = a 32 x 8 block of A^T: the same 32 rows of K for 8 rows of A. mma's "col"
//     B operand of A^T is a row-major block of A, so the A tile sits in shared memory
//     exactly as in s4-s6 and two ldmatrix.x4 per 16 rows of A deliver two B operands
//     (rows 0-7 and 8-15) for a whole k32 step.
//   * the accumulator is a 16 x 8 block of C^T: lane 4g + c holds columns n = g, g + 8 of
//     rows 2c, 2c + 1 of C.
//
// Following the data, per k32 step of a warp's 64-column strip (four 16-column tiles j):
//   global --cp.async--> shared: a stage holds the A tile, the kept codes (one 16-byte
//     chunk per lane and step, copied and later read back by the same thread), the
//     metadata (8 bytes per lane and step) and the scales, all streamed with the L2
//     evict-first hint except A and the scales.
//   shared --> registers: 2 ldmatrix.x4 per m16 block for A; one 128-bit load of codes,
//     one 64-bit load of metadata, one 128-bit load of scales (the s4 permutation).
//   dequantize: word j of the codes is tile j's A fragment. s4's lop3 / 0x6400 routine
//     makes four fp16 pairs of it, scaled by the scales of tile rows g and g + 8: exactly
//     the four registers mma.sp wants (reference/sparse_marlin.py places the nibbles).
//   mma.sp: metadata word p serves tiles 2p (selector 0: lanes 4g, 4g+1 supply it) and
//     2p + 1 (selector 1: lanes 4g+2, 4g+3), so one register per lane covers two tiles.
//   reduce and write: s6's schedule and no-wait global reduction, unchanged; only the
//     write-out differs. Lanes 4g+c and 4(g^1)+c swap one value so each holds two
//     neighbouring columns of one row of C and writes them as one fp16 pair.
//
// reference/sparse_marlin.py emulates this kernel lane by lane (emulate_kernel); the
// copy and read indices below are the ones modelled there.
#include "s6_stripes.cuh"

#ifndef M_BLOCKS
#define M_BLOCKS 1  // 16-row blocks of A per slab: 1..4
#endif
#ifndef TILE_N
#define TILE_N 128  // output columns per column slice
#endif
#ifndef TILE_K
#define TILE_K 256  // rows of K per tile (one pipeline stage): 8 k32 steps
#endif
#ifndef STAGES
#define STAGES 4  // tiles in flight + 1
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 128  // rows of K per scale, as reference.QuantizedWeight: -1 is one group of all K rows
#endif
#ifndef EVICT_FIRST
#define EVICT_FIRST 1  // L2 evict-first hint on the weight and metadata copies
#endif

namespace sparse {

using marlin::FragA;
using marlin::FragB;
using marlin::FragC;

// The compressed A operand of one mma.sp: lane 4g + c holds kept values (row, column)
// (g, 2c..2c+1), (g+8, 2c..2c+1), (g, 2c+8..2c+9), (g+8, 2c+8..2c+9) of the 16 x 16 tile.
struct FragW { unsigned r[4]; };

// acc (16 x 8, fp32) += W (16 x 32, 2:4 sparse, given as kept values + metadata) @ B
// (32 x 8). b0..b3 hold rows 2c..2c+1, 8+2c.., 16+2c.., 24+2c.. of column g of B. The
// ordered-metadata form promises the two positions of each group are increasing, which
// the packing guarantees; the selector must be an immediate.
template <int kSelector>
__device__ __forceinline__ void mma_sp_16832(const FragW& w, unsigned b0, unsigned b1, unsigned b2, unsigned b3,
                                             unsigned meta, FragC& c) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
      : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])
      : "r"(w.r[0]), "r"(w.r[1]), "r"(w.r[2]), "r"(w.r[3]), "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(meta),
        "n"(kSelector));
}

// Dequantize one lane's 128-bit word of kept codes into the A fragments of its four
// tiles. s4's dequantizer gives `left`, the fp16 pairs of tile row g (scaled by the low
// scale), and `right`, those of row g + 8 (the high scale), each with kept columns 2c..
// and 2c+8..; their order in the fragment is left, right, left, right.
__device__ __forceinline__ void dequantize_tiles(const int4& w, const int4& s, FragW (&frag)[4]) {
  const unsigned words[4] = {unsigned(w.x), unsigned(w.y), unsigned(w.z), unsigned(w.w)};
  const unsigned scales[4] = {unsigned(s.x), unsigned(s.y), unsigned(s.z), unsigned(s.w)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    FragB left, right;
    marlin::dequantize_tile(words[j], scales[j], left, right);
    frag[j] = {{left.r[0], right.r[0], left.r[1], right.r[1]}};
  }
}

// The mmas of one m16 block of A against the four tiles. a[h] is the B operand of the
// block's rows 8h..8h+7, exactly as load_a's ldmatrix returns it (register i: K rows
// 8i..8i+7 of the step), so it goes to mma.sp without a register move. Metadata word
// j / 2 serves tile j through selector j % 2.
__device__ __forceinline__ void multiply_block(const FragW (&frag)[4], const FragA (&a)[2], const uint2& meta,
                                               FragC (&acc)[4][2]) {
  const unsigned metas[2] = {meta.x, meta.y};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (j % 2 == 0)
        mma_sp_16832<0>(frag[j], a[h].r[0], a[h].r[1], a[h].r[2], a[h].r[3], metas[j / 2], acc[j][h]);
      else
        mma_sp_16832<1>(frag[j], a[h].r[0], a[h].r[1], a[h].r[2], a[h].r[3], metas[j / 2], acc[j][h]);
    }
}

// A lane's accumulator (m, j, h) holds C[row][col] for rows 16m + 8h + 2c (+1) and
// columns 16j + g (+8) of its warp's strip: neighbouring rows of one column, but C is
// row-major. Lanes 4g+c and 4(g^1)+c swap one value, after which the even-g lane holds
// columns g, g+1 of row 2c and the odd one columns g-1, g of row 2c+1: 4-byte stores.
template <int kMBlocks>
__device__ __forceinline__ void fold_into_output(const FragC (&acc)[kMBlocks][4][2], half* __restrict__ C, int ldc,
                                                 int rows_valid, int strip_col) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int odd = g & 1;
#pragma unroll
  for (int m = 0; m < kMBlocks; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float* v = acc[m][j][h].v;
        const float got_top = __shfl_xor_sync(0xffffffffu, odd ? v[0] : v[1], 4);
        const float got_bottom = __shfl_xor_sync(0xffffffffu, odd ? v[2] : v[3], 4);
        const int row = 16 * m + 8 * h + 2 * c + odd;
        if (row < rows_valid) {
          half2* p = reinterpret_cast<half2*>(C + size_t(row) * ldc + strip_col + 16 * j + g - odd);
          p[0] = __float22half2_rn(odd ? make_float2(got_top, v[1]) : make_float2(v[0], got_top));
          p[4] = __float22half2_rn(odd ? make_float2(got_bottom, v[3]) : make_float2(v[2], got_bottom));
        }
      }
}

// ---------------------------------------------------------------------------------
// The pipeline over a block's run of tiles: s6's (fetches run ahead across column
// slices, the k-warp reduction has shared memory of its own), with a k32 step where s6
// has a k16 step and the metadata as a fourth stream. A block's 8 warps are kTileN / 64
// strips side by side along N times K_WARPS warps splitting each stage's k32 steps.
// Stage layout (16-byte units): A tile | kept codes | metadata | scales.
// ---------------------------------------------------------------------------------
template <int kMBlocks, int kTileN, int kTileK, int kStages, int kGroupSize, bool kEvictFirst>
struct Pipeline {
  static constexpr int THREADS = marlin::PIPELINE_THREADS, SLOTS = kStages;
  static constexpr int TILE_N_COLS = kTileN, TILE_K_ROWS = kTileK, SLAB_ROWS = 16 * kMBlocks;
  static constexpr int N_STRIPS = kTileN / 64;
  static constexpr int K_WARPS = 8 / N_STRIPS;
  static constexpr int K32_STEPS = kTileK / 32;
  static constexpr int SUBSTEPS = K32_STEPS / K_WARPS;  // k32 steps per warp per stage
  static_assert(kTileN % 64 == 0 && 8 % N_STRIPS == 0, "kTileN must be 64, 128, 256 or 512");
  static_assert(K32_STEPS % K_WARPS == 0, "every warp gets the same number of k32 steps");
  static_assert(SUBSTEPS >= 2 && SUBSTEPS % 2 == 0, "fragment double buffering needs an even number of substeps");
  static_assert(kStages >= 3, "the pipeline keeps kStages - 1 tiles in flight while one is consumed");
  static_assert(kGroupSize == -1 || kGroupSize % 32 == 0, "groups are whole k32 steps");
  static_assert(kGroupSize == -1 || (kGroupSize >= kTileK ? kGroupSize % kTileK == 0 : kTileK % kGroupSize == 0),
                "a group must hold whole tiles or a tile whole groups");

  using ATile = marlin::ATileCopy<kMBlocks, kTileK, THREADS>;
  static constexpr int A_ROW_CHUNKS = ATile::ROW_CHUNKS;
  static constexpr int A_CHUNKS = ATile::CHUNKS;
  // Per k32 step: kTileN / 2 chunks of kept codes (32 per strip, one per lane) and
  // kTileN / 4 of metadata (16 per strip, 8 bytes per lane).
  static constexpr int W_ROW_CHUNKS = kTileN / 2;
  static constexpr int W_CHUNKS = K32_STEPS * W_ROW_CHUNKS;
  static constexpr int W_COPIES = W_CHUNKS / THREADS;  // == SUBSTEPS
  static constexpr int M_ROW_CHUNKS = kTileN / 4;
  static constexpr int M_CHUNKS = K32_STEPS * M_ROW_CHUNKS;
  static constexpr int M_COPIES = (M_CHUNKS + THREADS - 1) / THREADS;
  static_assert(THREADS % W_ROW_CHUNKS == 0 && THREADS % M_ROW_CHUNKS == 0, "a copy round covers whole k32 rows");
  static constexpr int S_ROWS = (kGroupSize == -1 || kGroupSize >= kTileK) ? 1 : kTileK / kGroupSize;
  static constexpr int S_ROW_CHUNKS = kTileN / 8;
  static constexpr int S_CHUNKS = S_ROWS * S_ROW_CHUNKS;
  static_assert(S_CHUNKS <= THREADS, "one scale chunk per thread at most");
  static constexpr int STAGE_CHUNKS = A_CHUNKS + W_CHUNKS + M_CHUNKS + S_CHUNKS;
  static constexpr int REDUCE_CHUNKS = (K_WARPS - 1) * N_STRIPS * 32 * 32 / 4;
  static constexpr int SMEM_BYTES = 16 * (kStages * STAGE_CHUNKS + REDUCE_CHUNKS);

  // The ring state that marlin::ring_start / ring_fetch / ring_consume use (smem, next, fill,
  // read_slot), the warp's place and the copy policy are declared and set up as in
  // marlin::Pipeline (s5_pipeline.cuh), on purpose: the two differ in their streams.
  int4* smem;
  int warp, lane, k_warp, strip;
  const int4 *W, *Meta, *S;
  marlin::RunCursor<kMBlocks, kTileK, kTileN, THREADS> next;  // the fetch side
  marlin::FillCursor<kStages, STAGE_CHUNKS> fill;
  const int4* w_next;  // this thread's first chunk of kept codes of the next tile
  const int4* m_next;  // this thread's first metadata chunk of the next tile
  const int4* s_base;  // this thread's scale chunk in group row 0 of the slice
  int w_stride, m_stride, s_stride;  // 16-byte units per k32 row of codes / metadata, per group row
  int read_slot;
  unsigned long long policy;

  __device__ __forceinline__ void init(int4* smem_, const int4* A_, const int4* W_, const int4* Meta_, const int4* S_,
                                       int M_, int K, int N) {
    smem = smem_;
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    k_warp = warp / N_STRIPS;
    strip = warp % N_STRIPS;
    next.init(A_, M_, K, N);
    W = W_;
    Meta = Meta_;
    S = S_;
    w_stride = N / 2;
    m_stride = N / 4;
    s_stride = N / 8;
    policy = kEvictFirst ? marlin::make_evict_first_policy() : 0ull;
  }

  __device__ __forceinline__ void point_at(int t) {
    const int tid = threadIdx.x;
    const int col = next.enter_slice(t);
    // Chunk tid of a stage's codes is k32 row tid / W_ROW_CHUNKS of the tile, chunk
    // tid % W_ROW_CHUNKS of the slice; the metadata likewise with M_ROW_CHUNKS.
    const size_t k32_row0 = size_t(next.k_tile) * K32_STEPS;
    w_next = W + (k32_row0 + tid / W_ROW_CHUNKS) * w_stride + col * W_ROW_CHUNKS + tid % W_ROW_CHUNKS;
    m_next = Meta + (k32_row0 + tid / M_ROW_CHUNKS) * m_stride + col * M_ROW_CHUNKS + tid % M_ROW_CHUNKS;
    s_base = S + col * S_ROW_CHUNKS + (tid / S_ROW_CHUNKS) * s_stride + tid % S_ROW_CHUNKS;
  }

  __device__ __forceinline__ int4* stage_a(int slot) const { return smem + slot * STAGE_CHUNKS; }
  __device__ __forceinline__ int4* stage_w(int slot) const { return stage_a(slot) + A_CHUNKS; }
  __device__ __forceinline__ int4* stage_m(int slot) const { return stage_w(slot) + W_CHUNKS; }
  __device__ __forceinline__ int4* stage_s(int slot) const { return stage_m(slot) + M_CHUNKS; }

  __device__ __forceinline__ void copy_streamed(unsigned dst, const int4* src) const {
    if (kEvictFirst)
      marlin::cp_async16_evict_first(dst, src, policy);
    else
      marlin::cp_async16(dst, src);
  }

  // The weight-side streams of the next tile, into the slot at `dst` (marlin::ring_fetch
  // copies A and steps the cursor): kept codes and metadata evict-first, then the scales.
  __device__ __forceinline__ void copy_streams(unsigned dst) const {
    const int t = threadIdx.x;
    const int4* w_src = w_next;
#pragma unroll
    for (int i = 0; i < W_COPIES; ++i) {
      copy_streamed(dst + 16 * (A_CHUNKS + THREADS * i), w_src);
      w_src += size_t(THREADS / W_ROW_CHUNKS) * w_stride;
    }
    const int4* m_src = m_next;
#pragma unroll
    for (int i = 0; i < M_COPIES; ++i) {
      if (M_CHUNKS % THREADS == 0 || THREADS * i + t < M_CHUNKS)
        copy_streamed(dst + 16 * (A_CHUNKS + W_CHUNKS + THREADS * i), m_src);
      m_src += size_t(THREADS / M_ROW_CHUNKS) * m_stride;
    }
    if (t < S_CHUNKS) {
      const int group_row = kGroupSize == -1 ? 0 : (next.k_tile * kTileK) / kGroupSize;
      const unsigned s_dst = dst + 16 * (A_CHUNKS + W_CHUNKS + M_CHUNKS);
      marlin::cp_async16(s_dst, s_base + size_t(group_row) * s_stride);
    }
  }

  __device__ __forceinline__ void advance_streams() {
    w_next += size_t(K32_STEPS) * w_stride;
    m_next += size_t(K32_STEPS) * m_stride;
  }

  __device__ __forceinline__ void fetch() { marlin::ring_fetch(*this); }
  __device__ __forceinline__ void start(int t_begin, int t_end) { marlin::ring_start(*this, t_begin, t_end); }

  // Up to two m-blocks (M <= 32) the A fragments of a substep fit in registers beside the
  // accumulators, and are loaded a substep ahead with everything else, as in s6: no
  // multiply waits for a shared-memory read. With more m-blocks they would not fit; then
  // block m + 1 is loaded while block m multiplies, and block 0 before the dequantization.
  static constexpr bool A_AHEAD = kMBlocks <= 2;
  static constexpr int A_AHEAD_BLOCKS = A_AHEAD ? kMBlocks : 1;  // an unused 1 otherwise

  // Rows 16m..16m+15 of the A tile at the warp's k32 step: one ldmatrix.x4 per 8 rows
  // (half h), whose lanes 8i..8i+7 point at those rows in the step's chunk i. Matrix i is
  // then K rows 8i..8i+7 of A^T, the i-th register of mma.sp's B operand.
  __device__ __forceinline__ void load_a(int slot, int substep, int m, FragA (&a)[2]) const {
    const int step = k_warp + K_WARPS * substep;
    const int4* sa = stage_a(slot);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int chunk = marlin::a_swizzle<A_ROW_CHUNKS>(16 * m + 8 * h + lane % 8, 4 * step + lane / 8);
      marlin::ldmatrix_x4(a[h], marlin::smem_address(&sa[chunk]));
    }
  }

  // Registers for one substep, loaded one substep ahead: the warp's 128 bits of kept
  // codes (the chunk this thread copied), 64 bits of metadata, the 128 bits of scales of
  // the step's group, and with A_AHEAD the m-blocks of A.
  struct Fragments {
    int4 w;
    uint2 meta;
    int4 s;
    FragA a[A_AHEAD_BLOCKS][2];
  };

  __device__ __forceinline__ void load_fragments(int slot, int substep, Fragments& f) const {
    const int step = k_warp + K_WARPS * substep;
    f.w = stage_w(slot)[THREADS * substep + threadIdx.x];
    f.meta = reinterpret_cast<const uint2*>(stage_m(slot))[step * (kTileN / 2) + 32 * strip + lane];
    const int s_row = S_ROWS == 1 ? 0 : (32 * step) / kGroupSize;
    f.s = stage_s(slot)[s_row * S_ROW_CHUNKS + 8 * strip + lane / 4];
    if constexpr (A_AHEAD) {
#pragma unroll
      for (int m = 0; m < kMBlocks; ++m) load_a(slot, substep, m, f.a[m]);
    }
  }

  // One substep's work: dequantize the weights, then one m-block of A after another.
  __device__ __forceinline__ void multiply(int slot, int substep, const Fragments& f,
                                          FragC (&acc)[kMBlocks][4][2]) const {
    FragW frag[4];
    if constexpr (A_AHEAD) {
      dequantize_tiles(f.w, f.s, frag);
#pragma unroll
      for (int m = 0; m < kMBlocks; ++m) multiply_block(frag, f.a[m], f.meta, acc[m]);
    } else {
      FragA late[2][2];
      load_a(slot, substep, 0, late[0]);
      dequantize_tiles(f.w, f.s, frag);
#pragma unroll
      for (int m = 0; m < kMBlocks; ++m) {
        if (m + 1 < kMBlocks) load_a(slot, substep, m + 1, late[(m + 1) % 2]);
        multiply_block(frag, late[m % 2], f.meta, acc[m]);
      }
    }
  }

  // When every read of a slot happens a substep ahead (A_AHEAD), the slot consumed before
  // this one is refilled before the barrier, as in s6. Otherwise the A fragments are read
  // from shared memory during multiply(), so a slot may only be refilled after a barrier
  // that follows every warp's last multiply on it: just after the barrier of the next slot,
  // which makes the wait one group deeper (marlin::refill_and_publish).
  static constexpr bool SLOT_FREE = A_AHEAD;

  __device__ __forceinline__ void consume(FragC (&acc)[kMBlocks][4][2], int tiles) {
    marlin::ring_consume(*this, acc, tiles);
  }

  __device__ __forceinline__ void reduce_across_k_warps(FragC (&acc)[kMBlocks][4][2]) {
    marlin::reduce_k_warp_partials<kMBlocks, N_STRIPS, K_WARPS>(
        acc, reinterpret_cast<float*>(smem + kStages * STAGE_CHUNKS), k_warp, strip);
  }
};

}  // namespace sparse

using Pipe = sparse::Pipeline<M_BLOCKS, TILE_N, TILE_K, STAGES, GROUP_SIZE, EVICT_FIRST != 0>;
MARLIN_CHECK_LAUNCH(Pipe);

// The striped partition and the no-wait global reduction of s6 (s6_stripes.cuh).
extern "C" __global__ void __launch_bounds__(Pipe::THREADS, 1)
    s7_sparse_marlin(const int4* __restrict__ A, const int4* __restrict__ W, const int4* __restrict__ Meta,
                     const int4* __restrict__ S, half* __restrict__ C, int M, int K, int N,
                     int* __restrict__ counters, float* __restrict__ partials, int iters) {
  extern __shared__ int4 smem[];
  Pipe pipe;
  pipe.init(smem, A, W, Meta, S, M, K, N);
  marlin::FragC acc[M_BLOCKS][4][2];
  marlin::run_stripes<M_BLOCKS>(pipe, acc, M, K, N, counters, partials, iters,
                                [&](const marlin::StripeSegment& seg, int rows_valid) {
                                  sparse::fold_into_output<M_BLOCKS>(acc, C + size_t(seg.slab) * Pipe::SLAB_ROWS * N, N,
                                                                     rows_valid, seg.col * TILE_N + 64 * pipe.strip);
                                });
}
