// Rung 4: the MARLIN weight layout. Tensor cores, but the weights go straight from
// global memory into the registers that feed them.
//
// s3 dequantized each code on its own into shared memory and lifted fp16 blocks out with
// ldmatrix. Here the reshuffling was done once, offline (reference/marlin_layout.py): each lane's
// 128-bit load of a k16 row brings exactly the 32 codes of its B fragments for the four
// 16 x 16 tiles of its warp's 64-column strip, nibble-interleaved so that two lop3
// instructions and one fp16 subtract / fma turn each register into two fp16 weights
// (q - 8). The per-group scales are permuted the same way: one 128-bit load gives a lane
// the eight scales its fragments need, and they stay in registers. So a weight byte is
// touched by exactly one load instruction and never by shared memory: the rung moves
// 4 bits per weight and spends under 2 instructions per weight on dequantization.
//
// Memory parallelism comes only from plain loads: the 4 warps of a block share one strip
// and take every 4th k16 row each, and each lane requests LOADS_AHEAD weight words of a
// batch before using the first. A is the one operand every warp needs, so the block
// copies the batch's slab of A (and its scales) into shared memory with coalesced 16-byte
// loads once, while the weight loads are in flight, and the warps read their A fragments
// with ldmatrix. The warps' partial sums are added in shared memory at the end, in a
// fixed order. What it lacks is overlap between batches: every batch starts with a full
// memory round trip that nothing hides (the next rung's cp.async pipeline does).
#include "s4_fragments.cuh"

#ifndef M_BLOCKS
#define M_BLOCKS 1  // 16-row blocks of A per slab: 1..4
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 128  // rows of K per scale, as reference.QuantizedWeight: -1 is one group of all K rows
#endif
#ifndef THREADS
#define THREADS 128  // the host's launch figure (steps/s4_marlin_layout.py), passed in
#endif

constexpr int K_WARPS = THREADS / 32;  // warps of a block, all on the same 64-column strip, splitting K
constexpr int SLAB_ROWS = 16 * M_BLOCKS;
// 128-bit weight loads in flight per lane; fewer for big slabs, whose accumulators need
// the registers and whose A slab needs the shared memory (32 KB at most).
constexpr int LOADS_AHEAD = M_BLOCKS == 1 ? 16 : M_BLOCKS == 2 ? 8 : 4;
constexpr int BATCH_K16 = K_WARPS * LOADS_AHEAD;  // k16 steps of one batch, all warps together
constexpr int A_ROW_CHUNKS = BATCH_K16 * 2;       // 16-byte chunks per row of the batch's A
constexpr int A_CHUNKS = SLAB_ROWS * A_ROW_CHUNKS;
constexpr int BATCH_K = 16 * BATCH_K16;
constexpr int GROUP_K = GROUP_SIZE == -1 ? BATCH_K : GROUP_SIZE;  // one scale row for the whole batch if -1
constexpr int S_ROWS = GROUP_K >= BATCH_K ? 1 : BATCH_K / GROUP_K;
constexpr int S_CHUNKS = S_ROWS * 8;  // a 64-column strip of a scale row is 8 chunks
static_assert(THREADS % 32 == 0 && THREADS >= 64, "whole warps, at least two to split K");
static_assert(A_CHUNKS % THREADS == 0 && (S_CHUNKS % THREADS == 0 || S_CHUNKS < THREADS), "whole copies per thread");
static_assert(BATCH_K % GROUP_K == 0 || GROUP_K % BATCH_K == 0, "a batch holds whole groups or lies in one");
static_assert(A_CHUNKS * 16 >= (K_WARPS - 1) * 32 * 32 * 4, "the A buffer doubles as the reduction buffer");

