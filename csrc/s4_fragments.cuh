// s4_fragments.cuh -- rung 4's idea: weights go from global memory straight into the
// registers that feed the tensor cores, and are dequantized there with a few bit tricks.
//
// Everything the MARLIN rungs (s4, s5, s6, and s7 for its output side) do *per weight*
// lives here; how the weights reach a lane (plain loads in s4, a cp.async ring in s5, a
// striped run in s6) is the business of the later headers.
//
// The layout (reference/marlin_layout.py builds it offline, once). mma.m16n8k16 wants its
// B operand spread over the 32 lanes of a warp: lane 4g + c holds rows 2c, 2c+1, 2c+8,
// 2c+9 of column g. A warp owns a 64-column strip of W, four 16 x 16 tiles j = 0..3, so a
// lane needs 8 codes of each tile per k16 row -- 32 bits per tile, 128 bits in all:
//
//     one k16 row of W, a warp's strip (64 columns)         lane 4g + c's 128-bit load
//     +---------+---------+---------+---------+             +--------+--------+--------+--------+
//     | tile 0  | tile 1  | tile 2  | tile 3  |  16 rows    | word 0 | word 1 | word 2 | word 3 |
//     | 16 cols | 16 cols | 16 cols | 16 cols |             | tile 0 | tile 1 | tile 2 | tile 3 |
//     +---------+---------+---------+---------+             +--------+--------+--------+--------+
//                                                            word j, nibble n = 0..7 (bits 4n..4n+3):
//       rows 2c, 2c+1, 2c+8, 2c+9 of column g (left 8)       n = 0, 4 | 1, 5 -> left half's b0, b1
//       and of column g + 8 (right 8) of each tile           n = 2, 6 | 3, 7 -> right half's b0, b1
//
// so one 128-bit load per lane and k16 row is the whole B side of 8 mmas, and the lanes of a
// warp read 512 contiguous bytes: perfectly coalesced, never staged through shared memory.
// The scales are permuted the same way (one 128-bit load gives a lane the 8 scales of its
// columns), and the nibble order is the one in which lop3 with the 0x6400 "magic number"
// turns each 32-bit word into fp16 pairs in fragment order (Fp16::dequantize_pairs below):
// about two instructions per pair of weights instead of shifts, masks and conversions.
//
// Kept in namespace `marlin` so it cannot collide with the mma/ldmatrix helpers of
// common.cuh, which the earlier rungs use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace marlin {

// One m16n8k16 operand set per lane: A is 8 fp16 (4 registers), B is 4 fp16 (2
// registers), the fp32 accumulator 4 floats. Kept as plain register arrays; every index
// into them is a compile-time constant after unrolling, so they never touch local memory.
struct FragA { unsigned r[4]; };
struct FragB { unsigned r[2]; };
struct FragC { float v[4]; };

__device__ __forceinline__ unsigned smem_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------------
// The A tile in shared memory: rows of kTileK fp16, i.e. kTileK / 8 16-byte chunks.
// ldmatrix reads 8 rows at one chunk column per phase; with rows 128 or 256 bytes apart
// they would all hit the same banks. XOR-ing the chunk column with (row mod 8) gives
// those 8 rows 8 different bank groups, for the writes (8 chunks of one row) as well.
//
//     chunk:   0  1  2  3  4  5  6  7        row r stores its chunk c at column c ^ (r % 8):
//     row 0:   0  1  2  3  4  5  6  7        the 8 rows of one ldmatrix phase (same c) land
//     row 1:   1  0  3  2  5  4  7  6        in 8 different columns, i.e. 8 different
//     row 2:   2  3  0  1  6  7  4  5        bank groups
// ---------------------------------------------------------------------------------
template <int ROW_CHUNKS>
__device__ __forceinline__ int a_swizzle(int row, int chunk) {
  static_assert(ROW_CHUNKS % 8 == 0, "the swizzle permutes chunks within groups of 8");
  return row * ROW_CHUNKS + (chunk ^ (row & 7));
}

// The A operand of one 16 x 16 block: lanes 0-15 point at rows 0-15 of its left 8
// columns, lanes 16-31 at the right 8; ldmatrix.x4 returns the 4 registers in exactly
// the a0..a3 order mma.m16n8k16 expects.
__device__ __forceinline__ void ldmatrix_x4(FragA& a, unsigned smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a.r[0]), "=r"(a.r[1]), "=r"(a.r[2]), "=r"(a.r[3])
               : "r"(smem));
}

