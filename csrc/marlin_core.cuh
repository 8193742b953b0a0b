// marlin_core.cuh: the building blocks of the MARLIN rungs (s4, s5, s6; s7 reuses the
// output-side pieces: the k-warp reduction, the striped schedule and the global reduction).
//
// The three rungs share one weight layout (reference/marlin_layout.py) and therefore one
// way of turning a lane's 128-bit word into tensor-core operands. This header holds
// those pieces, in the order the data flows: asynchronous global->shared copies (with
// and without the L2 evict-first hint), the swizzled A tile and its ldmatrix read,
// int4 -> fp16 dequantization with lop3, the mma itself, and the fold of a warp's
// fp32 accumulators into the fp16 output. Then the multi-stage pipeline that s5 and s6
// both run over a column of weight tiles (s6 only changes which tiles and what happens
// to the sums afterwards). Everything lives in namespace `marlin` so it cannot collide
// with the mma/ldmatrix helpers of common.cuh, which the earlier rungs use.
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

// ---------------------------------------------------------------------------------
// The A tile in shared memory: rows of kTileK fp16, i.e. kTileK / 8 16-byte chunks.
// ldmatrix reads 8 rows at one chunk column per phase; with rows 128 or 256 bytes apart
// they would all hit the same banks. XOR-ing the chunk column with (row mod 8) gives
// those 8 rows 8 different bank groups, for the cp.async writes (8 chunks of one row)
// as well.
// ---------------------------------------------------------------------------------
template <int ROW_CHUNKS>
__device__ __forceinline__ int a_swizzle(int row, int chunk) {
  static_assert(ROW_CHUNKS % 8 == 0, "the swizzle permutes chunks within groups of 8");
  return row * ROW_CHUNKS + (chunk ^ (row & 7));
}

// Hopper's warpgroup MMA (s6 above 16 rows, below) reads the activation tile from shared
// memory itself, in its "128-byte swizzle" layout: atoms of 8 rows x 64 fp16, 1024 bytes aligned, with the
// chunks of row r XOR-ed by r mod 8 -- a_swizzle's pattern for 128-byte rows. A wider
// tile becomes side-by-side atom columns of 64 fp16, each holding all kRows rows.
template <int kRows>
__device__ __forceinline__ int a_atom_swizzle(int row, int chunk) {
  return (chunk / 8) * (kRows * 8) + row * 8 + ((chunk % 8) ^ (row & 7));
}

// The A operand of one 16 x 16 block: lanes 0-15 point at rows 0-15 of its left 8
// columns, lanes 16-31 at the right 8; ldmatrix.x4 returns the 4 registers in exactly
// the a0..a3 order mma.m16n8k16 expects.
__device__ __forceinline__ void ldmatrix_x4(FragA& a, unsigned smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a.r[0]), "=r"(a.r[1]), "=r"(a.r[2]), "=r"(a.r[3])
               : "r"(smem));
}

