"""Shared fixtures: one test body runs on NumPy and, when a GPU is present, on CuPy.

Every skip for want of a GPU says "no usable GPU". With MINIREUSE_REQUIRE_GPU set (the GPU
check, scripts/gpu_check.sh) such a skip is a failure: a GPU run must not pass by
skipping its GPU cases. With MINIREUSE_GPU_ONLY set, only the GPU cases are collected (the
check's test stage: the CPU cases are the CPU suite's, and the whole suite would not fit the
stage's minutes on a GPU loan). A GPU case is a test parametrised with "gpu" or one whose skip
condition says NO_GPU.
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


def is_gpu_case(item):
    """Whether a collected test runs on a GPU where there is one (and skips saying NO_GPU where not)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "gpu" in callspec.params.values():
        return True
    return any(NO_GPU in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("MINIREUSE_GPU_ONLY"):
        return
    keep = [item for item in items if is_gpu_case(item)]
    config.hook.pytest_deselected(items=[item for item in items if not is_gpu_case(item)])
    items[:] = keep


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
