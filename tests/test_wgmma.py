"""s6's 256-wide tiles above 16 rows, and its Hopper path there: the warpgroup MMA for slabs of
17-64 rows (csrc/marlin_core.cuh, "Hopper's warpgroup MMA").

Which configurations take it is checked anywhere; the kernel itself on a GPU (marked `gpu`,
skipped elsewhere; the wgmma cases need compute capability 9.0). The registry-wide tests of
tests/test_steps.py draw shapes too narrow for s6's 256-wide tiles on a full GPU, so here
s6 runs on a few "SMs" (blocks per launch), where 256-wide tiles are its choice, column
slices are shared and the global reduction runs."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference as ref

IDEAL = (33792, 16896)


def _marlin(sms: int | None = None):
    from steps.s6_marlin import Marlin

    step = Marlin()
    step.sms = sms
    return step


def _configs_on_an_h100(step, M: int, K: int, N: int, group: int = 128, **kwargs):
    import steps.s5_async_pipeline as s5
    import steps.s6_marlin as s6

    with (
        mock.patch.object(s5, "max_dynamic_smem", lambda device: 227 * 1024),
        mock.patch.object(s5, "sm_count", lambda device: 132),
        mock.patch.object(s6, "has_wgmma", lambda device: True),
    ):
        return step.config(M, K, N, group, 0, **kwargs)


@pytest.mark.parametrize("M", [1, 16, 17, 32, 48, 64, 65, 128, 1000])
def test_wgmma_serves_the_ideal_shape_above_16_rows(M):
    cfg = _configs_on_an_h100(_marlin(), M, *IDEAL)
    assert cfg.wgmma == (M > 16)
    if cfg.wgmma:
        assert cfg.tile_n == 256 and cfg.tile_k >= 128 and cfg.m_blocks >= 2
        assert cfg.stage_bytes % 1024 == 0 and ("WGMMA", 1) in cfg.defines()


def test_wgmma_can_be_switched_off_and_is_not_the_sparse_rungs():
    from steps.s7_sparse_marlin import SparseMarlin

    off = _marlin()
    off.use_wgmma = False
    assert not _configs_on_an_h100(off, 64, *IDEAL).wgmma
    assert not _configs_on_an_h100(SparseMarlin(), 64, *IDEAL).wgmma


# -- the kernel ------------------------------------------------------------------------------
def _gpu() -> bool:
    from steps._cuda import gpu_support

    return bool(gpu_support())


def _needs_wgmma():
    from steps._cuda import has_wgmma

    if not _gpu() or not has_wgmma(0):
        pytest.skip("needs a GPU with wgmma (compute capability 9.0)")


def _run(step, A: np.ndarray, qw: ref.QuantizedWeight) -> np.ndarray:
    import cupy

    out = cupy.full((A.shape[0], qw.N), np.nan, dtype=A.dtype)
    step(cupy.asarray(A), step.pack(qw), out=out)
    return out.get()


problems = st.tuples(
    st.integers(17, 300),  # M: 2-4 m-blocks, several slabs, partial slabs
    st.integers(1, 6).map(lambda k: 128 * k),  # K
    st.integers(1, 4).map(lambda n: 256 * n),  # N
    st.sampled_from(ref.GROUP_SIZES),
    st.integers(1, 7),  # blocks per launch
    st.sampled_from(["float16", "bfloat16"]),
    st.booleans(),  # zero points
    st.integers(0, 2**32 - 1),
)


@pytest.mark.gpu
@settings(max_examples=60, deadline=None)
@given(problems)
def test_wgmma_kernel_matches_reference_within_bound(problem):
    _needs_wgmma()
    M, K, N, group, sms, dtype, zero_points, seed = problem
    step = _marlin(min(sms, N // 128))  # 256-wide tiles need N >= 128 per block (Marlin.tile_plan)
    # 64-row slabs with zero points keep to narrower tiles, and so to mma.sync (s5's config)
    assume(step.config(M, K, N, group, 0, zero_points, dtype == "bfloat16").wgmma)
    rng = np.random.default_rng(seed)
    qw = ref.random_quantized_weight(rng, K, N, group, symmetric=not zero_points, dtype=dtype)
    A = rng.standard_normal((M, K), dtype=np.float32).astype(ref.element_dtype(dtype))
    assert ref.error_excess(_run(step, A, qw), A, qw, step.error_c) <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("M", [17, 32, 40, 64, 100, 200])
@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize("use_wgmma", [True, False], ids=["wgmma", "mma.sync"])
def test_wide_tiles_are_exact_on_integer_data(M, group, zero_points, use_wgmma):
    """A in {-1, 0, 1}, scales 1/8: every partial sum is exact, so any misplaced weight,
    activation or output element shows as a difference from the reference. Both
    instructions, since s6's 256-wide tiles run mma.sync off Hopper."""
    if use_wgmma:
        _needs_wgmma()
    elif not _gpu():
        pytest.skip("needs a CUDA GPU")
    step = _marlin(5)
    step.use_wgmma = use_wgmma
    K, N = 1024, 768
    cfg = step.config(M, K, N, group, 0, zero_points)
    assert cfg.wgmma == (use_wgmma and cfg.tile_n == 256), cfg
    rng = np.random.default_rng(M * 10 + group)
    groups = 1 if group == -1 else K // group
    zeros = rng.integers(0, 16, (groups, N), dtype=np.uint8) if zero_points else None
    codes = rng.integers(0, 16, (K, N), dtype=np.uint8)
    qw = ref.QuantizedWeight(codes, np.full((groups, N), 0.125, np.float16), group, zeros)
    A = rng.integers(-1, 2, (M, K)).astype(np.float16)
    first = _run(step, A, qw)
    np.testing.assert_array_equal(first, ref.reference_gemm(A, qw))
    for _ in range(9):
        np.testing.assert_array_equal(_run(step, A, qw), first)
