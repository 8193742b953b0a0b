// s8_hopper.cuh: Hopper's own machinery for rung 8 (sm_90a only).
//
// Up to s6 every thread of a block did everything: issue its share of the cp.async copies,
// wait at the block barrier, dequantize, multiply. On Hopper three pieces of hardware take
// work off the threads, and this header wraps each in a few lines of PTX:
//
//   * mbarriers: a 64-bit counter in shared memory that a phase completes when the expected
//     number of threads has arrived AND the expected number of bytes has landed. A consumer
//     waits on "stage full", a producer on "stage empty"; nobody waits at a block barrier.
//   * the bulk copy engine (TMA, `cp.async.bulk`): one instruction from one thread moves a
//     contiguous run of up to megabytes global -> shared and reports its bytes to an
//     mbarrier. A 256-column weight tile is 8 such copies, not 1024 per-thread cp.asyncs.
//   * the warpgroup MMA (`wgmma`): 4 warps issue one asynchronous matrix product; A comes from
//     registers (here: the dequantized weights), B from shared memory through a descriptor
//     (here: the activations), the accumulators stay in registers.
//
// `setmaxnreg` then moves registers from the warpgroup that only copies to the warpgroups
// that multiply. Everything lives in namespace `hopper`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "s4_fragments.cuh"  // FragC and the element types, for the write-out

namespace hopper {

// ---------------------------------------------------------------------------------
// mbarriers (PTX ISA "mbarrier"): all addresses are 32-bit shared-memory addresses.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

// Make the initialised barriers visible to the other threads and to the copy engine.
__device__ __forceinline__ void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// Arrive if `pred` holds. The predicate stays inside the instruction: a branch around an
// arrive between two wgmma groups would make ptxas serialize the groups (warning C7513).
__device__ __forceinline__ void mbarrier_arrive_if(unsigned bar, bool pred) {
  asm volatile("{\n .reg .pred p;\n .reg .b64 state;\n setp.ne.b32 p, %1, 0;\n @p mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
                   bar),
               "r"(int(pred))
               : "memory");
}

// Arrive and announce `bytes` more bytes that the copy engine will report to this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(unsigned bar, unsigned bytes) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}

// Wait until the phase with this parity (0 for phases 0, 2, 4...; 1 for 1, 3, 5...) has
// completed. try_wait suspends the thread for a while inside the instruction, so the loop
// spins rarely.
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// ---------------------------------------------------------------------------------
// Programmatic dependent launch (PTX "griddepcontrol"). A kernel launched with the
// programmatic-stream-serialization attribute may start while the kernel before it in the
// stream is still running; it must wait for that kernel (its completion and its writes)
// before it reads or writes anything the two share. Without the attribute the wait returns
// at once, so the same code serves both launches.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ void wait_for_previous_grid() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// Let the next kernel in the stream start (its blocks then take SMs as this kernel's leave).
__device__ __forceinline__ void allow_next_grid() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// x, as a value the compiler must keep in a register rather than recompute where it is used.
__device__ __forceinline__ unsigned opaque(unsigned x) {
  asm volatile("" : "+r"(x));
  return x;
}

// ---------------------------------------------------------------------------------
// The bulk copy engine: `bytes` (a multiple of 16, both addresses 16-byte aligned) from
// global to shared memory, completion reported to `bar`. The weights, read exactly once,
// carry an L2 evict-first policy (marlin::make_evict_first_policy); the scales, re-read by
// the next tiles of their group, do not.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ void bulk_copy_evict_first(unsigned dst, const void* src, unsigned bytes, unsigned bar,
                                                      unsigned long long policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
          dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// A tensor map (the driver's CUtensorMap, 128 bytes, built on the host by cuTensorMapEncodeTiled):
// a global tensor's address, sizes and strides, the box one copy moves and the swizzle it writes
// into shared memory. Passed by value as a __grid_constant__ kernel parameter, so the copy
// engine reads it from the parameter space. Elements past the tensor's end arrive as zeros.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

// The box at element coordinates (x, y) of `map` (x the contiguous dimension) into shared memory
// at `dst`, its bytes reported to `bar`.
__device__ __forceinline__ void tensor_copy(unsigned dst, const TensorMap& map, int x, int y, unsigned bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tensor_copy_evict_first(unsigned dst, const TensorMap& map, int x, int y, unsigned bar,
                                                        unsigned long long policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(x), "r"(y), "r"(bar), "l"(policy)
      : "memory");
}