// One 16-byte shared-memory load at a 32-bit shared address.
__device__ __forceinline__ int4 load_shared16(unsigned smem) {
  int4 v;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem));
  return v;
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
// Each operand is scaled by its column's scale with one __hmul2 rounding, which is
// bit for bit the reference's dequantize: E((q - 8) * s). With zero points, `zero_pair`
// holds the two columns' zero points, subtracted first (v - z is a small integer:
// exact), so the result is again one rounding: E((q - z) * s).
template <bool kZeroPoints = false, class E = Fp16>
__device__ __forceinline__ void dequantize_tile(unsigned q, unsigned scale_pair, FragB& left, FragB& right,
                                                unsigned zero_pair = 0) {
  using P = typename E::pair;
  const P s = E::as_pair(scale_pair);
  const P s_left = E::low(s), s_right = E::high(s);
  left = E::template dequantize_pairs<kZeroPoints>(q);
  right = E::template dequantize_pairs<kZeroPoints>(q >> 8);
  if (kZeroPoints) {
    const P z = E::as_pair(zero_pair);
    const P z_left = E::low(z), z_right = E::high(z);
    left.r[0] = E::bits(__hsub2(E::as_pair(left.r[0]), z_left));
    left.r[1] = E::bits(__hsub2(E::as_pair(left.r[1]), z_left));
    right.r[0] = E::bits(__hsub2(E::as_pair(right.r[0]), z_right));
    right.r[1] = E::bits(__hsub2(E::as_pair(right.r[1]), z_right));
  }
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
// Hopper's warpgroup MMA (sm_90a only): s6's arithmetic above 16 rows.
//
// mma.sync is a warp's synchronous instruction from Ampere; on an H100 it keeps the
// tensor cores busy only part of the time (docs/rungs.md, s6). wgmma is issued by a
// warpgroup of 4 warps and runs asynchronously: the warps go on dequantizing the next
// k16 step while the tensor cores multiply this one. It takes its A operand (64 x 16)
// from registers, warp w holding rows 16w..16w+15 in exactly mma.m16n8k16's A fragment,
// and B (16 x n) from shared memory through a descriptor. So the roles swap: the
// dequantized weights are A -- a lane's left and right B fragments of a 16-column tile
// are, side by side, the A fragment of those 16 columns -- and the stage's 16 * kMBlocks
// activation rows are B. wgmma j takes columns 16j..16j+15 of each of the warpgroup's 4
// strips. The accumulator comes back transposed: lane (g, c) holds columns g and g + 8
// and tokens 2c, 2c + 1 of every 8-token chunk; it lives in acc[m][j][h] (chunk 2m + h of
// wgmma j), where the k-warp and global reductions, which only add like positions, need
// no change, and fold_wgmma_into_output writes it.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// cp.async writes shared memory through the generic proxy and wgmma reads it through the
// async proxy: every thread fences its landed copies before the barrier that publishes them.
__device__ __forceinline__ void fence_async_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The descriptor of a K-major B operand in 128-byte-swizzled atoms (a_atom_swizzle) at
// shared address `smem`: the address / 16 in bits 0-13, 8-row groups 1024 bytes apart
// (bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63); the leading offset (bits 16-29)
// means nothing for this layout and is set to 1 by convention.
__device__ __forceinline__ unsigned long long wgmma_descriptor(unsigned smem) {
  return ((smem & 0x3FFFFu) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

// acc[.][j] += A (a lane's share of 64 weight columns x k16) * B (k16 x 16 * kMBlocks
// activations at `desc`). Issued, not finished: see wgmma_settle.
#define MARLIN_WGMMA_ACC(m)                                                                                      \
  "+f"(acc[m][j][0].v[0]), "+f"(acc[m][j][0].v[1]), "+f"(acc[m][j][0].v[2]), "+f"(acc[m][j][0].v[3]),           \
      "+f"(acc[m][j][1].v[0]), "+f"(acc[m][j][1].v[1]), "+f"(acc[m][j][1].v[2]), "+f"(acc[m][j][1].v[3])
#define MARLIN_WGMMA_A "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "l"(desc)
#define MARLIN_WGMMA_N32(TYPE)                                                                                   \
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE                                      \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},"                        \
               " {%16, %17, %18, %19}, %20, 1, 1, 1, 0;\n"                                                        \
               : MARLIN_WGMMA_ACC(0), MARLIN_WGMMA_ACC(1)                                                         \
               : MARLIN_WGMMA_A)
#define MARLIN_WGMMA_N48(TYPE)                                                                                   \
  asm volatile("wgmma.mma_async.sync.aligned.m64n48k16.f32." TYPE "." TYPE                                      \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                         \
               " %16, %17, %18, %19, %20, %21, %22, %23}, {%24, %25, %26, %27}, %28, 1, 1, 1, 0;\n"              \
               : MARLIN_WGMMA_ACC(0), MARLIN_WGMMA_ACC(1), MARLIN_WGMMA_ACC(2)                                    \
               : MARLIN_WGMMA_A)
#define MARLIN_WGMMA_N64(TYPE)                                                                                   \
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                                      \
               " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                         \
               " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},"               \
               " {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"                                                        \
               : MARLIN_WGMMA_ACC(0), MARLIN_WGMMA_ACC(1), MARLIN_WGMMA_ACC(2), MARLIN_WGMMA_ACC(3)               \
               : MARLIN_WGMMA_A)

template <int kMBlocks, class E>
__device__ __forceinline__ void wgmma_k16(FragC (&acc)[kMBlocks][4][2], int j, const FragA& a,
                                          unsigned long long desc) {
  static_assert(kMBlocks >= 2 && kMBlocks <= 4, "wgmma serves slabs of 32, 48 or 64 rows");
  if constexpr (kMBlocks == 2) {
    if constexpr (E::IS_BF16) MARLIN_WGMMA_N32("bf16"); else MARLIN_WGMMA_N32("f16");
  } else if constexpr (kMBlocks == 3) {
    if constexpr (E::IS_BF16) MARLIN_WGMMA_N48("bf16"); else MARLIN_WGMMA_N48("f16");
  } else {
    if constexpr (E::IS_BF16) MARLIN_WGMMA_N64("bf16"); else MARLIN_WGMMA_N64("f16");
  }
}
#undef MARLIN_WGMMA_N32
#undef MARLIN_WGMMA_N48
#undef MARLIN_WGMMA_N64
#undef MARLIN_WGMMA_A
#undef MARLIN_WGMMA_ACC

// One lane's contribution for one k16 step of its warpgroup: dequantize the four tiles of
// its weight word into wgmma A operands, then issue the four wgmmas as one group.
template <int kMBlocks, bool kZeroPoints, class E>
__device__ __forceinline__ void multiply_k16_wgmma(const int4& w, const int4& s, const int4& z,
                                                   unsigned long long desc, FragC (&acc)[kMBlocks][4][2]) {
  const unsigned words[4] = {unsigned(w.x), unsigned(w.y), unsigned(w.z), unsigned(w.w)};
  const unsigned scales[4] = {unsigned(s.x), unsigned(s.y), unsigned(s.z), unsigned(s.w)};
  const unsigned zeros[4] = {unsigned(z.x), unsigned(z.y), unsigned(z.z), unsigned(z.w)};
  FragA a[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    FragB left, right;
    dequantize_tile<kZeroPoints, E>(words[j], scales[j], left, right, zeros[j]);
    a[j] = FragA{{left.r[0], right.r[0], left.r[1], right.r[1]}};
  }
  // wgmma.fence orders the ordinary writes of the A registers (and of acc, when zeroed)
  // before the wgmmas that read them; the empty asm keeps the compiler from moving those
  // writes below it.
  for_each_accumulator(acc, [](float& x) { asm volatile("" : "+f"(x)::"memory"); });
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[j].r[i])::"memory");
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < 4; ++j) wgmma_k16<kMBlocks, E>(acc, j, a[j], desc);
  wgmma_commit();
}

