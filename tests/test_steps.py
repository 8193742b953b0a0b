"""Every rung of the registry against the reference, through the Step interface alone.

No rung is special-cased here: each test is parametrized over `steps.STEPS`. CUDA rungs
are marked `gpu` (skipped without a device), except rung 1 where Numba's CUDA simulator
runs it on the CPU. Problem sizes scale with where a rung runs: the simulator gets tiny
problems, a GPU large ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference as ref
import steps
from steps._arrays import to_gpu, to_host
from steps._cuda import CudaStep


def _params():
    for step in steps.STEPS:
        marks = [] if step.host_arrays else [pytest.mark.gpu]
        yield pytest.param(step, marks=marks, id=step.name)


ALL_STEPS = list(_params())


def _dtype_params():
    """(step, activation dtype) for every dtype a rung takes; fp16 cases keep the rung's id."""
    for step in steps.STEPS:
        marks = [] if step.host_arrays else [pytest.mark.gpu]
        for dtype in step.activation_dtypes:
            yield pytest.param(step, dtype, marks=marks, id=step.name if dtype == "float16" else f"{step.name}-{dtype}")


STEP_DTYPES = list(_dtype_params())


def _simulated(step) -> bool:
    return step.device == "cuda" and step.host_arrays


def problem_sizes(step):
    """(M, K, N, group) drawn at a size suited to where the rung runs."""
    if _simulated(step):
        Ms, Ks, Ns = st.integers(1, 3), st.sampled_from([128, 256]), st.sampled_from([32, 64, 96])
    elif step.host_arrays:
        Ms, Ks, Ns = st.integers(1, 40), st.integers(1, 12).map(lambda k: 128 * k), st.integers(1, 12).map(lambda n: 64 * n)
    else:
        Ms = st.integers(1, 1000)
        Ks = st.integers(1, 32).map(lambda k: 128 * k)
        Ns = st.integers(1, 24).map(lambda n: 64 * n)
    return st.tuples(Ms, Ks, Ns, st.sampled_from(ref.GROUP_SIZES))


def to_device(step, x: np.ndarray):
    """x where the rung computes: itself for host rungs, else on the GPU."""
    return x if step.host_arrays else to_gpu(x)


def poisoned(step, M: int, N: int, dtype=np.float16):
    return to_device(step, np.full((M, N), np.nan, dtype=dtype))


def with_zero_points(step, seed: int) -> bool:
    """Half the drawn weights get zero points, on the rungs that take them."""
    return step.supports_zero_points and seed % 2 == 1


def run(step, A: np.ndarray, qw: ref.QuantizedWeight) -> np.ndarray:
    out = poisoned(step, A.shape[0], qw.N, A.dtype)
    result = step(to_device(step, A), step.pack(qw), out=out)
    assert result is out
    return to_host(out)


@pytest.mark.parametrize("step, dtype", STEP_DTYPES)
def test_matches_reference_within_bound(step, dtype):
    @given(problem_sizes(step), st.integers(0, 2**32 - 1))
    def check(sizes, seed):
        M, K, N, g = sizes
        assume(step.supports(M, K, N, g))
        rng = np.random.default_rng(seed)
        qw = ref.random_quantized_weight(rng, K, N, g, symmetric=not with_zero_points(step, seed), dtype=dtype)
        A = rng.standard_normal((M, K), dtype=np.float32).astype(ref.element_dtype(dtype))
        C = run(step, A, qw)
        assert ref.error_excess(C, A, step.reference_weight(qw), step.error_c) <= 1.0

    check()


@pytest.mark.parametrize("step, dtype", STEP_DTYPES)
def test_bit_exact_on_integer_valued_data(step, dtype):
    """With A in {-1, 0, 1} and scales 1/8 every product and partial sum is exact in fp16
    and fp32, so any correct kernel, whatever its summation order, must reproduce the
    reference bit for bit: a single misplaced weight or activation shows. (In bf16 the
    partial sums are not all representable, but the rungs that take bf16 add in fp32 and
    round once, as the reference does.)"""

    @given(problem_sizes(step), st.integers(0, 2**32 - 1))
    def check(sizes, seed):
        M, K, N, g = sizes
        M, K, N = min(M, 64), min(K, 2048), min(N, 512)  # the exactness check below is O(M K N)
        assume(step.supports(M, K, N, g))
        rng = np.random.default_rng(seed)
        groups = K // ref.group_rows(g, K)
        zeros = rng.integers(0, 16, (groups, N), dtype=np.uint8) if with_zero_points(step, seed) else None
        element = ref.element_dtype(dtype)
        qw = ref.QuantizedWeight(rng.integers(0, 16, (K, N), dtype=np.uint8), np.full((groups, N), 0.125, element), g, zeros)
        A = rng.integers(-1, 2, (M, K)).astype(element)
        terms = A.astype(np.float64)[:, :, None] * ref.dequantize(step.reference_weight(qw)).astype(np.float64)[None]
        prefix = np.cumsum(terms, axis=1)
        span = np.maximum(prefix.max(axis=1), 0) - np.minimum(prefix.min(axis=1), 0)
        assume(span.max() < 256)  # every partial sum is a multiple of 1/8 below 256: exact in fp16
        assert np.array_equal(run(step, A, qw), ref.reference_gemm(A, step.reference_weight(qw)))

    check()


