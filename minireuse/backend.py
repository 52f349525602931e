"""Array-module selection: NumPy on the CPU, CuPy on a GPU.

This is the only module that imports cupy at top level (guarded). If the import
fails, the original exception is kept and re-raised, with its message, the moment
GPU work is requested, so the user sees cupy's own reason.

    from minireuse import backend
    backend.set_device("auto")        # or "cpu" / "gpu"; env MINIREUSE_DEVICE
    xp = backend.xp()                 # numpy or cupy
    xp = backend.get_array_module(a, b)   # from the arrays themselves
"""
import os

import numpy as np

try:  # pragma: no cover - depends on the machine
    import cupy as _cupy
    _CUPY_ERROR = None
except Exception as e:  # ImportError, or a CUDA library error raised on import
    _cupy = None
    _CUPY_ERROR = e

DEVICES = ("auto", "cpu", "gpu")
_state = {"device": None}


class DeviceError(RuntimeError):
    """A GPU was asked for and cannot be used."""


class BackendMismatchError(TypeError):
    """NumPy and CuPy arrays were mixed in one operation."""


def _gpu_unavailable_reason():
    if _cupy is None:
        return f"cupy could not be imported: {type(_CUPY_ERROR).__name__}: {_CUPY_ERROR}"
    try:
        n = _cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"cupy imported but CUDA reported: {type(e).__name__}: {e}"
    if n == 0:
        return "cupy imported but no CUDA device is present"
    return None


def gpu_available():
    """True when cupy imports and at least one CUDA device is visible."""
    return _gpu_unavailable_reason() is None


def require_gpu():
    """Return the cupy module or raise DeviceError carrying cupy's own reason."""
    reason = _gpu_unavailable_reason()
    if reason is not None:
        raise DeviceError(f"a GPU was requested but cannot be used ({reason}). "
                          "Install the cupy wheel matching your CUDA (see README) "
                          "or run with --device cpu.") from _CUPY_ERROR
    return _cupy


def set_device(device=None):
    """Select 'cpu', 'gpu' or 'auto' (GPU when available). Returns 'cpu' or 'gpu'."""
    device = (device or os.environ.get("MINIREUSE_DEVICE") or "auto").lower()
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "gpu":
        require_gpu()
    elif device == "auto":
        device = "gpu" if gpu_available() else "cpu"
    _state["device"] = device
    return device


def device():
    """The selected device name, choosing 'auto' on first use."""
    if _state["device"] is None:
        set_device()
    return _state["device"]


def xp():
    """The array module of the selected device."""
    return require_gpu() if device() == "gpu" else np


def is_cupy_array(a):
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def get_array_module(*arrays):
    """numpy or cupy, chosen from the arrays; mixing both raises BackendMismatchError."""
    kinds = {("cupy" if is_cupy_array(a) else "numpy") for a in arrays
             if a is not None and hasattr(a, "shape")}
    if len(kinds) > 1:
        desc = ", ".join(f"{type(a).__module__}.{type(a).__name__}{tuple(a.shape)}"
                         for a in arrays if a is not None and hasattr(a, "shape"))
        raise BackendMismatchError(
            f"mixed numpy and cupy arrays in one operation ({desc}); move them to one "
            "device with minireuse.backend.to_device(...) or asnumpy(...)")
    return _cupy if kinds == {"cupy"} else np


def to_device(a, dtype=None):
    """Copy a host or device array onto the selected device."""
    mod = xp()
    out = mod.asarray(a)
    return out.astype(dtype, copy=False) if dtype is not None else out


def asnumpy(a):
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    return _cupy.asnumpy(a) if is_cupy_array(a) else np.asarray(a)


def synchronize():
    """Wait for queued GPU work (a no-op on the CPU); used only by timers."""
    if device() == "gpu":
        _cupy.cuda.Stream.null.synchronize()


def seed(s):
    """Seed NumPy's and (when on GPU) CuPy's global generators."""
    np.random.seed(s)
    if device() == "gpu":
        _cupy.random.seed(s)


def scatter_add(out, index, values):
    """out[index] += values with repeated indices accumulated (in place)."""
    mod = get_array_module(out, index, values)
    if mod is np:
        np.add.at(out, index, values)
    else:
        import cupyx
        cupyx.scatter_add(out, index, values)
    return out


def random_generator(seed):
    """A random generator on the selected device: numpy's Generator or cupy's.

    ``seed`` may be an int or a tuple of ints (e.g. (run_seed, epoch, step)).
    """
    if device() == "gpu":
        ss = np.random.SeedSequence(seed)
        return _cupy.random.default_rng(int(ss.generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(seed)