// Wait for every wgmma in flight; only then may the accumulators be read. The empty asm
// per register keeps the compiler from moving a read of acc above the wait.
template <int kMBlocks>
__device__ __forceinline__ void wgmma_settle(FragC (&acc)[kMBlocks][4][2]) {
  wgmma_wait<0>();
  for_each_accumulator(acc, [](float& x) { asm volatile("" : "+f"(x)::"memory"); });
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

// The same for the transposed accumulator of the wgmma path: (m, j, h) holds tokens
// 16m + 8h + 2c and +1, columns 16j + g and 16j + g + 8 of the strip. Neighbouring lanes
// g and g ^ 1 swap one value each, so that every lane holds two adjacent columns of one
// token and again writes pairs: even g the token 2c, odd g the token 2c + 1.
template <int kMBlocks, class E = Fp16>
__device__ __forceinline__ void fold_wgmma_into_output(const FragC (&acc)[kMBlocks][4][2],
                                                       typename E::scalar* __restrict__ C, int ldc, int rows_valid,
                                                       int strip_col) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const bool odd = g & 1;
#pragma unroll
  for (int m = 0; m < kMBlocks; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * m + 8 * h + 2 * c + odd;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float first = acc[m][j][h].v[2 * r], second = acc[m][j][h].v[2 * r + 1];  // tokens 2c, 2c + 1
          const float theirs = __shfl_xor_sync(0xffffffffu, odd ? first : second, 4);
          const typename E::pair pair = odd ? E::round(theirs, second) : E::round(first, theirs);
          if (row < rows_valid)
            *reinterpret_cast<typename E::pair*>(C + size_t(row) * ldc + strip_col + 16 * j + 8 * r + (g & ~1)) =
                pair;
        }
    }
}

