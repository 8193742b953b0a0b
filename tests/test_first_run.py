"""A kernel variant runs only after it matched the reference once on this kind of GPU.

CPU tests drive the verdict cache and MarlinLinear's fallback with fake probes and fake
rungs; GPU tests inject a deliberately broken variant of s6 (compiled with the zero-point
define flipped, so it reads the scales as zero points and writes wrong values) and show it
is refused, that MarlinLinear falls back past it, and that a passed variant costs later
launches one dict lookup.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import replace

import numpy as np
import pytest

import reference as ref
from steps._first_run import VariantRefused, Verdicts
from steps.step import Step


class Probe:
    """A probe that returns `result` (or raises it) and counts its runs."""

    def __init__(self, result=""):
        self.result, self.runs = result, 0

    def __call__(self):
        self.runs += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_a_passing_variant_is_probed_once_then_remembered_in_memory_and_on_disk(tmp_path):
    verdicts, probe = Verdicts(tmp_path), Probe()
    for _ in range(3):
        verdicts.check("k", "s9 variant A", probe, lambda: "digest")
    assert probe.runs == 1 and verdicts.passed("k")
    fresh, again = Verdicts(tmp_path), Probe()  # a later process
    fresh.check("k", "s9 variant A", again, lambda: "digest")
    assert again.runs == 0 and fresh.passed("k")


@pytest.mark.parametrize("failure", ["its largest error is 7 times the bound", RuntimeError("illegal instruction")])
def test_a_failing_variant_is_refused_by_name_and_stays_refused(tmp_path, failure):
    verdicts, probe = Verdicts(tmp_path), Probe(failure)
    for _ in range(2):
        with pytest.raises(VariantRefused, match="s9 variant B failed its first-run check") as e:
            verdicts.check("k", "s9 variant B", probe, lambda: "digest")
    assert probe.runs == 1 and not verdicts.passed("k")
    assert ("illegal instruction" if isinstance(failure, Exception) else "7 times") in str(e.value)
    assert str(tmp_path) in str(e.value)  # says which file to delete to retry
    with pytest.raises(VariantRefused):
        Verdicts(tmp_path).check("k", "s9 variant B", Probe(), lambda: "digest")


def test_a_check_that_crashed_an_earlier_process_refuses_without_running_again(tmp_path):
    import json
    import socket

    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    (tmp_path / "digest.json").write_text(json.dumps({"verdict": "pending", "pid": dead, "host": socket.gethostname()}))
    probe = Probe()
    with pytest.raises(VariantRefused, match="never finished"):
        Verdicts(tmp_path).check("k", "s9 variant C", probe, lambda: "digest")
    assert probe.runs == 0


def test_a_check_another_live_process_is_running_is_run_here_too(tmp_path):
    import json
    import socket

    (tmp_path / "digest.json").write_text(json.dumps({"verdict": "pending", "pid": os.getppid(), "host": socket.gethostname()}))
    probe = Probe()
    Verdicts(tmp_path).check("k", "s9 variant D", probe, lambda: "digest")
    assert probe.runs == 1


def test_the_probe_may_launch_the_variant_it_checks(tmp_path):
    verdicts = Verdicts(tmp_path)

    def probe():  # the probe's own launch goes through the same check
        verdicts.check("k", "s9 variant E", probe, lambda: "digest")
        return ""

    verdicts.check("k", "s9 variant E", probe, lambda: "digest")
    assert verdicts.passed("k")


def test_a_read_only_cache_folder_only_costs_a_recheck(tmp_path):
    blocked = tmp_path / "file_not_folder"
    blocked.write_text("")
    verdicts, probe = Verdicts(blocked / "sub"), Probe()
    verdicts.check("k", "s9 variant F", probe, lambda: "digest")
    assert probe.runs == 1 and verdicts.passed("k")


# -- MarlinLinear falls back past a refused rung, saying so once ----------------------------------


class FakeRung(Step):
    device = "cuda"

    def __init__(self, name: str, refuse: bool):
        self.name, self.refuse = name, refuse

    def check_first_run(self, K, N, group_size, zero_points, dtype, device):
        if self.refuse:
            raise VariantRefused(f"kernel variant {self.name} rung failed its first-run check on this GPU: wrong values")


def test_marlin_linear_falls_back_to_the_next_rung_that_passes_and_says_so_once(monkeypatch):
    torch = pytest.importorskip("torch")
    from steps.torch import layer

    monkeypatch.setattr(layer, "STEPS", (FakeRung("s_low", False), FakeRung("s_high", True)))
    monkeypatch.setattr(layer, "_why_not", lambda step, device, qw, sparse: "")
    monkeypatch.setattr(layer, "_FALLBACKS_SAID", set())
    qw = ref.random_quantized_weight(np.random.default_rng(0), 256, 64, 128)
    with pytest.warns(RuntimeWarning, match="runs on s_low instead: s_high: kernel variant s_high"):
        assert layer.select_step(qw, torch.device("cuda:0")).name == "s_low"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert layer.select_step(qw, torch.device("cuda:0")).name == "s_low"
    monkeypatch.setattr(layer, "STEPS", (FakeRung("s_high", True),))
    with pytest.raises(ValueError, match="first-run check"):
        layer.select_step(qw, torch.device("cuda:0"))


# -- on the GPU: a broken variant is caught ---------------------------------------------------------


def _broken_marlin():
    from steps.s5_async_pipeline import _load
    from steps.s6_marlin import Marlin

    class BrokenMarlin(Marlin):
        """s6 whose compiled variants ignore zero points: on weights that have them they
        write wrong values without faulting, as a miscompiled variant would. (Reading zero
        points that are not there instead would fault, and a fault leaves the process's CUDA
        context unusable for every later test.)"""

        name = "s6_marlin_broken_for_test"

        def kernel(self, cfg, device):
            self.first_run_check(cfg, device, functools.partial(self._probe_variant, cfg))
            return _load("s6_marlin", replace(cfg, zero_points=False), device)

    return BrokenMarlin()


@pytest.fixture
def private_verdicts(tmp_path, monkeypatch):
    from steps._first_run import VERDICTS

    monkeypatch.setattr(VERDICTS, "directory", tmp_path)
    VERDICTS.forget()
    yield VERDICTS
    VERDICTS.forget()


@pytest.mark.gpu
def test_a_broken_variant_is_refused_and_marlin_linear_falls_back(private_verdicts, monkeypatch):
    import cupy
    import torch

    from steps.torch import layer

    broken = _broken_marlin()
    qw = ref.random_quantized_weight(np.random.default_rng(1), 1024, 512, 128, symmetric=False)
    A = cupy.asarray(np.random.default_rng(2).standard_normal((1, 1024)).astype(np.float16))
    packed = broken.pack(qw)
    for _ in range(2):  # refused, and again without re-running the check
        with pytest.raises(VariantRefused, match="s6_marlin_broken_for_test .* failed its first-run check"):
            broken(A, packed)
    monkeypatch.setattr(layer, "STEPS", (*layer.STEPS, broken))
    monkeypatch.setattr(layer, "_FALLBACKS_SAID", set())
    with pytest.warns(RuntimeWarning, match="instead: s6_marlin_broken_for_test"):
        linear = layer.MarlinLinear(qw, device="cuda")
    assert linear.step == "s6_marlin"
    x = torch.from_numpy(A.get()).cuda()
    np.testing.assert_array_equal(linear(x).cpu().numpy(), layer.MarlinLinear(qw, device="cuda", step="s6_marlin")(x).cpu().numpy())


@pytest.mark.gpu
def test_a_passed_variant_costs_later_launches_nothing(private_verdicts, monkeypatch):
    import cupy

    from steps.registry import get

    step = get("s6_marlin")
    runs = []
    original = type(step)._probe_variant
    monkeypatch.setattr(type(step), "_probe_variant", lambda self, cfg, device: runs.append(cfg) or original(self, cfg, device))
    qw = ref.random_quantized_weight(np.random.default_rng(3), 4096, 4096, 128)
    A = cupy.asarray(np.random.default_rng(4).standard_normal((1, 4096)).astype(np.float16))
    packed = step.pack(qw)
    step(A, packed)
    assert len(runs) == 1  # the first launch of the variant ran the check
    cfg = runs[0]
    start = time.perf_counter()
    for _ in range(1000):
        step.kernel(cfg, packed.device)
    per_call_us = (time.perf_counter() - start) * 1e3
    for _ in range(10):
        step(A, packed)
    assert len(runs) == 1
    print(f"kernel lookup with a passed verdict: {per_call_us:.2f} µs per call")
    assert per_call_us < 20


def test_every_cuda_rung_checked_as_a_whole_has_a_probe_problem():
    from steps._cuda import PROBE_PROBLEMS, CudaStep
    from steps.registry import STEPS

    for step in STEPS:
        if isinstance(step, CudaStep) and not step.checks_each_variant:
            assert any(step.supports(*p) for p in PROBE_PROBLEMS), step.name
