// Rung 6: the full MARLIN kernel. SM-striped partition of the weight tiles, with the
// partial sums of a shared column slice added by whichever block finishes it last.
//
// s5 gave each block one column slice of TILE_N columns and all of K, so the grid was
// N / TILE_N blocks whatever the GPU: a 4096-wide layer on 132 SMs left 100 SMs idle.
// Here the grid is (at most) one block per SM and block b takes the contiguous run of
// `iters` weight tiles starting at b * iters, numbered column slice by column slice, K
// innermost (s6_stripes.cuh draws it); several 64-row slabs of A are just more column
// slices, so one launch serves any batch up to 16 slabs. Blocks sharing a column slice
// store fp32 partials and the last to arrive adds them in block order: no block waits, as
// the original MARLIN's serial fp16 reduction makes them, and results are bit-identical
// run to run. reference/marlin_layout.py (striped_schedule) models the partition and
// supplies `iters`.
//
// The mechanism is s6_stripes.cuh: rung 5's pipeline with a cursor that runs across
// column slices (marlin::StripedPipeline), the walk (marlin::run_stripes) and the
// reduction (marlin::add_partial_sums). This file only says where the output goes.
#include "s6_stripes.cuh"

#ifndef M_BLOCKS
#define M_BLOCKS 1  // 16-row blocks of A per slab: 1..4
#endif
#ifndef TILE_N
#define TILE_N 128  // output columns per column slice
#endif
#ifndef TILE_K
#define TILE_K 128  // rows of K per tile (one pipeline stage)
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

using Pipe = marlin::StripedPipeline<M_BLOCKS, TILE_N, TILE_K, STAGES, GROUP_SIZE, EVICT_FIRST != 0, ZERO_POINTS != 0,
                                     Element>;
MARLIN_CHECK_LAUNCH(Pipe);

extern "C" __global__ void __launch_bounds__(Pipe::THREADS, 1)
    s6_marlin(const int4* __restrict__ A, const int4* __restrict__ B, const int4* __restrict__ S,
              const int4* __restrict__ Z, Element::scalar* __restrict__ C, int M, int K, int N, int* __restrict__ counters,
              float* __restrict__ partials, int iters) {
  extern __shared__ int4 smem[];
  Pipe pipe;
  pipe.init(smem, A, B, S, Z, M, K, N);
  marlin::FragC acc[M_BLOCKS][4][2];
  marlin::run_stripes<M_BLOCKS>(pipe, acc, M, K, N, counters, partials, iters,
                                [&](const marlin::StripeSegment& seg, int rows_valid) {
                                  Element::scalar* slab = C + size_t(seg.slab) * Pipe::SLAB_ROWS * N;
                                  const int strip_col = seg.col * TILE_N + 64 * pipe.strip;
                                  marlin::fold_into_output<M_BLOCKS, Element>(acc, slab, N, rows_valid, strip_col);
                                });
}
