// Rung 2: thread blocks tile A and the packed int4 weights through shared memory.
//
// Rung 1 gave every output its own thread, so each weight word was fetched M times and each
// row of A once per column. Here a block of 128 threads owns a BM x 128 tile of C and walks
// K in slices of 64: it loads the slice of A and of the packed weights once, with 16-byte
// coalesced loads, dequantizes every weight exactly once into shared memory, and then all its
// threads reuse those values from shared memory. Each thread keeps TM x 8 fp32 accumulators
// in registers, so every value it reads from shared memory feeds several multiply-adds.
// While the threads compute on one slice, the loads of the next are already in flight.
#include "common.cuh"

// Rows of A per block: 16 for decode-sized batches, 64 when M is large enough to fill them.
#ifndef S2_BM
#define S2_BM 64
#endif

namespace {

constexpr int THREADS = 128;
constexpr int BM = S2_BM;
constexpr int BN = 128;
constexpr int BK = 64;

// Threads form a 8 (along M) x 16 (along N) grid; a thread owns TM rows and two runs of four
// columns, 64 apart, so a warp's float4 reads of a weight row are contiguous in shared memory.
constexpr int THREADS_N = 16;
constexpr int THREADS_M = THREADS / THREADS_N;
constexpr int TM = BM / THREADS_M;
constexpr int RUN = 4;
constexpr int TN = 2 * RUN;
static_assert(BM % THREADS_M == 0 && (TM == 2 || TM % 4 == 0), "BM must be 16 or a multiple of 32");
static_assert(THREADS_N * TN == BN, "the threads along N must cover the tile");

// One 16-byte vector holds 8 halves of A or 4 packed words (4 columns x 8 rows of weights).
constexpr int A_VECS = BM * (BK / 8) / THREADS;
constexpr int W_VECS = (BK / 8) * (BN / 4) / THREADS;
static_assert(A_VECS * THREADS == BM * (BK / 8) && W_VECS * THREADS == (BK / 8) * (BN / 4), "whole vectors per thread");

// Shared memory holds fp32 so the inner loop is pure loads and FMAs. A is stored transposed
// (k-major) so a thread's TM consecutive rows are one vector load.
struct Shared {
  float a[BK][BM];
  float w[BK][BN];
};

// One K slice as it travels from global memory: raw A vectors, packed weight words and the
// four fp16 scales of each weight vector's columns.
struct Slice {
  uint4 a[A_VECS];
  uint4 w[W_VECS];
  uint2 s[W_VECS];
};

// Global -> registers. Everything outside the matrices (rows >= M, the K and N tails) loads
// as zero, so shared memory never holds garbage that could turn a product into NaN.
__device__ __forceinline__ void load_slice(Slice& slice, const half* A, const uint4* qweight, const half* scales,
                                           int M, int K, int N, int group_shift, int m0, int n0, int k0) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int v = 0; v < A_VECS; ++v) {
    const int idx = threadIdx.x + v * THREADS;
    const int m = m0 + idx % BM;
    const int k = k0 + idx / BM * 8;
    slice.a[v] = (m < M && k < K) ? *reinterpret_cast<const uint4*>(A + static_cast<long long>(m) * K + k) : zero;
  }
#pragma unroll
  for (int v = 0; v < W_VECS; ++v) {
    const int idx = threadIdx.x + v * THREADS;
    const int row = k0 / 8 + idx / (BN / 4);  // row of packed words: weights 8*row .. 8*row+7
    const int n = n0 + idx % (BN / 4) * 4;
    const bool inside = row < K / 8 && n < N;
    slice.w[v] = inside ? qweight[(static_cast<long long>(row) * N + n) / 4] : zero;
    const int group = (8 * row) >> group_shift;
    slice.s[v] = inside ? *reinterpret_cast<const uint2*>(scales + static_cast<long long>(group) * N + n)
                        : make_uint2(0, 0);
  }
}