// Two 8x8 matrices, addressed by lanes 0-7 and 8-15: half of ldmatrix_x4's shared-memory
// reads where only one m16n8k16 B operand (or half an A) is wanted.
__device__ __forceinline__ void ldmatrix_x2(FragB& b, unsigned smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b.r[0]), "=r"(b.r[1]) : "r"(smem));
}

// ---------------------------------------------------------------------------------
// int4 -> fp16 or bf16: a few instructions per 4 weights (reference/marlin_layout.py models them).
// ---------------------------------------------------------------------------------
template <int LUT>
__device__ __forceinline__ unsigned lop3(unsigned a, unsigned b, unsigned c) {
  unsigned d;
  asm volatile("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
}

// ---------------------------------------------------------------------------------
// The element type: fp16 or bf16 activations, scales, zero points and output. The
// weight layout, the copies, ldmatrix and the fp32 accumulators do not care; what
// differs is the magic-number dequantization, the mma instruction and the final
// rounding. Each type is a struct of those few operations, and the templates below
// take it as a parameter (fp16 by default, so rungs without a bf16 path are unchanged).
// ---------------------------------------------------------------------------------

// lop3's truth table for (a & b) | c, over the operand tables a=F0, b=CC, c=AA.
constexpr int AND_OR = (0xF0 & 0xCC) | 0xAA;

// c += a * b on the tensor cores, fp32 accumulators; TYPE is the PTX type of a and b
// ("f16" or "bf16"), the one thing that differs between the element types' mma.
#define MMA_M16N8K16(TYPE, a, b, c)                                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                     \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                            \
               : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])                                   \
               : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]))

// A 32-bit register seen as a pair of 16-bit elements, and back.
template <class Pair>
struct PairBits {
  using pair = Pair;
  static __device__ __forceinline__ pair as_pair(unsigned u) { return *reinterpret_cast<pair*>(&u); }
  static __device__ __forceinline__ unsigned bits(pair h) { return *reinterpret_cast<unsigned*>(&h); }
};

// (q AND mask) OR 0x6400 in each fp16 half puts a nibble v into the mantissa of 1024:
// the fp16 value 1024 + v (low nibble) or 1024 + 16 v (high nibble), one lop3 each.
// Subtracting 1032, or multiplying by 1/16 and adding -72, then yields v - 8 exactly:
// the symmetric zero point costs nothing. For weights with zero points the same two
// instructions with 1024 and -64 yield v, and dequantize_tile subtracts the zero point.
struct Fp16 : PairBits<half2> {
  using scalar = half;
  static constexpr bool IS_BF16 = false;
  static __device__ __forceinline__ pair low(pair h) { return __low2half2(h); }
  static __device__ __forceinline__ pair high(pair h) { return __high2half2(h); }

  template <bool kZeroPoints>
  static __device__ __forceinline__ FragB dequantize_pairs(unsigned q) {
    constexpr unsigned OFFSET = kZeroPoints ? 0x64006400u : 0x64086408u;      // 1024 or 1032
    constexpr unsigned FMA_OFFSET = kZeroPoints ? 0xD400D400u : 0xD480D480u;  // -64 or -72
    const unsigned lo = lop3<AND_OR>(q, 0x000F000Fu, 0x64006400u);
    const unsigned hi = lop3<AND_OR>(q, 0x00F000F0u, 0x64006400u);
    FragB b;
    b.r[0] = bits(__hsub2(as_pair(lo), as_pair(OFFSET)));
    b.r[1] = bits(__hfma2(as_pair(hi), as_pair(0x2C002C00u), as_pair(FMA_OFFSET)));  // x * 1/16 + offset
    return b;
  }

  static __device__ __forceinline__ void mma(const FragA& a, const FragB& b, FragC& c) { MMA_M16N8K16("f16", a, b, c); }

  static __device__ __forceinline__ pair round(float x, float y) { return __float22half2_rn(make_float2(x, y)); }
  static __device__ __forceinline__ float2 widen(pair h) { return __half22float2(h); }
};

