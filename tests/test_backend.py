import types

import numpy as np
import pytest

from minireuse import backend
from minireuse.layers import Dense


def test_numpy_arrays_pick_numpy():
    assert backend.get_array_module(np.zeros(2), np.ones(3)) is np


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device must be one of"):
        backend.set_device("tpu")


@pytest.mark.skipif(backend.gpu_available(), reason="checks the error raised where no GPU is usable")
def test_gpu_request_without_gpu_carries_cupy_reason():
    with pytest.raises(backend.DeviceError) as e:
        backend.set_device("gpu")
    assert "cannot be used" in str(e.value)
    assert backend.gpu_unavailable_reason() in str(e.value)
    assert backend.set_device("auto") == "cpu"


@pytest.mark.skipif(not backend.gpu_available(), reason="no usable GPU: mixing numpy and cupy arrays needs one")
def test_mixing_numpy_and_cupy_names_both():
    import cupy
    with pytest.raises(backend.BackendMismatchError, match="numpy.ndarray.*cupy.ndarray"):
        backend.get_array_module(np.zeros(2), cupy.zeros(2))
    backend.set_device("gpu")
    layer = Dense(3, 2)
    with pytest.raises(backend.BackendMismatchError, match="mixed numpy and cupy"):
        layer.forward(np.zeros((1, 3), dtype=np.float32))


def test_mixing_is_detected_by_type(monkeypatch):
    class FakeCupy:  # stands in for a cupy array on a CPU-only machine
        shape = (2,)
    monkeypatch.setattr(backend, "is_cupy_array", lambda a: isinstance(a, FakeCupy))
    with pytest.raises(backend.BackendMismatchError, match="FakeCupy"):
        backend.get_array_module(np.zeros(2), FakeCupy())


def test_seeding_makes_cpu_runs_reproducible():
    backend.set_device("cpu")
    draws = []
    for _ in range(2):
        backend.seed(3)
        draws.append(np.random.rand(3))
        draws.append(backend.random_generator((3, 1)).random(3))
    np.testing.assert_array_equal(draws[0], draws[2])
    np.testing.assert_array_equal(draws[1], draws[3])
    assert not np.array_equal(draws[1], backend.random_generator((3, 2)).random(3))


def test_tests_start_on_the_cpu_whatever_the_machine_has():
    """conftest's cpu_by_default: a GPU machine's 'auto' would put layers built here on CuPy."""
    assert backend._state["device"] == "cpu"
    assert Dense(3, 2).params["W"].__class__ is np.ndarray


class DeviceCountingCupy:
    """Stands in for cupy on a CPU-only machine: one visible device, counted driver calls,
    and a kernel compiler that works or fails (a driver with no CUDA toolkit for NVRTC)."""

    def __init__(self, compiles):
        self.device_counts = 0
        self.compiles = compiles
        self.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=self._count))

    def _count(self):
        self.device_counts += 1
        return 1

    def zeros(self, n, dtype):
        a = np.zeros(n, dtype)
        return types.SimpleNamespace(array=a, get=lambda: a)

    def RawKernel(self, source, name):
        if not self.compiles:
            raise RuntimeError("CuPy failed to load libnvrtc.so.13: OSError: cannot open shared object file")
        return lambda grid, block, args: args[0].array.__iadd__(1)


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(compiles):
        fake = DeviceCountingCupy(compiles)
        monkeypatch.setattr(backend, "_cupy", fake)
        monkeypatch.setattr(backend, "_CUPY_ERROR", None)
        monkeypatch.setattr(backend, "_gpu_checked", {"usable": False}, raising=False)
        return fake
    return install


def test_a_device_that_cannot_compile_a_kernel_is_not_available(fake_gpu):
    """A driver-only machine (CuPy 14 without a toolkit or [ctk]): 'auto' falls back to the
    CPU with CuPy's reason instead of picking the GPU and crashing at the first kernel."""
    fake_gpu(compiles=False)
    assert not backend.gpu_available()
    assert backend.set_device("auto") == "cpu"
    with pytest.raises(backend.DeviceError, match=r"could not compile and run a kernel.*libnvrtc.*\[ctk\]"):
        backend.require_gpu()


def test_a_usable_gpu_is_checked_once(fake_gpu):
    fake = fake_gpu(compiles=True)
    for _ in range(5):
        assert backend.require_gpu() is fake
    assert backend.gpu_available() and fake.device_counts == 1