// The K_WARPS warps of a strip hold partial sums over different k-steps; add them in a
// fixed order into the warp with k_warp == 0, one m-block at a time through the (idle by
// then) stage buffers `red`, which must hold (K_WARPS - 1) * N_STRIPS * 32 * 32 floats.
// Stores are [warp][value][lane]: conflict-free.
template <int kMBlocks, int kNStrips, int kKWarps>
__device__ __forceinline__ void reduce_k_warp_partials(FragC (&acc)[kMBlocks][4][2], float* red, int k_warp,
                                                       int strip) {
  if (kKWarps == 1) return;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kMBlocks; ++m) {
    if (k_warp > 0) {
      float* mine = red + ((k_warp - 1) * kNStrips + strip) * 32 * 32 + lane;
#pragma unroll
      for (int v = 0; v < 32; ++v) mine[32 * v] = acc[m][v / 8][(v / 4) % 2].v[v % 4];
    }
    __syncthreads();
    if (k_warp == 0) {
#pragma unroll
      for (int kw = 1; kw < kKWarps; ++kw) {
        const float* theirs = red + ((kw - 1) * kNStrips + strip) * 32 * 32 + lane;
#pragma unroll
        for (int v = 0; v < 32; ++v) acc[m][v / 8][(v / 4) % 2].v[v % 4] += theirs[32 * v];
      }
    }
    __syncthreads();
  }
}

// The A operand's share of a pipeline stage, for the dense (s5, s6) and sparse (s7)
// pipelines alike: 16 * kMBlocks rows of kTileK fp16, copied by the block's threads 16
// bytes each into the swizzled layout ldmatrix reads (kAtoms: the one wgmma reads), rows
// past the batch zero-filled.
template <int kMBlocks, int kTileK, int kThreads, bool kAtoms = false>
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
      const int swizzled = kAtoms ? a_atom_swizzle<16 * kMBlocks>(row, chunk % ROW_CHUNKS)
                                  : a_swizzle<ROW_CHUNKS>(row, chunk % ROW_CHUNKS);
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
// after that barrier (s7 above two m-blocks) or running asynchronously (wgmma) -- the slot
// is free only past this barrier: the barrier comes first and the copies after it, one
// tile less being in flight at the wait. For an async-proxy reader (wgmma) each thread
// fences its landed copies before the barrier that publishes them.
template <int kStages, bool kSlotFree, bool kAsyncProxyReader, class Fetch>
__device__ __forceinline__ void refill_and_publish(Fetch fetch) {
  if constexpr (kSlotFree) {
    fetch();
    cp_async_wait<kStages - 2>();
  } else {
    cp_async_wait<kStages - 3>();
  }
  if constexpr (kAsyncProxyReader) fence_async_proxy();
  __syncthreads();
  if constexpr (!kSlotFree) fetch();
}

// Where a pipeline's next fetch comes from, for the dense and sparse pipelines alike: the
// next tile of a block's run [t, end), numbered t = (slab * n_tiles + col) * k_tiles +
// k_tile, and the A rows of its slab. When `left` reaches 0 the run enters a new column
// slice: enter_slice(t) moves A to the slice's slab and returns the column, at which the
// pipeline points its own streams.
template <int kMBlocks, int kTileK, int kTileN, int kThreads, bool kAtoms = false>
struct RunCursor {
  static constexpr int SLAB_ROWS = 16 * kMBlocks;

  const int4* A;
  int M, k_tiles, n_tiles;
  int t, end;  // the next tile to fetch, the run's end
  int left;    // tiles of the current slice still to fetch
  int k_tile;  // k-tile (within its slice) of the next fetch, for the scale rows
  ATileCopy<kMBlocks, kTileK, kThreads, kAtoms> a_tile;

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
    left = 0;
  }

  __device__ __forceinline__ int enter_slice(int t_) {
    const int slice = t_ / k_tiles, slab = slice / n_tiles, col = slice - slab * n_tiles;
    k_tile = t_ - slice * k_tiles;
    left = min(k_tiles - k_tile, end - t_);
    a_tile.begin(A + size_t(slab) * SLAB_ROWS * a_tile.stride, min(SLAB_ROWS, M - slab * SLAB_ROWS), k_tile);
    return col;
  }

  // Count the tile just fetched; its streams (a_tile included) advance themselves.
  __device__ __forceinline__ void advance() {
    ++k_tile;
    ++t;
    --left;
  }
};