// bf16 has 8 exponent bits and only 7 mantissa bits, so 0x4300 (128, whose ulp is 1)
// takes the place of 0x6400: OR-ing a nibble into the low mantissa bits gives 128 + v.
// The fp16 trick for the high nibble (OR it in 4 bits up, scale by 1/16) would reach
// into the exponent here, so that nibble is shifted down first: one extra shift per
// pair, and then both halves take the same subtraction of 136 (v - 8) or 128 (v).
struct Bf16 : PairBits<__nv_bfloat162> {
  using scalar = __nv_bfloat16;
  static constexpr bool IS_BF16 = true;
  static __device__ __forceinline__ pair low(pair h) { return __low2bfloat162(h); }
  static __device__ __forceinline__ pair high(pair h) { return __high2bfloat162(h); }

  template <bool kZeroPoints>
  static __device__ __forceinline__ FragB dequantize_pairs(unsigned q) {
    constexpr unsigned OFFSET = kZeroPoints ? 0x43004300u : 0x43084308u;  // 128 or 136
    const unsigned lo = lop3<AND_OR>(q, 0x000F000Fu, 0x43004300u);
    const unsigned hi = lop3<AND_OR>(q >> 4, 0x000F000Fu, 0x43004300u);
    FragB b;
    b.r[0] = bits(__hsub2(as_pair(lo), as_pair(OFFSET)));
    b.r[1] = bits(__hsub2(as_pair(hi), as_pair(OFFSET)));
    return b;
  }

  static __device__ __forceinline__ void mma(const FragA& a, const FragB& b, FragC& c) { MMA_M16N8K16("bf16", a, b, c); }

  static __device__ __forceinline__ pair round(float x, float y) { return __float22bfloat162_rn(make_float2(x, y)); }
  static __device__ __forceinline__ float2 widen(pair h) { return __bfloat1622float2(h); }
};

// The element type a kernel is compiled for, from its 0/1 define.
template <bool kBf16>
struct ElementOf {
  using type = Fp16;
};
template <>
struct ElementOf<true> {
  using type = Bf16;
};

// A lane's 32-bit word of tile j holds both of its B operands: nibbles (0,4),(1,5) the
// left 8 columns, (2,6),(3,7) the right 8 -- reached by shifting the word right by 8.
// dequantize_codes gives the codes less their zero point, q - 8 (or q - z with zero points,
// `zero_pair` holding the two columns' z): small integers, exact in fp16 and bf16.
template <bool kZeroPoints = false, class E = Fp16>
__device__ __forceinline__ void dequantize_codes(unsigned q, FragB& left, FragB& right, unsigned zero_pair = 0) {
  left = E::template dequantize_pairs<kZeroPoints>(q);
  right = E::template dequantize_pairs<kZeroPoints>(q >> 8);
  if (kZeroPoints) {
    const typename E::pair z = E::as_pair(zero_pair);
    const typename E::pair z_left = E::low(z), z_right = E::high(z);
    left.r[0] = E::bits(__hsub2(E::as_pair(left.r[0]), z_left));
    left.r[1] = E::bits(__hsub2(E::as_pair(left.r[1]), z_left));
    right.r[0] = E::bits(__hsub2(E::as_pair(right.r[0]), z_right));
    right.r[1] = E::bits(__hsub2(E::as_pair(right.r[1]), z_right));
  }
}

// Each operand scaled by its column's scale with one __hmul2 rounding: bit for bit the
// reference's dequantize, E((q - 8) * s) or E((q - z) * s).
template <bool kZeroPoints = false, class E = Fp16>
__device__ __forceinline__ void dequantize_tile(unsigned q, unsigned scale_pair, FragB& left, FragB& right,
                                                unsigned zero_pair = 0) {
  using P = typename E::pair;
  const P s = E::as_pair(scale_pair);
  const P s_left = E::low(s), s_right = E::high(s);
  dequantize_codes<kZeroPoints, E>(q, left, right, zero_pair);
  left.r[0] = E::bits(__hmul2(E::as_pair(left.r[0]), s_left));
  left.r[1] = E::bits(__hmul2(E::as_pair(left.r[1]), s_left));
  right.r[0] = E::bits(__hmul2(E::as_pair(right.r[0]), s_right));
  right.r[1] = E::bits(__hmul2(E::as_pair(right.r[1]), s_right));
}