// Registers -> shared memory: A converted to fp32 and transposed, weights dequantized once.
// Neighbouring threads hold neighbouring rows of A, so the transposed scalar stores of a warp
// land in different banks.
__device__ __forceinline__ void store_slice(const Slice& slice, Shared& sm) {
#pragma unroll
  for (int v = 0; v < A_VECS; ++v) {
    const int idx = threadIdx.x + v * THREADS;
    const int m = idx % BM;
    const int k = idx / BM * 8;
    const half* h = reinterpret_cast<const half*>(&slice.a[v]);
#pragma unroll
    for (int j = 0; j < 8; ++j) sm.a[k + j][m] = __half2float(h[j]);
  }
#pragma unroll
  for (int v = 0; v < W_VECS; ++v) {
    const int idx = threadIdx.x + v * THREADS;
    const int k = idx / (BN / 4) * 8;
    const int n = idx % (BN / 4) * 4;
    const uint4 w = slice.w[v];
    const half2 s01 = bits_half2(slice.s[v].x);
    const half2 s23 = bits_half2(slice.s[v].y);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 lo = __half22float2(dequant_plain_pair(w.x, w.y, i, s01));
      const float2 hi = __half22float2(dequant_plain_pair(w.z, w.w, i, s23));
      *reinterpret_cast<float4*>(&sm.w[k + i][n]) = make_float4(lo.x, lo.y, hi.x, hi.y);
    }
  }
}

// acc += this thread's TM x TN block of (A slice) @ (W slice), all operands from shared memory.
__device__ __forceinline__ void fma_slice(float (&acc)[TM][TN], const Shared& sm, int tm, int tn) {
#pragma unroll 8
  for (int k = 0; k < BK; ++k) {
    float a[TM];
    float w[TN];
#pragma unroll
    for (int i = 0; i < TM; i += 2) *reinterpret_cast<float2*>(&a[i]) = *reinterpret_cast<const float2*>(&sm.a[k][tm + i]);
    *reinterpret_cast<float4*>(&w[0]) = *reinterpret_cast<const float4*>(&sm.w[k][tn]);
    *reinterpret_cast<float4*>(&w[RUN]) = *reinterpret_cast<const float4*>(&sm.w[k][tn + BN / 2]);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
  }
}

}  // namespace

// C[M, N] = A[M, K] @ dequant(qweight, scales); grid (ceil(N / 128), ceil(M / BM)), 128 threads.
// group_shift: log2 of the rows per scale group (for one group per column, any shift with
// 2**shift >= K). Needs K % 8 == 0 and N % 4 == 0 (whole 16-byte vectors).
extern "C" __global__ void __launch_bounds__(THREADS)
    s2_smem_tiling(const half* __restrict__ A, const uint4* __restrict__ qweight, const half* __restrict__ scales,
                   half* __restrict__ C, int M, int K, int N, int group_shift) {
  __shared__ __align__(16) Shared sm;
  const int m0 = blockIdx.y * BM;
  const int n0 = blockIdx.x * BN;
  const int tm = threadIdx.x / THREADS_N * TM;
  const int tn = threadIdx.x % THREADS_N * RUN;

  float acc[TM][TN] = {};
  Slice slice;
  load_slice(slice, A, qweight, scales, M, K, N, group_shift, m0, n0, 0);
  for (int k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // everyone is done reading the previous slice
    store_slice(slice, sm);
    // The next slice's loads go out now and stay in flight while this one is used.
    if (k0 + BK < K) load_slice(slice, A, qweight, scales, M, K, N, group_shift, m0, n0, k0 + BK);
    __syncthreads();
    fma_slice(acc, sm, tm, tn);
  }

  // Each thread writes its rows as runs of four fp16 values (8-byte stores).
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int m = m0 + tm + i;
    if (m >= M) break;
#pragma unroll
    for (int r = 0; r < TN / RUN; ++r) {
      const int n = n0 + tn + r * (BN / 2);
      if (n >= N) continue;
      const half2 lo = __floats2half2_rn(acc[i][r * RUN + 0], acc[i][r * RUN + 1]);
      const half2 hi = __floats2half2_rn(acc[i][r * RUN + 2], acc[i][r * RUN + 3]);
      *reinterpret_cast<uint2*>(C + static_cast<long long>(m) * N + n) = make_uint2(half2_bits(lo), half2_bits(hi));
    }
  }
}