// ---------------------------------------------------------------------------------
// The multi-stage pipeline of s5 and s6 over a block's run of weight tiles.
//
// A block of 8 warps computes a 16*kMBlocks x kTileN output tile, kTileK rows of K per
// pipeline stage. kTileN / 64 warps lie side by side along N (one 64-column strip each);
// the other factor, K_WARPS, splits each stage's kTileK / 16 k16 steps between warps, so
// every warp has work even when kTileN is small, and the block's partial sums are added
// in shared memory at the end of a column (reduce_across_k_warps).
//
// Tiles are numbered t = (slab * n_tiles + col) * k_tiles + k_tile, as in the striped
// schedule below. start(t0, t1) primes the pipeline with the first tiles of the run
// [t0, t1); consume(acc, n) multiplies the next n tiles into acc. The fetches run ahead
// of the consumer along the whole run, across column slices: when a block finishes one
// slice and reduces it, the first tiles of its next slice are already on their way, so
// the weight stream has no gap at a slice switch. (s5's run is one column; s6's crosses
// slices, and kOwnReduceBuffer gives the k-warp reduction shared memory of its own so it
// cannot collide with those tiles in flight.)
//
// Stage layout in shared memory (16-byte units): A tile | weights | scales | zero points
// (only with kZeroPoints: permuted like the scales, one per group and column); scales and
// zero points are of the element type E, fp16 or bf16, like A and the output. Thread t
// copies weight chunks t, t + 256, ... of a stage and -- because chunk index =
// 256 * substep + 32 * warp + lane is exactly what the consuming lane needs -- later
// reads back the very chunks it copied. Only A is truly shared between warps.
// ---------------------------------------------------------------------------------
template <int kMBlocks, int kTileN, int kTileK, int kStages, int kGroupRows, bool kEvictFirst, bool kOwnReduceBuffer,
          bool kZeroPoints, class E = Fp16, bool kWgmma = false>
struct Pipeline {
  static constexpr int THREADS = 256;
  static constexpr int TILE_N_COLS = kTileN, TILE_K_ROWS = kTileK, SLAB_ROWS = 16 * kMBlocks;
  static constexpr int N_STRIPS = kTileN / 64;
  static constexpr int K_WARPS = 8 / N_STRIPS;
  static constexpr int K16_STEPS = kTileK / 16;
  static constexpr int SUBSTEPS = K16_STEPS / K_WARPS;  // k16 steps per warp per stage
  static_assert(kTileN % 64 == 0 && 8 % N_STRIPS == 0, "kTileN must be 64, 128, 256 or 512");
  static_assert(SUBSTEPS >= 2 && SUBSTEPS % 2 == 0, "fragment double buffering needs an even number of substeps");
  static_assert(kStages >= 3, "the pipeline keeps kStages - 1 tiles in flight while one is consumed");
  static_assert(kGroupRows == 0 || kGroupRows % 16 == 0, "groups are whole k16 steps");
  static_assert(kGroupRows == 0 || kGroupRows >= kTileK ? kGroupRows % kTileK == 0 : kTileK % kGroupRows == 0,
                "a group must hold whole tiles or a tile whole groups");

  // kWgmma: the warpgroup MMA (above, s6 on Hopper). Warpgroup = k_warp needs 4 strips, and
  // the refill at substep SUBSTEPS - 2 must come after substep 0's wait: at least 3 substeps.
  static_assert(!kWgmma || (N_STRIPS == 4 && SUBSTEPS >= 3 && kMBlocks >= 2),
                "the wgmma pipeline takes TILE_N = 256, TILE_K >= 128 and 2-4 m-blocks");