// Copy the batch's slab of A (rows past the batch and columns past K as zeros) and its
// scale rows into shared memory. Each thread first issues all its loads, then stores.
__device__ __forceinline__ void stage_batch(int4* __restrict__ sa, int4* __restrict__ ss, const half* __restrict__ A,
                                            const int4* __restrict__ S, int rows_valid, int K, int N, int k16_0) {
  constexpr int COPIES = A_CHUNKS / THREADS;
  constexpr int S_COPIES = (S_CHUNKS + THREADS - 1) / THREADS;
  const int k_chunks = K / 8 - 2 * k16_0;  // chunks of this batch that lie inside K
  int4 v[COPIES];
#pragma unroll
  for (int i = 0; i < COPIES; ++i) {
    const int chunk = threadIdx.x + THREADS * i, row = chunk / A_ROW_CHUNKS, col = chunk % A_ROW_CHUNKS;
    v[i] = row < rows_valid && col < k_chunks
               ? __ldg(reinterpret_cast<const int4*>(A + size_t(row) * K + 16 * k16_0) + col)
               : make_int4(0, 0, 0, 0);
  }
  const int group0 = GROUP_SIZE == -1 ? 0 : 16 * k16_0 / GROUP_SIZE;
  const int groups = GROUP_SIZE == -1 ? 1 : K / GROUP_SIZE;
  int4 s[S_COPIES];
#pragma unroll
  for (int i = 0; i < S_COPIES; ++i) {
    const int chunk = threadIdx.x + THREADS * i, row = group0 + chunk / 8;
    s[i] = chunk < S_CHUNKS && row < groups ? __ldg(S + size_t(row) * (N / 8) + chunk % 8) : make_int4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < COPIES; ++i) {
    const int chunk = threadIdx.x + THREADS * i;
    sa[marlin::a_swizzle<A_ROW_CHUNKS>(chunk / A_ROW_CHUNKS, chunk % A_ROW_CHUNKS)] = v[i];
  }
#pragma unroll
  for (int i = 0; i < S_COPIES; ++i)
    if (threadIdx.x + THREADS * i < S_CHUNKS) ss[threadIdx.x + THREADS * i] = s[i];
}

extern "C" __global__ void __launch_bounds__(THREADS)
    s4_marlin_layout(const half* __restrict__ A, const int4* __restrict__ B, const int4* __restrict__ S,
                     half* __restrict__ C, int M, int K, int N) {
  __shared__ int4 sa[A_CHUNKS];
  __shared__ int4 ss[S_CHUNKS];
  const int strip = blockIdx.x, k_warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slab_row0 = blockIdx.y * SLAB_ROWS;
  const int rows_valid = min(SLAB_ROWS, M - slab_row0);
  const half* A_slab = A + size_t(slab_row0) * K;
  // Weights: one 128-bit word per lane per k16 row, N/2 words apart. Scales: the 8
  // columns of the strip's row of the permuted scales that this lane's fragments use.
  const int4* w_ptr = B + strip * 32 + lane;
  const int4* S_strip = S + strip * 8;
  const int w_stride = N / 2;

  marlin::FragC acc[M_BLOCKS][4][2];
  marlin::zero_accumulators<M_BLOCKS>(acc);
  const int k16_steps = K / 16;
  for (int k16_0 = 0; k16_0 < k16_steps; k16_0 += BATCH_K16) {
    // This warp's weight words of the batch are requested first; their latency overlaps
    // the staging of A below and is the only latency hiding this rung has.
    int4 w[LOADS_AHEAD];
#pragma unroll
    for (int i = 0; i < LOADS_AHEAD; ++i) {
      const int k16 = k16_0 + k_warp + K_WARPS * i;
      if (k16 < k16_steps) w[i] = __ldg(w_ptr + size_t(k16) * w_stride);
    }
    __syncthreads();  // every warp is done reading the previous batch from shared memory
    stage_batch(sa, ss, A_slab, S_strip, rows_valid, K, N, k16_0);
    __syncthreads();
    const int group0 = GROUP_SIZE == -1 ? 0 : 16 * k16_0 / GROUP_SIZE;
#pragma unroll
    for (int i = 0; i < LOADS_AHEAD; ++i) {
      const int step = k_warp + K_WARPS * i;  // k16 step within the batch
      if (k16_0 + step >= k16_steps) break;
      marlin::FragA a[M_BLOCKS];
#pragma unroll
      for (int m = 0; m < M_BLOCKS; ++m) {
        const int chunk = marlin::a_swizzle<A_ROW_CHUNKS>(16 * m + lane % 16, 2 * step + lane / 16);
        marlin::ldmatrix_x4(a[m], marlin::smem_address(&sa[chunk]));
      }
      const int s_row = GROUP_SIZE == -1 ? 0 : 16 * (k16_0 + step) / GROUP_SIZE - group0;
      marlin::multiply_k16<M_BLOCKS>(a, w[i], ss[8 * s_row + lane / 4], acc);
    }
  }

  // Add the other warps' partial sums into warp 0, in warp order, through the A buffer.
  __syncthreads();
  marlin::reduce_k_warp_partials<M_BLOCKS, 1, K_WARPS>(acc, reinterpret_cast<float*>(sa), k_warp, 0);
  if (k_warp == 0) marlin::fold_into_output<M_BLOCKS>(acc, C + size_t(slab_row0) * N, N, rows_valid, 64 * strip);
}