// One lane's whole contribution for one k16 step of its warp's 16*kMBlocks x 64 strip:
// dequantize the four tiles of its 128-bit weight word, multiply with every m-block.
// m is the inner loop so the dequantization of tile j+1 overlaps the mmas of tile j.
template <int kMBlocks, bool kZeroPoints = false, class E = Fp16>
__device__ __forceinline__ void multiply_k16(const FragA (&a)[kMBlocks], const int4& w, const int4& s,
                                             FragC (&acc)[kMBlocks][4][2], const int4& z = int4{}) {
  const unsigned words[4] = {unsigned(w.x), unsigned(w.y), unsigned(w.z), unsigned(w.w)};
  const unsigned scales[4] = {unsigned(s.x), unsigned(s.y), unsigned(s.z), unsigned(s.w)};
  const unsigned zeros[4] = {unsigned(z.x), unsigned(z.y), unsigned(z.z), unsigned(z.w)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    FragB left, right;
    dequantize_tile<kZeroPoints, E>(words[j], scales[j], left, right, zeros[j]);
#pragma unroll
    for (int m = 0; m < kMBlocks; ++m) {
      E::mma(a[m], left, acc[m][j][0]);
      E::mma(a[m], right, acc[m][j][1]);
    }
  }
}

// f(value) for each of a lane's accumulator values.
template <int kMBlocks, class F>
__device__ __forceinline__ void for_each_accumulator(FragC (&acc)[kMBlocks][4][2], F f) {
#pragma unroll
  for (int m = 0; m < kMBlocks; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(acc[m][j][h].v[e]);
}

template <int kMBlocks>
__device__ __forceinline__ void zero_accumulators(FragC (&acc)[kMBlocks][4][2]) {
  for_each_accumulator(acc, [](float& x) { x = 0.0f; });
}

// ---------------------------------------------------------------------------------
// Output: a lane's accumulator (m, j, h) holds rows 16m + g and 16m + g + 8, columns
// 16j + 8h + 2c and +1, of its warp's strip (lane = 4g + c). fold_into_output rounds
// them once to the element type and writes them as pairs. The output is small next to the weights,
// so these 4-byte stores cost little.
// ---------------------------------------------------------------------------------
template <int kMBlocks, class E = Fp16>
__device__ __forceinline__ void fold_into_output(const FragC (&acc)[kMBlocks][4][2], typename E::scalar* __restrict__ C,
                                                 int ldc, int rows_valid, int strip_col) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int m = 0; m < kMBlocks; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * m + g + 8 * r;
      if (row >= rows_valid) continue;
      typename E::pair* out = reinterpret_cast<typename E::pair*>(C + size_t(row) * ldc + strip_col + 2 * c);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          out[(16 * j + 8 * h) / 2] = E::round(acc[m][j][h].v[2 * r], acc[m][j][h].v[2 * r + 1]);
    }
}

// How the threads that add partial sums wait for each other: the whole block. A rung whose
// warps have other roles that must run on (s8) passes its own, on named barriers.
struct BlockSync {
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ bool any(bool vote) const { return __syncthreads_or(vote); }
};

// The K_WARPS warps of a strip hold partial sums over different k-steps; add them in a
// fixed order into the warp with k_warp == 0, one m-block at a time through shared memory
// `red` (idle by then), which must hold (K_WARPS - 1) * N_STRIPS * 32 * 32 floats.
// Stores are [warp][value][lane]: conflict-free.
template <int kMBlocks, int kNStrips, int kKWarps, class Sync = BlockSync>
__device__ __forceinline__ void reduce_k_warp_partials(FragC (&acc)[kMBlocks][4][2], float* red, int k_warp,
                                                       int strip, const Sync& sync = Sync{}) {
  if (kKWarps == 1) return;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kMBlocks; ++m) {
    if (k_warp > 0) {
      float* mine = red + ((k_warp - 1) * kNStrips + strip) * 32 * 32 + lane;
#pragma unroll
      for (int v = 0; v < 32; ++v) mine[32 * v] = acc[m][v / 8][(v / 4) % 2].v[v % 4];
    }
    sync.sync();
    if (k_warp == 0) {
#pragma unroll
      for (int kw = 1; kw < kKWarps; ++kw) {
        const float* theirs = red + ((kw - 1) * kNStrips + strip) * 32 * 32 + lane;
#pragma unroll
        for (int v = 0; v < 32; ++v) acc[m][v / 8][(v / 4) % 2].v[v % 4] += theirs[32 * v];
      }
    }
    sync.sync();
  }
}

}  // namespace marlin
