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
// Memory parallelism comes only from many plain loads in flight: the 4 warps of a block
// share one strip and take every 4th k16 row each, each lane requests LOADS_AHEAD
// weight words before using the first, and the warps' partial sums are added in shared
// memory at the end, in a fixed order. What it lacks is latency hiding: a warp still
// stalls on each batch, on A and on the scales (the next rung adds a cp.async pipeline).
#include "marlin_core.cuh"

#ifndef M_BLOCKS
#define M_BLOCKS 1  // 16-row blocks of A per slab: 1..4
#endif
#ifndef GROUP_ROWS
#define GROUP_ROWS 128  // rows of K per scale; 0 means one scale per column (group size -1)
#endif

constexpr int K_WARPS = 4;  // warps of a block, all on the same 64-column strip, splitting K
// 128-bit weight loads in flight per lane (fewer for big slabs, whose A fragments and
// accumulators need the registers).
constexpr int LOADS_AHEAD = M_BLOCKS <= 2 ? 16 : 8;

// A operand of one 16 x 16 block straight from global memory (A is small and stays in
// L1/L2): rows g and g + 8, columns 2c, 2c+1 and 2c+8, 2c+9 of the k16 step; rows past
// the batch read as zero.
__device__ __forceinline__ marlin::FragA load_a_block(const half* const (&rows)[2], int k) {
  const int c = threadIdx.x % 4;
  marlin::FragA a;
#pragma unroll
  for (int half_k = 0; half_k < 2; ++half_k)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      a.r[2 * half_k + r] =
          rows[r] ? __ldg(reinterpret_cast<const unsigned*>(rows[r] + k + 8 * half_k + 2 * c)) : 0u;
  return a;
}

extern "C" __global__ void __launch_bounds__(32 * K_WARPS)
    s4_marlin_layout(const half* __restrict__ A, const int4* __restrict__ B, const int4* __restrict__ S,
                     half* __restrict__ C, int M, int K, int N) {
  constexpr int SLAB_ROWS = 16 * M_BLOCKS;
  const int strip = blockIdx.x, k_warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32, g = lane / 4;
  const int slab_row0 = blockIdx.y * SLAB_ROWS;
  const int rows_valid = min(SLAB_ROWS, M - slab_row0);

  // This lane's rows of A (null past the batch).
  const half* a_rows[M_BLOCKS][2];
#pragma unroll
  for (int m = 0; m < M_BLOCKS; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * m + g + 8 * r;
      a_rows[m][r] = row < rows_valid ? A + size_t(slab_row0 + row) * K : nullptr;
    }

  // Weights: one 128-bit word per lane per k16 row, N/2 words apart. Scales: the lane's
  // eight, in group row k / GROUP_ROWS.
  const int4* w_ptr = B + strip * 32 + lane;
  const int4* s_ptr = S + strip * 8 + g;
  const int w_stride = N / 2, s_stride = N / 8;

  marlin::FragC acc[M_BLOCKS][4][2];
  marlin::zero_accumulators<M_BLOCKS>(acc);
  // The weight words of LOADS_AHEAD k16 steps are requested before the first is used:
  // the only latency hiding this rung has is the number of loads a warp keeps in flight.
  const int k16_steps = K / 16;
  for (int k0 = k_warp; k0 < k16_steps; k0 += K_WARPS * LOADS_AHEAD) {
    int4 w[LOADS_AHEAD];
#pragma unroll
    for (int i = 0; i < LOADS_AHEAD; ++i)
      if (k0 + K_WARPS * i < k16_steps) w[i] = __ldg(w_ptr + size_t(k0 + K_WARPS * i) * w_stride);
#pragma unroll
    for (int i = 0; i < LOADS_AHEAD; ++i) {
      const int k16 = k0 + K_WARPS * i;
      if (k16 >= k16_steps) break;
      const int group_row = GROUP_ROWS == 0 ? 0 : (16 * k16) / GROUP_ROWS;
      const int4 s = __ldg(s_ptr + size_t(group_row) * s_stride);
      marlin::FragA a[M_BLOCKS];
#pragma unroll
      for (int m = 0; m < M_BLOCKS; ++m) a[m] = load_a_block(a_rows[m], 16 * k16);
      marlin::multiply_k16<M_BLOCKS>(a, w[i], s, acc);
    }
  }

  // Add the other warps' partial sums into warp 0, one m-block at a time, in warp order.
  __shared__ float partial[K_WARPS - 1][32][32];  // [warp - 1][accumulator][lane]
#pragma unroll
  for (int m = 0; m < M_BLOCKS; ++m) {
    if (k_warp > 0)
#pragma unroll
      for (int v = 0; v < 32; ++v) partial[k_warp - 1][v][lane] = acc[m][v / 8][(v / 4) % 2].v[v % 4];
    __syncthreads();
    if (k_warp == 0)
#pragma unroll
      for (int kw = 1; kw < K_WARPS; ++kw)
#pragma unroll
        for (int v = 0; v < 32; ++v) acc[m][v / 8][(v / 4) % 2].v[v % 4] += partial[kw - 1][v][lane];
    __syncthreads();
  }
  if (k_warp > 0) return;
  marlin::fold_into_output<M_BLOCKS>(acc, C + size_t(slab_row0) * N, N, rows_valid, 64 * strip, false);
}