  using ATile = ATileCopy<kMBlocks, kTileK, THREADS, kWgmma>;
  static constexpr int A_ROW_CHUNKS = ATile::ROW_CHUNKS;
  static constexpr int A_CHUNKS = ATile::CHUNKS;
  static constexpr int B_CHUNKS = K16_STEPS * kTileN / 2;  // 16 rows x kTileN codes / 32 per chunk
  static constexpr int B_COPIES = B_CHUNKS / THREADS;      // == SUBSTEPS
  // kGroupRows == 0 means one scale per column (group size -1): every tile uses row 0.
  static constexpr int S_ROWS = (kGroupRows == 0 || kGroupRows >= kTileK) ? 1 : kTileK / kGroupRows;
  static constexpr int S_ROW_CHUNKS = kTileN / 8;
  static constexpr int S_CHUNKS = S_ROWS * S_ROW_CHUNKS;
  static_assert(S_CHUNKS <= THREADS, "one scale chunk per thread at most");
  static constexpr int Z_CHUNKS = kZeroPoints ? S_CHUNKS : 0;
  // wgmma's activation atoms must start 1024 bytes aligned: stages are whole KB, and the
  // shared memory gets a KB of slack to align its start (init).
  static constexpr int STAGE_CHUNKS = kWgmma ? (A_CHUNKS + B_CHUNKS + S_CHUNKS + Z_CHUNKS + 63) / 64 * 64
                                             : A_CHUNKS + B_CHUNKS + S_CHUNKS + Z_CHUNKS;
  static constexpr int ALIGN_SLACK = kWgmma ? 1024 : 0;
  // The in-block reduction: (K_WARPS - 1) warps per strip store 32 floats per lane for one
  // m-block at a time, after the stages or over them (then only once they are idle).
  static constexpr int REDUCE_CHUNKS = (K_WARPS - 1) * N_STRIPS * 32 * 32 / 4;
  static constexpr int REDUCE_OFFSET = kOwnReduceBuffer ? kStages * STAGE_CHUNKS : 0;
  static constexpr int SMEM_BYTES =
      ALIGN_SLACK + 16 * (kOwnReduceBuffer ? kStages * STAGE_CHUNKS + REDUCE_CHUNKS
                                           : (kStages * STAGE_CHUNKS > REDUCE_CHUNKS ? kStages * STAGE_CHUNKS
                                                                                     : REDUCE_CHUNKS));
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
  unsigned b_read;  // kWgmma: the shared address of this warpgroup's first k16 step of stage 0
  int warp, lane, k_warp, strip;
  const int4 *B, *S, *Z;
  RunCursor<kMBlocks, kTileK, kTileN, THREADS, kWgmma> next;  // the fetch side
  FillCursor<kStages, STAGE_CHUNKS> fill;
  const int4* b_next;  // this thread's first weight chunk of the next tile
  const int4* s_base;  // this thread's scale chunk in group row 0 of the slice
  const int4* z_base;  // and its zero-point chunk (kZeroPoints)
  int b_stride, s_stride;  // 16-byte units per k16 row of W, per group row (of S and Z)
  int read_slot;     // the stage the consumer reads next
  unsigned long long policy;

  __device__ __forceinline__ void init(int4* smem_, const int4* A_, const int4* B_, const int4* S_, const int4* Z_,
                                       int M_, int K, int N) {
    smem = kWgmma ? smem_ + ((1024u - (smem_address(smem_) & 1023u)) & 1023u) / 16 : smem_;
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    k_warp = warp / N_STRIPS;
    strip = warp % N_STRIPS;
#pragma unroll
    for (int p = 0; p < A_PHASES; ++p)
      a_read[p] = smem_address(&smem[a_swizzle<A_ROW_CHUNKS>(lane % 16, A_STEP * p + 2 * k_warp + lane / 16)]);
    w_read = smem_address(&smem[A_CHUNKS + threadIdx.x]);
    b_read = smem_address(smem) + 32 * k_warp;
    s_read = smem_address(&smem[A_CHUNKS + B_CHUNKS + 8 * strip + lane / 4]);
    next.init(A_, M_, K, N);
    B = B_;
    S = S_;
    Z = Z_;
    b_stride = N / 2;
    s_stride = N / 8;
    policy = kEvictFirst ? make_evict_first_policy() : 0ull;
  }

