// Rung 3: the multiply-adds move onto the fp16 tensor cores.
//
// Rung 2 spent almost all of its time in fp32 FMAs and the shared-memory loads that feed
// them. A tensor core instruction, mma.sync m16n8k16, does a 16x8x16 product (2048 FMAs) per
// warp in one go, so the arithmetic all but disappears and what is left is moving bytes. The
// tiles travel as in rung 2 (coalesced 16-byte loads into registers, the next K slice in
// flight while the current one is used, weights dequantized once into shared memory), but
// shared memory now holds fp16, and ldmatrix lifts whole 8x8 fp16 blocks from it straight
// into the register layout mma expects. Accumulation stays fp32. With the FMAs gone the
// slices can be long (256 rows of K for a 16-row tile), so a block keeps 8-16 KB of weights
// in flight, and the kernel starts to look like what it should be: a weight stream. What it
// still pays for is converting each 4-bit code to fp16 one at a time (rung 4's lop3 trick
// removes that) and waiting for each slice in turn (rung 5's cp.async pipeline hides that).
#include "common.cuh"

// m16 tiles of A per block (1, 2 or 4: 16, 32 or 64 rows) and columns per block (64 or 128).
#ifndef S3_M_TILES
#define S3_M_TILES 1
#endif
#ifndef S3_BN
#define S3_BN 64
#endif

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int M_TILES = S3_M_TILES;
constexpr int BM = 16 * M_TILES;
constexpr int BN = S3_BN;
// Longer slices keep more weight bytes in flight; taller tiles shorten them so the registers
// holding the next slice of A stay the same (four 16-byte vectors per thread).
constexpr int BK = 256 / M_TILES;
// Each warp owns all BM rows and a WARP_N wide strip of the block's columns.
constexpr int WARP_N = BN / WARPS;
constexpr int N_TILES = WARP_N / 8;
static_assert(M_TILES == 1 || M_TILES == 2 || M_TILES == 4, "S3_M_TILES must be 1, 2 or 4");
static_assert(BN == 64 || BN == 128, "S3_BN must be 64 or 128");

// Rows of shared memory are padded by 16 bytes: the eight 16-byte rows one ldmatrix matrix
// reads then start in eight different bank groups instead of all in the same one.
constexpr int A_STRIDE = BK + 8;
constexpr int W_STRIDE = BN + 8;
constexpr int SMEM_HALVES = BM * A_STRIDE + BK * W_STRIDE;
static_assert(SMEM_HALVES * 2 <= 227 * 1024, "the tiles must fit in one SM's shared memory");
// The host sizes the launch itself (steps/s3_tensor_cores.py, shared_bytes) and passes its
// figures in; they must be this kernel's.
#if defined(LAUNCH_THREADS) && defined(LAUNCH_SMEM_BYTES)
static_assert(LAUNCH_THREADS == THREADS && LAUNCH_SMEM_BYTES == 2 * SMEM_HALVES, "the host's launch figures are not the kernel's");
#endif

constexpr int A_VECS = BM * (BK / 8) / THREADS;
constexpr int W_VECS = (BK / 8) * (BN / 4) / THREADS;
static_assert(A_VECS * THREADS == BM * (BK / 8) && W_VECS * THREADS == (BK / 8) * (BN / 4), "whole vectors per thread");

// One K slice in registers on its way from global to shared memory, as in rung 2.
struct Slice {
  uint4 a[A_VECS];
  uint4 w[W_VECS];
  uint2 s[W_VECS];
};

// Global -> registers. Rows >= M and the K and N tails load as zeros, so partial tiles feed
// the tensor cores zeros, never uninitialised shared memory.
__device__ __forceinline__ void load_slice(Slice& slice, const half* A, const uint4* qweight, const half* scales,
                                           int M, int K, int N, int group_shift, int m0, int n0, int k0) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int v = 0; v < A_VECS; ++v) {
    const int idx = threadIdx.x + v * THREADS;
    const int m = m0 + idx / (BK / 8);
    const int k = k0 + idx % (BK / 8) * 8;
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

// Registers -> shared memory, both fp16 and row-major: A as loaded, the weights dequantized
// once into a K x N tile that ldmatrix.trans turns into B fragments.
__device__ __forceinline__ void store_slice(const Slice& slice, half* sa, half* sw) {
#pragma unroll
  for (int v = 0; v < A_VECS; ++v) {
    const int idx = threadIdx.x + v * THREADS;
    *reinterpret_cast<uint4*>(sa + idx / (BK / 8) * A_STRIDE + idx % (BK / 8) * 8) = slice.a[v];
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
      const unsigned lo = half2_bits(dequant_plain_pair(w.x, w.y, i, s01));
      const unsigned hi = half2_bits(dequant_plain_pair(w.z, w.w, i, s23));
      *reinterpret_cast<uint2*>(sw + (k + i) * W_STRIDE + n) = make_uint2(lo, hi);
    }
  }
}

