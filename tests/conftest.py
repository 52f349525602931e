"""Shared fixtures: one test body runs on NumPy and, when a GPU is present, on CuPy.

Every skip for want of a GPU says "no usable GPU". With MINIREUSE_REQUIRE_GPU set (the GPU
check, scripts/gpu_check.sh) such a skip is a failure: a GPU run must not pass by
skipping its GPU cases.
"""
import os

import numpy as np
import pytest

from minireuse import backend

NO_GPU = "no usable GPU"


def _devices():
    gpu = pytest.param("gpu", marks=pytest.mark.skipif(
        not backend.gpu_available(), reason=f"{NO_GPU}/cupy on this machine"))
    return ["cpu", gpu]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if os.environ.get("MINIREUSE_REQUIRE_GPU") and report.skipped and NO_GPU in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"MINIREUSE_REQUIRE_GPU: a GPU case was skipped: {report.longrepr}"


@pytest.fixture(autouse=True)
def cpu_by_default():
    """Every test starts on the CPU, whatever the machine has: on a GPU machine 'auto' would
    pick CuPy, and a test building layers without the ``device`` fixture would mix CuPy
    parameters with NumPy inputs. GPU cases opt in through ``device``."""
    old = backend._state["device"]
    backend.set_device("cpu")
    yield
    backend._state["device"] = old


@pytest.fixture(params=_devices())
def device(request):
    """Select the device for the test; yields the array module."""
    old = backend._state["device"]
    backend.set_device(request.param)
    yield backend.xp()
    backend._state["device"] = old


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def data(tmp_path):
    """A small CIFAR-10 in the official layout (16 images per training batch, 24 test images)."""
    from cifar_fixture import write_cifar_fixture
    d = tmp_path / "data"
    write_cifar_fixture(str(d), n_per_batch=16, n_test=24)
    return str(d)
