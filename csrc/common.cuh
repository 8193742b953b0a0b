// Device helpers shared by the CUDA rungs of the ladder. Each section is owned by the rungs
// named in its heading; a rung's own .cu file explains why it uses them. Only <cuda_fp16.h>
// is included, so every source compiles the same under NVRTC and under nvcc.
#pragma once

#include <cuda_fp16.h>

// ===========================================================================================
// Tensor cores and fp16 helpers (rungs s2, s3 and above)
// ===========================================================================================

// The plain layout stores codes q in 0..15 and symmetric weights mean w = (q - 8) * s.
constexpr int SYMMETRIC_ZERO = 8;

// A half2 as the 32 bits that tensor core operands and vector stores move, and back.
__device__ __forceinline__ unsigned half2_bits(half2 h) {
  return static_cast<unsigned>(__half_as_ushort(__low2half(h))) |
         static_cast<unsigned>(__half_as_ushort(__high2half(h))) << 16;
}
__device__ __forceinline__ half2 bits_half2(unsigned u) {
  return __halves2half2(__ushort_as_half(static_cast<unsigned short>(u & 0xFFFFu)),
                        __ushort_as_half(static_cast<unsigned short>(u >> 16)));
}

// Dequantize row i (0..7) of two neighbouring columns' packed words into fp16 pair
// (w_a, w_b) = fp16((q - 8) * s). q - 8 is a small integer, exact in fp16, and __hmul2
// rounds the product once: bit for bit the reference's dequantize().
__device__ __forceinline__ half2 dequant_plain_pair(unsigned word_a, unsigned word_b, int i, half2 scales) {
  const int qa = static_cast<int>((word_a >> (4 * i)) & 0xFu) - SYMMETRIC_ZERO;
  const int qb = static_cast<int>((word_b >> (4 * i)) & 0xFu) - SYMMETRIC_ZERO;
  return __hmul2(__halves2half2(__int2half_rn(qa), __int2half_rn(qb)), scales);
}

// ldmatrix and mma take 32-bit shared-memory addresses, not generic pointers.
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 fp16 matrices from shared memory into a warp's registers. Lanes 8j..8j+7 each
// give the address of one 16-byte row of matrix j; every lane receives, for each matrix,
// the two neighbouring elements of row lane/4 at columns 2*(lane%4), 2*(lane%4)+1, which is
// exactly how mma.m16n8k16 wants its A fragment when the matrices are the four 8x8
// quarters of a 16x16 row-major tile.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&frag)[4], const half* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(shared_address(row)));
}

// The same with each 8x8 matrix transposed on the way: a lane receives column lane/4 at rows
// 2*(lane%4), 2*(lane%4)+1. Applied to a K x N row-major tile, that is mma's "col" B
// fragment, so weights can be stored in shared memory in their natural row order.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&frag)[4], const half* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(shared_address(row)));
}

// acc (16x8 fp32) += a (16x16 fp16, row-major) @ b (16x8 fp16, column-major), one warp.
// Fragment ownership (lane = threadIdx.x % 32, r = lane/4, c = 2*(lane%4)):
//   a[0..3]: rows r, r+8, r, r+8 at columns c..c+1, c..c+1, c+8..c+9, c+8..c+9
//   b0, b1:  rows c..c+1 and c+8..c+9 of column r
//   acc:     (r, c), (r, c+1), (r+8, c), (r+8, c+1)
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (end of the tensor-core section; the sections of later rungs follow below)
