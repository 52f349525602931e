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


# One tiny kernel that gpu_available() compiles and runs: CuPy's wheels compile kernels
# with NVRTC from a CUDA toolkit (CuPy 14: a local one or the [ctk] extra), so a machine
# with a driver and a device but no toolkit counts devices and fails at the first kernel.
_PROBE_KERNEL = r'''extern "C" __global__ void minireuse_probe(float* a) { a[threadIdx.x] += 1.0f; }'''
_gpu_checked = {"usable": False}


def gpu_unavailable_reason():
    """None when a GPU is usable (cupy imports, a device is visible, a tiny kernel compiles and
    runs), else why not."""
    if _gpu_checked["usable"]:
        return None
    if _cupy is None:
        return f"cupy could not be imported: {type(_CUPY_ERROR).__name__}: {_CUPY_ERROR}"
    try:
        n = _cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"cupy imported but CUDA reported: {type(e).__name__}: {e}"
    if n == 0:
        return "cupy imported but no CUDA device is present"
    reason = _kernel_probe_reason()
    # a usable GPU stays usable: the checks above cost a driver call (and the probe a
    # compile), too much for every layer, phase and step that asks
    _gpu_checked["usable"] = reason is None
    return reason


def _kernel_probe_reason():
    """None when one tiny kernel compiles and runs on the current device, else why not."""
    try:
        a = _cupy.zeros(1, dtype=np.float32)
        _cupy.RawKernel(_PROBE_KERNEL, "minireuse_probe")((1,), (1,), (a,))
        value = float(a.get()[0])
    except Exception as e:
        return (f"cupy sees a CUDA device but could not compile and run a kernel ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); CuPy 14 compiles with a "
                "local CUDA toolkit or the wheel's [ctk] extra, e.g. pip install 'cupy-cuda13x[ctk]'")
    if value != 1.0:
        return f"cupy ran a test kernel on the device and read back {value} instead of 1.0"
    return None


def gpu_available():
    """True when cupy imports, a CUDA device is visible and one tiny kernel compiles and runs
    on it (checked once per process after it succeeds)."""
    return gpu_unavailable_reason() is None


def require_gpu():
    """Return the cupy module or raise DeviceError carrying cupy's own reason."""
    reason = gpu_unavailable_reason()
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