@pytest.mark.parametrize("step", ALL_STEPS)
def test_repeated_runs_are_bit_identical(step):
    rng = np.random.default_rng(7)
    M, K, N, g = (3, 256, 64, 128) if _simulated(step) else (37, 1024, 512, 128)
    assert step.supports(M, K, N, g)
    if hasattr(step, "schedule"):  # striped rungs: every column slice is shared, so the global reduction runs
        cfg, iters, _ = step.schedule(M, K, N, g, 0)
        assert iters < K // cfg.tile_k
    qw = ref.random_quantized_weight(rng, K, N, g)
    A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    first = run(step, A, qw)
    for _ in range(1 if _simulated(step) else 9):
        assert np.array_equal(run(step, A, qw), first)


STRIPED_STEPS = [p for p in ALL_STEPS if hasattr(p.values[0], "schedule")]


@pytest.mark.gpu
@pytest.mark.parametrize("step", STRIPED_STEPS)
@pytest.mark.parametrize("M", [17, 32, 40, 64, 100, 200])
@pytest.mark.parametrize("group", [-1, 32, 128])
def test_wide_tiles_on_few_sms_are_exact_and_repeatable(step, M, group, monkeypatch):
    """The draws above are too narrow for the striped rungs' 256-wide tiles on a full GPU. On
    5 "SMs" (blocks per launch), with the runs cut evenly, a 768-wide layer takes them, runs
    end inside column slices and the global reduction runs; with A in {-1, 0, 1} and scales
    1/8 every partial sum is exact, so a misplaced weight, activation or output element
    shows, and so does a run-to-run difference."""
    monkeypatch.setattr(step, "sms", 5)
    monkeypatch.setattr(step, "reduction_cost", 0.0)
    K, N = 1024, 768
    zero_points = step.supports_zero_points and M % 2 == 0
    cfg, iters, _ = step.schedule(M, K, N, group, 0, zero_points)
    # (64-row slabs with zero points keep to 128-wide tiles: s5's PipelinedStep.config)
    assert cfg.tile_n == 256 or (zero_points and M > 48), cfg
    assert iters % (K // cfg.tile_k), (cfg, iters)
    rng = np.random.default_rng(M * 10 + group)
    groups = K // ref.group_rows(group, K)
    zeros = rng.integers(0, 16, (groups, N), dtype=np.uint8) if zero_points else None
    qw = ref.QuantizedWeight(rng.integers(0, 16, (K, N), dtype=np.uint8), np.full((groups, N), 0.125, np.float16), group, zeros)
    A = rng.integers(-1, 2, (M, K)).astype(np.float16)
    first = run(step, A, qw)
    np.testing.assert_array_equal(first, ref.reference_gemm(A, step.reference_weight(qw)))
    for _ in range(9):
        np.testing.assert_array_equal(run(step, A, qw), first)


@pytest.mark.parametrize("step", ALL_STEPS)
def test_bad_inputs_get_clear_errors(step):
    rng = np.random.default_rng(3)
    K, N = 256, 64 if _simulated(step) else 256
    qw = ref.random_quantized_weight(rng, K, N, 128)
    packed = step.pack(qw)
    A = rng.standard_normal((2, K)).astype(np.float16)
    with pytest.raises(TypeError, match="dtype float32"):
        step(to_device(step, A.astype(np.float32)), packed)
    with pytest.raises(ValueError, match="dimension 1 must be 256"):
        step(to_device(step, A[:, :128].copy()), packed)
    with pytest.raises(ValueError, match="C-contiguous"):
        step(to_device(step, np.repeat(A, 2, axis=1))[:, ::2], packed)
    with pytest.raises(ValueError, match="2-D"):
        step(to_device(step, A[0]), packed)
    with pytest.raises(ValueError, match="out has shape"):
        step(to_device(step, A), packed, out=to_device(step, np.empty((3, N), np.float16)))
    other = steps.STEPS[0] if step is not steps.STEPS[0] else steps.STEPS[-1]
    with pytest.raises(TypeError, match="packed by its own pack"):
        step(to_device(step, A), other.pack(qw) if other.available() else object())
    wrong_side = A if not step.host_arrays else None
    if wrong_side is not None:
        with pytest.raises(TypeError, match="on the host"):
            step(wrong_side, packed)
    empty = step(to_device(step, np.empty((0, K), np.float16)), packed)
    assert tuple(empty.shape) == (0, N)
    bf16 = ref.element_dtype("bfloat16")
    if "bfloat16" in step.activation_dtypes:
        with pytest.raises(TypeError, match="A is bfloat16 but the weight was packed with float16 scales"):
            step(to_device(step, A.astype(bf16)), packed)
    else:
        with pytest.raises(ValueError, match=f"{step.name} computes in float16; this weight's scales are bfloat16"):
            step.pack(ref.random_quantized_weight(rng, K, N, 128, dtype=bf16))


@pytest.mark.gpu
@pytest.mark.parametrize("step", [p for p in ALL_STEPS if isinstance(p.values[0], CudaStep)])
def test_arrays_at_an_odd_offset_are_refused_by_name(step):
    """A view that starts 2 bytes into a buffer is C-contiguous, but the CuPy rungs' vector
    loads and copies (and rung 8's tensor maps) need aligned starts: refused, never a fault."""
    rng = np.random.default_rng(5)
    M, K, N = 3, 256, 256
    packed = step.pack(ref.random_quantized_weight(rng, K, N, 128))
    A = rng.standard_normal((M, K)).astype(np.float16)
    shifted = to_gpu(np.zeros(M * K + 1, np.float16))[1:].reshape(M, K)
    shifted[...] = to_gpu(A)
    with pytest.raises(ValueError, match="A must start on a 16-byte boundary"):
        step(shifted, packed)
    out = to_gpu(np.zeros(M * N + 1, np.float16))[1:].reshape(M, N)
    with pytest.raises(ValueError, match="out must start on a .*-byte boundary"):
        step(to_gpu(A), packed, out=out)


@pytest.mark.parametrize("step", ALL_STEPS)
def test_unsupported_problems_say_why(step):
    for M, K, N, g in [(1, 100, 64, 128), (1, 256, 64, 100), (1, 0, 64, -1)]:
        verdict = step.supports(M, K, N, g)
        assert not verdict and verdict.reason
    unsupported = ref.QuantizedWeight(np.zeros((256, 64), np.uint8), np.ones((1, 64), np.float16), 256)
    with pytest.raises(ValueError, match="group_size"):
        step.pack(unsupported)


@pytest.mark.parametrize("step", [p for p in ALL_STEPS if p.values[0].host_arrays])
def test_what_supports_accepts_runs_and_what_it_refuses_says_why(step):
    """supports() is the contract: any shape it accepts packs and multiplies within the
    bound, any it refuses comes with a reason (odd K and N included, for group size -1)."""
    simulated = _simulated(step)

    @settings(deadline=None, max_examples=10 if simulated else settings().max_examples)
    @given(st.integers(1, 3), st.integers(1, 48 if simulated else 300), st.integers(1, 16 if simulated else 80),
           st.sampled_from(ref.GROUP_SIZES), st.integers(0, 2**32 - 1))  # fmt: skip
    def check(M, K, N, g, seed):
        verdict = step.supports(M, K, N, g)
        if not verdict:
            assert verdict.reason
            return
        rng = np.random.default_rng(seed)
        qw = ref.random_quantized_weight(rng, K, N, g)
        A = rng.standard_normal((M, K)).astype(np.float16)
        assert ref.error_excess(run(step, A, qw), A, step.reference_weight(qw), step.error_c) <= 1

    check()


@pytest.mark.gpu
@pytest.mark.parametrize("step", [p for p in ALL_STEPS if not p.values[0].host_arrays])
def test_torch_tensors_in_torch_tensors_out_on_the_current_stream(step):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    qw = ref.random_quantized_weight(rng, 512, 256, 128)
    A_host = rng.standard_normal((5, 512)).astype(np.float16)
    packed = step.pack(qw)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        A = torch.from_numpy(A_host).cuda()
        C = step(A, packed)
    stream.synchronize()
    assert isinstance(C, torch.Tensor) and C.is_cuda and C.dtype == torch.float16
    assert ref.error_excess(C.cpu().numpy(), A_host, step.reference_weight(qw), step.error_c) <= 1.0


@pytest.mark.parametrize("step", [pytest.param(s, id=s.name) for s in steps.STEPS if not s.available()])
def test_packing_for_a_rung_this_machine_cannot_run_says_why(step):
    qw = ref.random_quantized_weight(np.random.default_rng(0), 256, 128)
    with pytest.raises(RuntimeError, match=f"{step.name} cannot run on this machine: .+"):
        step.pack(qw)
    assert step.pack_host(qw)  # the layout itself needs no GPU


def test_timing_needs_two_samples():
    from steps.harness.timing import measure

    with pytest.raises(ValueError, match="at least 2 samples"):
        measure(lambda i: None, device="cpu", samples=1)
    assert measure(lambda i: None, device="cpu", samples=2).samples == 2