  // Point the fetches at tile t, the first of a column slice or of the run.
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

  // Issue the copies of the next tile of the run into the next slot of the ring (nothing
  // past the run's end), and always commit a group, so "wait until at most kStages-2
  // groups are pending" keeps meaning "the tile consumed next has landed". Destinations
  // are offsets from the fill cursor, sources pointers stepped along: this runs once per
  // tile, inside the loop.
  __device__ __forceinline__ void fetch() {
    if (next.t < next.end) {
      if (next.left == 0) point_at(next.t);
      const int t = threadIdx.x;
      next.a_tile.copy(fill.here);
      const int4* src = b_next;
#pragma unroll
      for (int i = 0; i < B_COPIES; ++i) {
        const unsigned b = fill.here + 16 * (A_CHUNKS + THREADS * i);
        if (kEvictFirst)
          cp_async16_evict_first(b, src, policy);
        else
          cp_async16(b, src);
        src += size_t(THREADS / (kTileN / 2)) * b_stride;  // k16 rows per copy round
      }
      if (t < S_CHUNKS) {
        // Scales are small and re-read by the next tiles of the same group: no hint.
        const size_t group_offset = size_t(kGroupRows == 0 ? 0 : (next.k_tile * kTileK) / kGroupRows) * s_stride;
        const unsigned s_dst = fill.here + 16 * (A_CHUNKS + B_CHUNKS);
        cp_async16(s_dst, s_base + group_offset);
        if (kZeroPoints) cp_async16(s_dst + 16 * S_CHUNKS, z_base + group_offset);
      }
      next.a_tile.advance();
      b_next += size_t(K16_STEPS) * b_stride;
      next.advance();
    }
    cp_async_commit();
    fill.advance();
  }

  // Prime the pipeline with the first kStages - 1 tiles of the run [t_begin, t_end).
  __device__ __forceinline__ void start(int t_begin, int t_end) {
    next.start(t_begin, t_end);
    fill.start(smem);
#pragma unroll 1
    for (int i = 0; i < kStages - 1; ++i) fetch();
    cp_async_wait<kStages - 2>();
    if constexpr (kWgmma) fence_async_proxy();
    __syncthreads();
    read_slot = 0;
  }

  __device__ __forceinline__ unsigned stage_offset(int slot) const { return 16u * slot * STAGE_CHUNKS; }

  // Registers for one substep: the warp's k16 step of the stage at byte offset `stage`,
  // its A blocks, its 128-bit weight word and the 128-bit words of scales (and zero
  // points) of that step's group. Loaded a substep ahead, so every read of a slot precedes
  // the barrier after which the slot is refilled.
  __device__ __forceinline__ void load_fragments(unsigned stage, int substep, FragA (&a)[kMBlocks], int4& w, int4& s,
                                                 int4& z) const {
    if constexpr (!kWgmma) {  // wgmma reads the activations from shared memory itself
      const unsigned a_row = a_read[substep % A_PHASES] + stage + 16 * ((A_STEP * substep) & ~7);
#pragma unroll
      for (int m = 0; m < kMBlocks; ++m) ldmatrix_x4(a[m], a_row + 16 * 16 * m * A_ROW_CHUNKS);
    }
    w = load_shared16(w_read + stage + 16 * THREADS * substep);
    const int s_row = S_ROWS == 1 ? 0 : (16 * (k_warp + K_WARPS * substep)) / kGroupRows;
    const unsigned s_addr = s_read + stage + 16 * S_ROW_CHUNKS * s_row;
    s = load_shared16(s_addr);
    if (kZeroPoints) z = load_shared16(s_addr + 16 * S_CHUNKS);
  }