def random_generator(seed):
    """A random generator on the selected device: numpy's Generator or cupy's.

    ``seed`` may be an int or a tuple of ints (e.g. (run_seed, epoch, step)).
    """
    if device() == "gpu":
        ss = np.random.SeedSequence(seed)
        return _cupy.random.default_rng(int(ss.generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- sync-free host <-> device scalars
#
# A training step on the GPU never waits for the device. Values the host sets every
# step (learning rate, dropout keys) go up through pinned memory with asynchronous
# copies; values the host wants to see (the running loss) come back the same way and
# are read only once their copy has landed. Both are plain array writes on the CPU.

_capture = {"active": False, "on_success": None}


class capturing:
    """Marks the code of its block as being recorded into a CUDA graph (see training/graphs.py).

    Layers and optimizers ask ``is_capturing()`` to keep host-side work (advancing a
    dropout key, counting a step) out of the recording: the graph runner does it
    before every replay instead. What must hold only for a recording that ended well
    (a call site that a replay will feed) is registered with ``on_capture_success`` and
    runs when the recorder calls ``succeeded()``; a failed recording (the step then
    runs eagerly) runs none of it.
    """

    def __enter__(self):
        self._outer = dict(_capture)
        self._on_success = []
        _capture.update(active=True, on_success=self._on_success)
        return self

    def __exit__(self, *exc):
        _capture.update(self._outer)
        return False

    def succeeded(self):
        """The recording of this block ended well: run what waited for that."""
        for fn in self._on_success:
            fn()


def on_capture_success(fn):
    """Run fn once the recording now in progress has ended well (``capturing.succeeded``);
    at once for a capture begun directly on the stream, outside any ``capturing`` block."""
    if _capture["on_success"] is None:
        fn()
    else:
        _capture["on_success"].append(fn)


def is_capturing():
    """Whether work issued now is being recorded into a CUDA graph: inside a ``capturing``
    block (the trainer's recording), or while the current CUDA stream captures (a capture
    begun directly on the stream, as the kernel tests do). The one capture flag of the code."""
    if _capture["active"]:
        return True
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.get_current_stream().is_capturing()
    except _cupy.cuda.runtime.CUDARuntimeError:     # cupy without a usable device
        return False


def _pinned_slots(slots, n, dtype):
    """(slots, n) host array in page-locked memory, zeroed, and the allocation that owns it."""
    cp = require_gpu()
    dtype = np.dtype(dtype)
    mem = cp.cuda.alloc_pinned_memory(max(slots * n * dtype.itemsize, 1))
    host = np.frombuffer(mem, dtype, slots * n).reshape(slots, n)
    host[...] = 0           # pinned memory comes uninitialised: no slot may ever read as garbage
    return host, mem


# How many steps the host may run ahead of the GPU: DeviceScalars waits only beyond that.
HOST_AHEAD = 64


class DeviceScalars:
    """n numbers in device memory that the host rewrites each step without waiting.

    Kernels recorded in a CUDA graph keep their launch arguments frozen, so anything
    that changes between steps (the learning rate, Adam's bias corrections, dropout
    keys) is read by the kernels from ``array`` instead. ``set(values)`` writes them
    into one of ``slots`` pinned host buffers and queues an asynchronous copy on the
    current stream; a buffer is reused only after its previous copy has run (a wait
    happens only when the GPU is ``slots`` steps behind the host). On NumPy, ``array``
    is simply overwritten.
    """

    def __init__(self, n, dtype=np.float64, xp=np, slots=HOST_AHEAD):
        self.n, self.dtype = int(n), np.dtype(dtype)
        self.array = xp.zeros(self.n, dtype=self.dtype)
        self.gpu = xp is not np
        if self.gpu:
            self._host, self._mem = _pinned_slots(slots, self.n, self.dtype)
            self._events = [None] * slots
            self._next = 0

    def set(self, values):
        if not self.gpu:
            self.array[...] = values
            return
        if is_capturing():
            raise RuntimeError("DeviceScalars.set inside a CUDA graph capture: the copy would read "
                               "the host buffer at replay time; set per-step values before the replay")
        cp = require_gpu()
        k = self._next
        self._next = (k + 1) % len(self._events)
        event = self._events[k]
        if event is not None and not event.done:
            event.synchronize()   # only when the GPU is a whole ring of steps behind
        self._host[k] = values
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(self.array.data.ptr, self._host[k].ctypes.data,
                                    self.n * self.dtype.itemsize,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        if event is None:
            event = self._events[k] = cp.cuda.Event(disable_timing=True)
        event.record(stream)


class AsyncReader:
    """Reads a small device array back to the host without waiting for the GPU.

    ``request(a, tag)`` queues a copy of ``a`` (n numbers, contiguous) into the next of a
    ring of pinned slots on the current stream, so it sees ``a`` exactly as it is at that
    point of the stream, and records an event. ``latest()`` returns (values, tag) of the
    newest request whose copy has landed (``event.done``), or the previous answer while
    none has: a progress bar reading it lags by a few requests instead of stalling the
    step. The ring holds twice as many requests as the host may run ahead of the GPU
    (HOST_AHEAD steps), and a landed answer is read before its slot is reused, so
    answers keep coming however far behind the GPU runs; a wait happens only when the
    GPU is a whole ring behind. ``wait()`` blocks for the newest request (epoch ends,
    errors). On NumPy a request is read at once.

    Inside a CUDA graph capture, ``request`` copies ``a`` into a device array of its own
    (the copy becomes a node of the graph; no event is recorded, since events recorded
    in a capture cannot be polled): after each replay, ``replayed(tag)`` queues that
    array's copy into the ring like any request.
    """

    def __init__(self, n, dtype=np.float64, xp=np, slots=2 * HOST_AHEAD):
        self.n, self.dtype = int(n), np.dtype(dtype)
        self.gpu = xp is not np
        self._latest = None
        if self.gpu:
            self._host, self._mem = _pinned_slots(slots, self.n, self.dtype)
            self._events = [None] * slots
            self._pending = []     # (slot, event, tag), oldest first
            self._next = 0
            # what a recorded graph copies into, allocated up front (no allocation ever
            # happens during a capture) and zeroed (a replay before any write reads zeros)
            self._captured = xp.zeros(self.n, dtype=self.dtype)

    def request(self, a, tag=None):
        if not self.gpu:
            self._latest = (np.array(a, dtype=self.dtype).reshape(self.n), tag)
            return
        cp = require_gpu()
        if a.dtype != self.dtype or a.size != self.n or not a.flags.c_contiguous:
            raise ValueError(f"AsyncReader reads {self.n} contiguous {self.dtype} values, "
                             f"got {a.dtype} array of shape {a.shape}")
        stream = cp.cuda.get_current_stream()
        if stream.is_capturing():
            cp.cuda.runtime.memcpyAsync(self._captured.data.ptr, a.data.ptr, self.n * self.dtype.itemsize,
                                        cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
            return
        self._queue(a, tag, stream)

    def _queue(self, a, tag, stream):
        cp = require_gpu()
        self.latest()              # an answer that landed is taken before its slot can be reused
        k = self._next
        self._next = (k + 1) % len(self._events)
        if self._pending and self._pending[0][0] == k:
            self._pending[0][1].synchronize()   # only when the GPU is a whole ring behind
            self.latest()
        cp.cuda.runtime.memcpyAsync(self._host[k].ctypes.data, a.data.ptr, self.n * self.dtype.itemsize,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        event = self._events[k]
        if event is None:
            event = self._events[k] = cp.cuda.Event(disable_timing=True)
        event.record(stream)
        self._pending.append((k, event, tag))

    def replayed(self, tag=None):
        """A graph whose capture called ``request`` was launched on the current stream:
        what it copied counts as the newest request (with ``tag``)."""
        if self.gpu:
            self._queue(self._captured, tag, require_gpu().cuda.get_current_stream())

    def clear(self):
        """Forget every request and answer (a new epoch)."""
        self._latest = None
        if self.gpu:
            self._pending = []

    def latest(self):
        """(values, tag) of the newest landed request, or None before any has landed."""
        if self.gpu:
            for i in range(len(self._pending) - 1, -1, -1):
                k, event, tag = self._pending[i]
                if event.done:
                    self._latest = (self._host[k].copy(), tag)
                    del self._pending[:i + 1]
                    break
        return self._latest

    def wait(self):
        """(values, tag) of the newest request, waiting for its copy if needed."""
        if self.gpu and self._pending:
            self._pending[-1][1].synchronize()
        return self.latest()


def describe_device():
    """'gpu: NAME (cupy V)' or 'cpu: PROCESSOR, N cores (numpy V)' for reports."""
    if device() == "gpu":
        props = _cupy.cuda.runtime.getDeviceProperties(_cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"gpu: {name} (cupy {_cupy.__version__})"
    import platform
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (numpy {np.__version__})"
