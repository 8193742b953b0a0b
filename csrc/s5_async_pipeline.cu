// Rung 5: an asynchronous multi-stage pipeline, so the weights stream at full bandwidth.
//
// s4 loaded each weight word into a register and waited for it: with one warp per
// 64-column strip, far too few bytes were in flight to cover the ~1 us memory latency.
// This rung keeps STAGES - 1 tiles of A, weights and scales in flight per block with
// cp.async (global -> shared without passing through registers, so loads cost no
// registers while they wait), tags the weight copies L2 evict-first (they are read once
// and should not evict A, scales or outputs), double-buffers the register fragments so
// the shared-memory reads of step k+1 overlap the tensor-core work of step k, and puts
// 8 warps on every block: TILE_N / 64 side by side along N, the rest splitting each
// tile's K and adding their partial sums in shared memory at the end.
//
// The pipeline is s5_pipeline.cuh (struct marlin::Pipeline), which opens with a picture of
// the ring; this file is the plain grid around it: one block per (column slice of TILE_N
// columns, slab of A), each walking all of K. That grid is its weakness: N / TILE_N blocks
// rarely match the SM count (a 4096-wide layer gives 32 blocks for 132 SMs). s6 fixes the
// partition.
#include "s5_pipeline.cuh"

#ifndef M_BLOCKS
#define M_BLOCKS 1  // 16-row blocks of A per slab: 1..4
#endif
#ifndef TILE_N
#define TILE_N 128  // output columns per block
#endif
#ifndef TILE_K
#define TILE_K 128  // rows of K per pipeline stage
#endif
#ifndef STAGES
#define STAGES 4  // tiles in flight + 1
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 128  // rows of K per scale, as reference.QuantizedWeight: -1 is one group of all K rows
#endif
#ifndef EVICT_FIRST
#define EVICT_FIRST 1  // L2 evict-first hint on the weight copies
#endif
#ifndef ZERO_POINTS
#define ZERO_POINTS 0  // 1: w = (q - z) * s with a zero point z per group and column (Z), else (q - 8) * s
#endif
#ifndef BF16
#define BF16 0  // 1: bf16 activations, scales, zero points and output; 0: fp16
#endif

using Element = marlin::ElementOf<BF16 != 0>::type;

// One column slice per block: the k-warp reduction reuses the stages once they are idle.
using Pipe = marlin::Pipeline<M_BLOCKS, TILE_N, TILE_K, STAGES, GROUP_SIZE, EVICT_FIRST != 0, ZERO_POINTS != 0, Element>;
MARLIN_CHECK_LAUNCH(Pipe);

extern "C" __global__ void __launch_bounds__(Pipe::THREADS, 1)
    s5_async_pipeline(const int4* __restrict__ A, const int4* __restrict__ B, const int4* __restrict__ S,
                      const int4* __restrict__ Z, Element::scalar* __restrict__ C, int M, int K, int N) {
  extern __shared__ int4 smem[];
  const int col = blockIdx.x, slab_row0 = blockIdx.y * Pipe::SLAB_ROWS;
  const int rows_valid = min(Pipe::SLAB_ROWS, M - slab_row0);
  const int k_tiles = K / TILE_K, first_tile = (blockIdx.y * gridDim.x + col) * k_tiles;

  Pipe pipe;
  pipe.init(smem, A, B, S, Z, M, K, N);
  pipe.start(first_tile, first_tile + k_tiles);
  marlin::FragC acc[M_BLOCKS][4][2];
  pipe.consume(acc, k_tiles);
  pipe.reduce_across_k_warps(acc);
  if (pipe.k_warp == 0)
    marlin::fold_into_output<M_BLOCKS, Element>(acc, C + size_t(slab_row0) * N, N, rows_valid, col * TILE_N + 64 * pipe.strip);
}
