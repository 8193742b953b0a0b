"""Bad input is never a silent wrong answer: weights and CLI arguments, malformed on purpose.

Each example of issue 21 gets a test, then Hypothesis generates malformed weights (wrong
dtypes, shapes, ranges, non-finite or zero scales, odd group sizes) and CLI argument lists:
every case either computes what the reference computes or raises a one-sentence
TypeError/ValueError naming the field; never an exception from inside NumPy, never a
wrong result.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
import steps

BF16 = np.dtype(ml_dtypes.bfloat16)
S0 = steps.get("s0_numpy")


def _weight(codes=None, scales=None, group_size=128, zeros=None, K=256, N=64):
    codes = np.full((K, N), 3, np.uint8) if codes is None else codes
    scales = np.full((K // 128, N), 0.01, np.float16) if scales is None else scales
    return ref.QuantizedWeight(codes, scales, group_size, zeros)


# -- the examples, one by one --------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, error, phrase",
    [
        (dict(zeros=np.full((2, 64), 99, np.uint8)), ValueError, r"zeros must lie in 0..15 \(4 bits\), got 99"),
        (dict(codes=np.full((256, 64), -1, np.int8)), TypeError, "codes must have an unsigned integer dtype"),
        (dict(codes=np.full((256, 64), 3.7, np.float32)), TypeError, "got float32"),
        (dict(codes=np.full((256, 64), 16, np.uint8)), ValueError, r"codes must lie in 0..15 \(4 bits\), got 16"),
        (dict(codes=np.zeros(256, np.uint8)), ValueError, "codes must be a non-empty 2-D array"),
        (dict(scales=np.full((3, 64), 0.01, np.float16)), ValueError, r"scales must have shape \(groups, N\) = \(2, 64\)"),
        (dict(scales=np.full((2, 64), 0.01, np.float32)), TypeError, "scales must be float16 or bfloat16, got float32"),
        (dict(scales=np.full((2, 64), np.nan, np.float16)), ValueError, "scales must be finite, got nan"),
        (dict(scales=np.full((2, 64), np.inf, BF16)), ValueError, "scales must be finite"),
        (dict(scales=np.zeros((2, 64), np.float16)), ValueError, "scales is 0 at"),
        (dict(zeros=np.full((1, 64), 8, np.uint8)), ValueError, r"zeros must have shape \(2, 64\)"),
        (dict(zeros=np.full((2, 64), 8, np.int32)), TypeError, "zeros must have an unsigned integer dtype"),
        (dict(group_size=100), ValueError, "group_size must be -1 or a positive divisor of K=256, got 100"),
        (dict(group_size=128.0), TypeError, "group_size must be an int"),
        (dict(codes=[[1, 2]]), TypeError, "codes must be a NumPy array"),
    ],
)
def test_malformed_weights_are_refused_naming_the_field(fields, error, phrase):
    with pytest.raises(error, match=phrase) as e:
        _weight(**fields)
    assert str(e.value).startswith("QuantizedWeight.") and "\n" not in str(e.value)


def test_what_the_checks_accept_means_the_same_to_every_reader():
    wide = np.arange(256 * 64, dtype=np.uint32).reshape(256, 64) % 16  # any unsigned type holding 0..15
    qw = _weight(codes=wide, zeros=np.full((2, 64), 8, np.uint16))
    assert qw.codes.dtype == np.uint8 and np.array_equal(qw.codes, wide) and qw.zeros.dtype == np.uint8
    zero_group = np.full((256, 64), 8, np.uint8)  # every code at the zero point: a zero scale is harmless
    assert _weight(codes=zero_group, scales=np.zeros((2, 64), np.float16)) is not None


@pytest.mark.parametrize("value", [1e6, np.nan, np.inf, -np.inf, 65500.0])
def test_quantize_refuses_what_its_element_type_cannot_hold(value):
    W = np.random.default_rng(0).standard_normal((256, 64))
    W[5, 7] = value
    with pytest.raises(ValueError, match="finite|overflowing") as e:
        ref.quantize(W, 128)
    assert "\n" not in str(e.value)


def test_bfloat16_holds_what_float16_cannot():
    W = np.random.default_rng(0).standard_normal((256, 64)) * 1e6
    qw = ref.quantize(W, 128, dtype="bfloat16")
    assert np.isfinite(ref.dequantize(qw).astype(np.float32)).all()


def test_from_linear_refuses_a_layer_whose_quantized_weights_would_overflow():
    torch = pytest.importorskip("torch")
    from steps.torch.layer import MarlinLinear

    linear = torch.nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight[3, 5] = 1e6
    with pytest.raises(ValueError, match="overflowing float16"):
        MarlinLinear.from_linear(linear)


# -- Hypothesis: malformed weights ------------------------------------------------------------------

K, N = 256, 64
CODE_DTYPES = [np.uint8, np.uint16, np.uint32, np.int8, np.int32, np.float32, np.bool_]
SCALE_DTYPES = [np.float16, BF16, np.float32]


@st.composite
def maybe_malformed_weights(draw):
    group_size = draw(st.sampled_from([-1, 32, 64, 128, 0, 7, 100, K, 2 * K, -2, 128.0, True, "128"]))
    groups = 1 if group_size in (-1, True) or not isinstance(group_size, int) or group_size <= 0 else max(1, K // group_size)
    code_shape = draw(st.sampled_from([(K, N), (K, N), (K, N), (K,), (K, N, 1), (0, N)]))
    codes = np.full(code_shape, draw(st.integers(-2, 18))).astype(draw(st.sampled_from(CODE_DTYPES)))
    if codes.size:
        codes.flat[draw(st.integers(0, codes.size - 1))] = draw(st.integers(0, 15))
    scale_shape = draw(st.sampled_from([(groups, N), (groups, N), (groups + 1, N), (N,), (groups, N + 8)]))
    scale_value = draw(st.sampled_from([0.01, -0.02, 0.0, np.nan, np.inf, 1e-7, 3e4]))
    scales = np.full(scale_shape, 0.01).astype(draw(st.sampled_from(SCALE_DTYPES)))
    if scales.size:
        scales.flat[draw(st.integers(0, scales.size - 1))] = scale_value
    zeros = draw(st.sampled_from([None, None, "ok", "big", "signed", "shape"]))
    if zeros is not None:
        zeros = {
            "ok": lambda: np.full(scale_shape, 8, np.uint8),
            "big": lambda: np.full(scale_shape, 16, np.uint8),
            "signed": lambda: np.full(scale_shape, 8, np.int16),
            "shape": lambda: np.full((groups + 2, N), 8, np.uint8),
        }[zeros]()
    return codes, scales, group_size, zeros


@given(maybe_malformed_weights(), st.integers(0, 2**32 - 1))
def test_any_weight_is_refused_clearly_or_computes_what_the_reference_computes(fields, seed):
    try:
        qw = ref.QuantizedWeight(*fields)
    except (TypeError, ValueError) as e:
        message = str(e)
        assert message.startswith("QuantizedWeight.") and "\n" not in message, message
        return
    codes, scales, group_size, zeros = fields
    assert np.array_equal(qw.codes, codes)  # accepted means unchanged in value
    A = np.random.default_rng(seed).standard_normal((3, qw.K)).astype(qw.dtype)
    expected = ref.reference_gemm(A, qw)
    try:
        packed = S0.pack(qw)
    except ValueError as e:  # a valid weight this rung does not take (group size 7, say): said so
        assert "s0_numpy" in str(e) and "\n" not in str(e)
        return
    C = S0(A, packed)
    np.testing.assert_array_equal(np.isnan(C.astype(np.float32)), np.isnan(expected.astype(np.float32)))
    assert ref.error_excess(np.nan_to_num(C), A, qw, S0.error_c) <= 1 or not np.isfinite(expected.astype(np.float32)).all()


@given(
    st.sampled_from([(4, 8), (256, 64), (128, 3)]),
    st.sampled_from([np.nan, np.inf, -np.inf, 1e5, 7e4, 1.0, -3.0]),
    st.sampled_from([-1, 32, 128]),
    st.booleans(),
    st.sampled_from(["float16", "bfloat16"]),
)
def test_quantize_gives_a_finite_weight_or_a_clear_error(shape, value, group_size, symmetric, dtype):
    W = np.random.default_rng(0).standard_normal(shape)
    W[0, 0] = value
    try:
        qw = ref.quantize(W, group_size, symmetric, dtype)
    except ValueError as e:
        assert "\n" not in str(e) and ("W " in str(e) or "group_size" in str(e) or "K=" in str(e)), str(e)
        return
    assert np.isfinite(ref.dequantize(qw).astype(np.float32)).all()


# -- Hypothesis: CLI arguments -------------------------------------------------------------------

BAD_ARGUMENTS = [
    ["--batch", "0"], ["--batch", "-1"], ["--batch", "x"], ["--rungs", "s9_nothing"], ["--rungs", "s6_marlin"],
    ["--shapes", "banana"], ["--shapes", "0,5"], ["--shapes", "ideal"], ["--group-size", "100"], ["--plot", "p.banana"],
    ["--json", "."],
]  # fmt: skip
GOOD_ARGUMENTS = [["--batch", "1"], ["--rungs", "s0_numpy"], ["--shapes", "256,64"], ["--group-size", "-1"], ["--quiet"]]


@given(st.lists(st.sampled_from(GOOD_ARGUMENTS), max_size=3), st.sampled_from(BAD_ARGUMENTS), st.integers(0, 3))
def test_bench_refuses_any_bad_argument_before_working(good, bad, at):
    import contextlib
    import io

    from steps.harness.cli import main

    args = [a for pair in good[:at] for a in pair] + bad + [a for pair in good[at:] for a in pair]
    argv = ["bench", "--cpu", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    assert rc not in (0, None), (argv, out.getvalue())
    assert "Traceback" not in err.getvalue() and err.getvalue().strip(), argv
    assert "Benchmarking" not in out.getvalue(), argv  # nothing ran


# -- s1 under Numba's simulator, from several threads ----------------------------------------------


def test_s1_under_the_simulator_is_safe_from_several_threads():
    """The simulator swaps the kernel module's globals during a launch; without the lock in
    steps/s1_numba_naive.py, concurrent launches fail with "'Thread' object has no attribute
    'blockIdx'"."""
    import threading

    s1 = steps.get("s1_numba_naive")
    if not (s1.available() and s1.host_arrays):
        pytest.skip("runs where s1 is simulated (NUMBA_ENABLE_CUDASIM=1, as conftest sets on CPU machines)")
    rng = np.random.default_rng(0)
    packed = s1.pack(ref.random_quantized_weight(rng, 128, 32, 32))
    A = rng.standard_normal((2, 128)).astype(np.float16)
    expected, failures = s1(A, packed), []

    def launch_twice():
        try:
            for _ in range(2):
                np.testing.assert_array_equal(s1(A, packed), expected)
        except Exception as e:  # collected: an exception in a thread would not fail the test
            failures.append(repr(e))

    threads = [threading.Thread(target=launch_twice) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