// acc += the warp's BM x WARP_N block of (A slice) @ (W slice), 16 rows of K at a time.
// Lane l points ldmatrix at row l % 16, column block l / 16 of a 16x16 tile: lanes 0-7 and
// 8-15 give the top and bottom 8x8 quarters of the left half, lanes 16-31 those of the right.
// For A that yields the four A registers of mma in order; for the transposed weight tile it
// yields (b0, b1) of the first 8 columns, then (b0, b1) of the next 8.
__device__ __forceinline__ void mma_slice(float (&acc)[M_TILES][N_TILES][4], const half* sa, const half* sw, int warp,
                                          int lane) {
  const half* a_row = sa + (lane % 16) * A_STRIDE + lane / 16 * 8;
  const half* w_row = sw + (lane % 16) * W_STRIDE + warp * WARP_N + lane / 16 * 8;
#pragma unroll
  for (int k = 0; k < BK; k += 16) {
    unsigned a[M_TILES][4];
#pragma unroll
    for (int i = 0; i < M_TILES; ++i) ldmatrix_x4(a[i], a_row + i * 16 * A_STRIDE + k);
#pragma unroll
    for (int j = 0; j < N_TILES; j += 2) {
      unsigned b[4];
      ldmatrix_x4_trans(b, w_row + k * W_STRIDE + j * 8);
#pragma unroll
      for (int i = 0; i < M_TILES; ++i) {
        mma_m16n8k16(acc[i][j], a[i], b[0], b[1]);
        mma_m16n8k16(acc[i][j + 1], a[i], b[2], b[3]);
      }
    }
  }
}

}  // namespace

// C[M, N] = A[M, K] @ dequant(qweight, scales); grid (ceil(N / BN), ceil(M / BM)), 128 threads,
// SMEM_HALVES * 2 bytes of dynamic shared memory. group_shift: log2 of the rows per scale
// group (for one group per column, any shift with 2**shift >= K). Needs K % 8 == 0 and
// N % 4 == 0 (whole 16-byte vectors).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    s3_tensor_cores(const half* __restrict__ A, const uint4* __restrict__ qweight, const half* __restrict__ scales,
                    half* __restrict__ C, int M, int K, int N, int group_shift) {
  extern __shared__ uint4 smem[];
  half* sa = reinterpret_cast<half*>(smem);
  half* sw = sa + BM * A_STRIDE;
  const int m0 = blockIdx.y * BM;
  const int n0 = blockIdx.x * BN;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  float acc[M_TILES][N_TILES][4] = {};
  Slice slice;
  load_slice(slice, A, qweight, scales, M, K, N, group_shift, m0, n0, 0);
  for (int k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // everyone is done reading the previous slice
    store_slice(slice, sa, sw);
    // The next slice's loads go out now and stay in flight while this one is used.
    if (k0 + BK < K) load_slice(slice, A, qweight, scales, M, K, N, group_shift, m0, n0, k0 + BK);
    __syncthreads();
    mma_slice(acc, sa, sw, warp, lane);
  }

  // The accumulator layout of mma: lane l holds columns 2*(l%4), +1 of rows l/4 and l/4 + 8.
  const int row = m0 + lane / 4;
  const int col = n0 + warp * WARP_N + lane % 4 * 2;
#pragma unroll
  for (int i = 0; i < M_TILES; ++i) {
#pragma unroll
    for (int j = 0; j < N_TILES; ++j) {
      const int n = col + j * 8;
      if (n >= N) continue;
#pragma unroll
      for (int half_tile = 0; half_tile < 2; ++half_tile) {
        const int m = row + i * 16 + half_tile * 8;
        if (m < M) {
          *reinterpret_cast<half2*>(C + static_cast<long long>(m) * N + n) =
              __floats2half2_rn(acc[i][j][2 * half_tile], acc[i][j][2 * half_tile + 1]);
        }
      }
    }
  }
}
