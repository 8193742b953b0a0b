"""Any K and N on every rung: the padding of steps/_padding.py.

A weight whose K or N is not a multiple of what a rung's layout needs is padded once, in
pack, with entries that dequantize to exactly 0; the product pads the activations along K
and cuts the output along N only where needed. Checked here: the padding is exact (bit for
bit, every group size, symmetric and asymmetric, fp16 and bf16); every rung of the registry
computes odd-shaped products within its error bound (CPU rungs here, rung 1 under the
simulator on tiny shapes, CUDA rungs marked gpu); aligned shapes never take the padded
path; MarlinLinear takes odd layer shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
import steps
from steps import _padding
from steps._arrays import to_gpu, to_host

seeds = st.integers(0, 2**32 - 1)


def odd_problems(step):
    """(M, K, N, group_size) with K and N mostly off every rung's multiples."""
    if step.device == "cuda" and step.host_arrays:  # rung 1 under Numba's simulator: tiny
        Ms, rows, Ns = st.integers(1, 2), st.integers(1, 5), st.integers(1, 20)
    elif step.host_arrays:
        Ms, rows, Ns = st.integers(1, 9), st.integers(1, 9), st.integers(1, 300)
    else:
        Ms, rows, Ns = st.integers(1, 80), st.integers(1, 40), st.integers(1, 3000)

    @st.composite
    def problem(draw):
        g = draw(st.sampled_from(ref.GROUP_SIZES))
        k_rows = draw(rows)
        K = draw(st.integers(1, 8 * k_rows + 7)) if g == -1 else g * k_rows  # K must be whole groups
        return draw(Ms), K, draw(Ns), g

    return problem()


@given(st.integers(1, 300), st.integers(1, 70), st.sampled_from(ref.GROUP_SIZES), st.booleans(),
       st.sampled_from(["float16", "bfloat16"]), seeds)  # fmt: skip
def test_padding_dequantizes_to_exactly_zero(k, N, g, symmetric, dtype, seed):
    K = k if g == -1 else g * (1 + k % 4)
    rng = np.random.default_rng(seed)
    qw = ref.random_quantized_weight(rng, K, N, g, symmetric=symmetric, dtype=dtype)
    Kp, Np = _padding.padded_shape(((128, 64),), K, N, g)
    padded = _padding.pad_weight(qw, Kp, Np)
    W = ref.dequantize(padded)
    assert W.shape == (Kp, Np) and Kp % 128 == 0 and Np % 64 == 0
    assert np.array_equal(W[:K, :N], ref.dequantize(qw))
    assert not W[K:].any() and not W[:, N:].any()
    assert (padded.zeros is None) == symmetric


def test_padded_shape_is_the_smallest_of_the_rungs_multiples():
    assert _padding.padded_shape(((128, 128), (64, 256)), 2880, 7392, 64) == (2880, 7424)
    assert _padding.padded_shape(((128, 128), (64, 256)), 4096, 11008, 128) == (4096, 11008)
    assert _padding.padded_shape(((16, 64),), 8, 3, 32) == (32, 64)  # whole groups of 32


@pytest.mark.parametrize(
    "step", [pytest.param(s, marks=[] if s.host_arrays else [pytest.mark.gpu], id=s.name) for s in steps.STEPS]
)
def test_odd_shapes_match_the_reference_within_bound(step):
    @given(odd_problems(step), seeds)
    def check(problem, seed):
        M, K, N, g = problem
        assert step.supports(M, K, N, g), step.supports(M, K, N, g).reason
        rng = np.random.default_rng(seed)
        qw = ref.random_quantized_weight(rng, K, N, g, symmetric=not (step.supports_zero_points and seed % 2))
        A = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
        packed = step.pack(qw)
        assert (packed.K, packed.N) == (K, N)
        out = np.full((M, N), np.nan, np.float16)
        if not step.host_arrays:
            A, out = to_gpu(A), to_gpu(out)
        assert step(A, packed, out=out) is out
        C = to_host(out)
        assert ref.error_excess(C, to_host(A), step.reference_weight(qw), step.error_c) <= 1.0

    check()


def test_aligned_shapes_never_take_the_padded_path(monkeypatch):
    def refuse(*args):
        raise AssertionError("an aligned product was padded")

    monkeypatch.setattr("steps.step.run_padded", refuse)
    step = steps.get("s0_numpy")
    rng = np.random.default_rng(1)
    qw = ref.random_quantized_weight(rng, 256, 24, 128)
    A = rng.standard_normal((3, 256), dtype=np.float32).astype(np.float16)
    assert ref.error_excess(step(A, step.pack(qw)), A, qw, step.error_c) <= 1.0


def test_marlin_linear_takes_odd_layer_shapes():
    torch = pytest.importorskip("torch")
    from steps.torch.layer import MarlinLinear

    linear = torch.nn.Linear(13, 7)
    layer = MarlinLinear.from_linear(linear, group_size=-1)
    x = torch.randn(2, 5, 13).half()
    y = layer(x)
    qw = ref.quantize(linear.weight.detach().numpy().T, -1)
    want = ref.reference_gemm(x.reshape(-1, 13).numpy(), qw).astype(np.float32) + linear.bias.detach().half().numpy()
    assert y.shape == (2, 5, 7)
    np.testing.assert_allclose(y.reshape(-1, 7).float().numpy(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["s5_async_pipeline", "s6_marlin", "s8_hopper"])
@given(st.integers(1, 40), st.integers(1, 3000), st.sampled_from(ref.GROUP_SIZES), st.booleans(), st.booleans())
def test_the_first_run_check_of_an_odd_weight_picks_the_variant_of_its_padded_shape(name, k_rows, N, g, zeros, bf16):
    """MarlinLinear checks a layer's variant before its first product: for the shape the
    kernel runs (padded), not the checkpoint's, which no tile may divide (found on the H200)."""
    from unittest import mock

    import steps.s5_async_pipeline as s5
    import steps.s8_hopper as s8

    step = steps.get(name)
    K = g * k_rows if g != -1 else 8 * k_rows
    asked = []
    with (
        mock.patch.object(s5, "max_dynamic_smem", lambda device: 227 * 1024),
        mock.patch.object(s5, "sm_count", lambda device: 132),
        mock.patch.object(s8, "max_dynamic_smem", lambda device: 227 * 1024),
        mock.patch.object(type(step), "kernel", lambda self, cfg, device: asked.append(cfg)),
    ):
        step.check_first_run(K, N, g, zeros and step.supports_zero_points, "bfloat16" if bf16 else "float16", 0)
    assert len(asked) == 1