  // Multiply the next `tiles` tiles of the run into acc (zeroed here). The fetches go on
  // past them: nothing is drained.
  __device__ __forceinline__ void consume(FragC (&acc)[kMBlocks][4][2], int tiles) {
    FragA a[2][kMBlocks];
    int4 w[2], s[2], z[2];
    zero_accumulators<kMBlocks>(acc);
    load_fragments(stage_offset(read_slot), 0, a[0], w[0], s[0], z[0]);
    for (int tile = 0; tile < tiles; ++tile) {
      const int slot = read_slot;
      const unsigned stage = stage_offset(slot);
      read_slot = slot + 1 == kStages ? 0 : slot + 1;
#pragma unroll
      for (int sub = 0; sub < SUBSTEPS; ++sub) {
        // Double-buffered fragments: load substep sub+1 while sub multiplies.
        const int next = (sub + 1) % 2;
        if (sub + 1 < SUBSTEPS) load_fragments(stage, sub + 1, a[next], w[next], s[next], z[next]);
        // A wgmma warpgroup is done with the slot to refill once it has waited for that tile's
        // last group, which it has by here (its wait after this tile's substep 0).
        if (sub == SUBSTEPS - 2) refill_and_publish<kStages, !kWgmma, kWgmma>([&] { fetch(); });
        if (sub == SUBSTEPS - 1) load_fragments(stage_offset(read_slot), 0, a[0], w[0], s[0], z[0]);
        if constexpr (kWgmma) {
          multiply_k16_wgmma<kMBlocks, kZeroPoints, E>(w[sub % 2], s[sub % 2], z[sub % 2],
                                                       wgmma_descriptor(b_read + stage + b_step_offset(sub)), acc);
          wgmma_wait<1>();  // the previous substep's group is done: its A registers are free again
        } else {
          multiply_k16<kMBlocks, kZeroPoints, E>(a[sub % 2], w[sub % 2], s[sub % 2], acc, z[sub % 2]);
        }
      }
    }
    if constexpr (kWgmma) wgmma_settle<kMBlocks>(acc);
  }

  // Where this warpgroup's k16 step of substep `sub` starts in the stage's activation atoms
  // (k16 step K_WARPS * sub + k_warp; b_read holds the k_warp part).
  static __device__ __forceinline__ unsigned b_step_offset(int sub) {
    static_assert(!kWgmma || K_WARPS == 2, "two warpgroups split the k16 steps");
    return (sub / 2) * SLAB_ROWS * 128 + (sub % 2) * 64;
  }

  __device__ __forceinline__ void reduce_across_k_warps(FragC (&acc)[kMBlocks][4][2]) {
    if (!kOwnReduceBuffer) __syncthreads();  // every warp is done reading the stages it will overwrite
    reduce_k_warp_partials<kMBlocks, N_STRIPS, K_WARPS>(acc, reinterpret_cast<float*>(smem + REDUCE_OFFSET), k_warp,
                                                        strip);
  }
};

// ---------------------------------------------------------------------------------
// The SM-striped schedule of s6 and s7 (reference/marlin_layout.py: striped_schedule).
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

// The global reduction of a shared column slice, without waiting: every contributor
// stores its fp32 partial sums in its slot and counts itself in the slice's counter; the
// one that arrives last adds all partials in ascending block order (a fixed order, so
// results are bit-identical run to run), resets the counter (the workspace stays zeroed
// for the next launch) and writes the output. No block ever spins, and the blocks'
// stores, fences and counts overlap; what stays serial is the last block's read of every
// contributor's partials (up to MAX_SLICE_BLOCKS of them, by its k_warp 0 warps only),
// which grows with the tile: 8 KB per partial for 16 x 128, 64 KB for 64 x 256.
// Returns whether this block writes the slice; then the k_warp 0 warps hold the sum.
// A partial is stored [strip][m][value][lane]: 128-byte coalesced rows per warp.
template <int kMBlocks, int kStrips>
__device__ __forceinline__ bool add_partial_sums(FragC (&acc)[kMBlocks][4][2], float* __restrict__ partials,
                                                 int* counter, const StripeSegment& s, int iters, int k_tiles,
                                                 int strip, int k_warp) {
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
  __syncthreads();
  int arrived = 0;
  if (threadIdx.x == 0)
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(arrived) : "l"(counter) : "memory");
  const bool is_last = threadIdx.x == 0 && arrived == s.contributors - 1;
  if (is_last) asm volatile("st.relaxed.gpu.global.b32 [%0], %1;\n" ::"l"(counter), "r"(0) : "memory");
  if (!__syncthreads_or(is_last)) return false;
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

// The striped walk shared by s6 and s7, for a pipeline set up with init(): prime it with
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