// Arrive on `bar` once every cp.async this thread has issued so far has landed, without
// waiting for them here (.noinc: the barrier's expected count already includes this arrival).
__device__ __forceinline__ void cp_async_arrive(unsigned bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Shared memory written through the generic proxy (cp.async, st.shared) and read next by the
// tensor cores through the async proxy needs a proxy fence between the two. It compiles to a
// memory barrier that waits for the thread's own outstanding memory operations, so it belongs
// in a thread that has none in flight: the consumer, after it has acquired the data on the
// mbarrier and before its wgmma reads them -- never in the producer, whose copies of the next
// tiles would all have to land first.
__device__ __forceinline__ void fence_async_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// A barrier for `threads` threads (a multiple of 32) under hardware barrier `id` (1..15;
// 0 is __syncthreads), so that one role can synchronise without the others.
__device__ __forceinline__ void named_barrier(unsigned id, unsigned threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// marlin::reduce_k_warp_partials' and marlin::add_partial_sums' barrier for kThreads threads
// (a multiple of 32) on hardware barrier kId. any() is thread 0's vote, passed through `flag`
// in shared memory: add_partial_sums lets thread 0 alone vote, and between two votes every
// thread has passed a sync(), so none can still be reading the last one.
template <int kId, int kThreads>
struct NamedSync {
  volatile int* flag;
  __device__ __forceinline__ void sync() const { named_barrier(kId, kThreads); }
  __device__ __forceinline__ bool any(bool vote) const {
    if (threadIdx.x == 0) *flag = vote;
    named_barrier(kId, kThreads);
    return *flag;
  }
};

// Give this warpgroup's registers back / take more (every warp of the warpgroup executes it).
template <int kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// ---------------------------------------------------------------------------------
// wgmma: issue, commit as a group, wait until at most kPending groups are in flight.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The descriptor of a K-major B operand stored in 128-byte-swizzled atoms (8 rows x 128
// bytes, 1024 bytes each, the 16-byte chunks of row r XOR-ed with r % 8) at shared address
// `smem`: address / 16 in bits 0-13, the 8-row groups 1024 bytes apart (bits 32-45),
// swizzle mode 1 = 128 bytes (bits 62-63); the leading offset (bits 16-29) is unused by
// this layout and set to 1.
__device__ __forceinline__ unsigned long long swizzled_operand(unsigned smem) {
  return ((smem & 0x3FFFFu) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kRows rows stored as
// side-by-side 128-byte-swizzled atom columns (64 fp16 of K each).
template <int kRows>
__device__ __forceinline__ unsigned swizzled_chunk(int row, int chunk) {
  return (chunk / 8) * (kRows * 128) + row * 128 + (((chunk % 8) ^ (row & 7)) * 16);
}

// The output of the transposed product (wgmma's D = W^T A^T): a lane (g, c) of warp w holds,
// in acc[m][j][h], tokens 16m + 8h + 2c and + 1 of columns 16j + g (values 0, 1) and
// 16j + g + 8 (values 2, 3) of its kJ 16-column tiles, which start at column `first_col` --
// the layout of s7's mma.sp accumulator, in either element type. Lanes g and g ^ 1 swap one
// value each so that every lane holds two adjacent columns of one token and writes them as one
// pair: even g the token 2c, odd g the token 2c + 1.
template <int kMBlocks, int kJ, class E>
__device__ __forceinline__ void write_transposed(const marlin::FragC (&acc)[kMBlocks][kJ][2],
                                                 typename E::scalar* __restrict__ C, int ldc, int rows_valid,
                                                 int first_col) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const bool odd = g & 1;
#pragma unroll
  for (int m = 0; m < kMBlocks; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * m + 8 * h + 2 * c + odd;
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float first = acc[m][j][h].v[2 * r], second = acc[m][j][h].v[2 * r + 1];  // tokens 2c, 2c + 1
          const float theirs = __shfl_xor_sync(0xffffffffu, odd ? first : second, 4);
          const typename E::pair pair = odd ? E::round(theirs, second) : E::round(first, theirs);
          if (row < rows_valid)
            *reinterpret_cast<typename E::pair*>(C + size_t(row) * ldc + first_col + 16 * j + 8 * r + (g & ~1)) =
                pair;
        }
    }
}

}  // namespace hopper
