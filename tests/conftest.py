"""Test configuration: GPU detection, Numba's simulator on CPU machines, Hypothesis profiles.

Without a CUDA device, Numba's CUDA simulator is switched on before anything imports
Numba, so rung 1 runs (slowly, on small shapes) on CPU machines such as CI.
Tests marked `gpu` are skipped where no usable CUDA device is present.

Hypothesis profiles: `ci` (the default) runs a modest number of examples per property;
`thorough` runs many more: HYPOTHESIS_PROFILE=thorough pytest.
"""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings


def _cuda_device_present() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


HAS_GPU_NODE = _cuda_device_present()
if not HAS_GPU_NODE:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def gpu_usable() -> bool:
    from steps._cuda import gpu_support

    return bool(gpu_support())


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not (HAS_GPU_NODE and gpu_usable()):
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
