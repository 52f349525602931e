"""What every product of the CUDA fast path runs on, the device side: sources, checks, device layers.

- sources: ``kernels/*.cu`` pasted into one translation unit, one
  ``minireuse.kernels.runtime.KernelModule`` (signatures read from the source, every launch
  checked against them, built for the GPU or the host);
- device layers: ``CupyDevice`` (CuPy arrays, NVRTC kernels, cuBLAS, pinned
  asynchronous copies) and ``HostDevice`` (NumPy arrays, the kernels' host build,
  ``numpy.matmul`` for the batched GEMM, copies that land at once or after a chosen
  lag). The products call only this layer, so their Python code runs unchanged on
  both; ``using_device`` swaps it (tests);
- checks, grids and sizes: launch arguments checked before a launch, grid shapes,
  the compiled hash widths and table sizes, the padded hash parameters.

The capacity side (workspace, table capacities) is capacity.py.
"""
import contextlib
import glob
import os
import re

import numpy as np

from ... import backend
from ...kernels import runtime
from .. import lsh

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
HEADER = "reuse_common.cuh"
COMPILE_OPTIONS = ("--std=c++17",)

# Must match reuse_common.cuh.
STAT_MAX_DISTINCT, STAT_SUM_DISTINCT, STAT_OVERFLOW, STAT_TABLE_FULL, STAT_COUNT = 0, 1, 2, 3, 4

RMS_BLOCKS = 1024           # input_rms: partial sums buffer size = max grid
PROBE_LIMIT = 256           # table probes before a (row, group) is computed exactly
SMEM_LIMIT = 48 * 1024      # default dynamic shared memory per block
MAX_GRID_Y = 65535
INT32_LIMIT = 2 ** 31 - 1
ROW_BLOCK = (32, 8, 1)      # lanes along the output columns, 8 runs of rows per block
RUN = 4                     # consecutive rows per thread (REUSE_RUN in reuse_common.cuh)


def kernel_sources():
    """Paths of the CUDA sources (``kernels/*.cu``), sorted."""
    return sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cu")))


def kernel_header():
    """Path of the header every kernel source includes."""
    return os.path.join(KERNEL_DIR, HEADER)


def module_source():
    """All kernel sources as one translation unit, the header pasted in place of its #include."""
    with open(kernel_header()) as f:
        header = f.read()
    include = re.compile(r'^#include "' + re.escape(HEADER) + r'"\s*$', re.M)
    parts = []
    for path in kernel_sources():
        with open(path) as f:
            parts.append(include.sub(lambda _: header, f.read()))
    return "\n".join(parts)


MODULE = runtime.KernelModule("minireuse/reuse/kernels/*.cu", module_source, gpu_options=COMPILE_OPTIONS)


def kernel_signatures():
    """{kernel: runtime.Signature} of every extern "C" kernel in the sources."""
    return MODULE.signatures()


def check_launch_args(name, args, block=(1,)):
    """Raise TypeError/ValueError unless args (and block) fit kernel ``name`` (see runtime.check_launch)."""
    runtime.check_launch(MODULE.signature(name), (1,), block, args, device().is_array)


# ---------------------------------------------------------------- device layers

class CupyDevice:
    """The few CuPy/CUDA calls of the fast path: memory, launches, cuBLAS, async copies."""

    kind = "gpu"
    array_name = "cupy.ndarray"

    def __init__(self):
        self._cupy = None

    @property
    def xp(self):
        if self._cupy is None:
            self._cupy = backend.require_gpu()
        return self._cupy

    @property
    def runner(self):
        return MODULE.gpu()

    def is_array(self, a):
        return backend.is_cupy_array(a)

    def launch(self, name, grid, block, args, shared_mem=0):
        """Launch kernel ``name`` (arguments checked against its signature; None = null)."""
        self.runner.launch(name, grid, block, args, shared_mem)

    def carve(self, buf, offset, shape, dtype):
        """A typed view of bytes [offset, ...) of the uint8 buffer buf."""
        return self.xp.ndarray(shape, dtype, memptr=buf.data + offset)

    def memset(self, a, byte):
        a.data.memset_async(byte, a.nbytes)

    def copy(self, dst, src):
        """dst[...] = src for contiguous arrays of equal size, as one async memcpy."""
        dst.data.copy_from_device_async(src.data, src.nbytes)

    def gemm_strided_batched(self, op_b, op_a, m, n, k, b, ldb, stride_b, a, lda, stride_a,
                             beta, c, ldc, stride_c, batch):
        """cublasSgemmStridedBatched, column-major arguments (see matmul.batched_gemm)."""
        cp = self.xp
        from cupy_backends.cuda.libs import cublas
        alpha_h = np.array(1.0, dtype=np.float32)
        beta_h = np.array(beta, dtype=np.float32)
        ops = {False: cublas.CUBLAS_OP_N, True: cublas.CUBLAS_OP_T}
        cublas.sgemmStridedBatched(
            cp.cuda.device.get_cublas_handle(), ops[op_b], ops[op_a], m, n, k,
            alpha_h.ctypes.data, b.data.ptr, ldb, stride_b, a.data.ptr, lda, stride_a,
            beta_h.ctypes.data, c.data.ptr, ldc, stride_c, batch)

    def capturing(self):
        """Whether the current stream is being captured into a CUDA graph (backend.is_capturing)."""
        return backend.is_capturing()

    def reader(self, n):
        """A ring of pinned slots reading n int32 device values back without waiting."""
        return backend.AsyncReader(n, np.int32, xp=self.xp)


class HostReader:
    """AsyncReader's interface on the host: a request lands once ``lag`` later requests
    were made (0: at once), as when the GPU runs ``lag`` calls behind the host."""

    def __init__(self, n, lag=0):
        self.n, self.lag = n, lag
        self._pending = []
        self._latest = None

    def request(self, a, tag=None):
        self._pending.append((np.array(a, dtype=np.int32).reshape(self.n), tag))
        self._land(self.lag)

    def _land(self, keep):
        while len(self._pending) > keep:
            self._latest = self._pending.pop(0)

    def latest(self):
        return self._latest

    def replayed(self, tag=None):
        """No graphs on the host: nothing was captured."""


class HostDevice:
    """The device layer on the host: NumPy arrays and the kernels' host build.

    lag: how many calls the simulated device runs behind the host (statistics of a
    call land ``lag`` calls later). The batched GEMM follows cuBLAS's column-major
    strided-batched convention exactly, so the row-major mapping of its callers is
    tested too.
    """

    kind = "host"
    array_name = "numpy.ndarray"
    xp = np

    def __init__(self, lag=0):
        self.lag = lag

    @property
    def runner(self):
        return MODULE.host()

    def is_array(self, a):
        return isinstance(a, np.ndarray)

    def launch(self, name, grid, block, args, shared_mem=0):
        self.runner.launch(name, grid, block, args, shared_mem)

    def carve(self, buf, offset, shape, dtype):
        return np.ndarray(shape, dtype, buffer=buf, offset=offset)

    def memset(self, a, byte):
        a.reshape(-1).view(np.uint8)[...] = byte

    def copy(self, dst, src):
        dst.reshape(-1)[...] = src.reshape(-1)

    @staticmethod
    def _column_major(buf, rows, cols, ld, stride, batch):
        s = buf.itemsize
        return np.lib.stride_tricks.as_strided(buf.reshape(-1), (batch, rows, cols), (stride * s, s, ld * s))

    def gemm_strided_batched(self, op_b, op_a, m, n, k, b, ldb, stride_b, a, lda, stride_a,
                             beta, c, ldc, stride_c, batch):
        """C_i = op(A_i) op(B_i) + beta C_i in cuBLAS's column-major terms (A = b, B = a)."""
        A = self._column_major(b, k, m, ldb, stride_b, batch).transpose(0, 2, 1) if op_b else \
            self._column_major(b, m, k, ldb, stride_b, batch)
        B = self._column_major(a, n, k, lda, stride_a, batch).transpose(0, 2, 1) if op_a else \
            self._column_major(a, k, n, lda, stride_a, batch)
        C = self._column_major(c, m, n, ldc, stride_c, batch)
        product = np.matmul(A, B, dtype=np.float32)
        C[...] = product if beta == 0.0 else product + np.float32(beta) * C

    def capturing(self):
        return False

    def reader(self, n):
        return HostReader(n, self.lag)


_state = {"device": CupyDevice()}


def device():
    """The device layer in use."""
    return _state["device"]


@contextlib.contextmanager
def using_device(layer):
    """Run the fast path on another device layer (e.g. ``HostDevice()``) inside the block."""
    old = _state["device"]
    _state["device"] = layer
    try:
        yield layer
    finally:
        _state["device"] = old


def launch(name, grid, block, args, shared_mem=0):
    device().launch(name, grid, block, args, shared_mem)


# ---------------------------------------------------------------- checks

def check(name, a, dtype, shape=None):
    """Raise TypeError/ValueError naming ``name`` unless a is a C-contiguous device array as expected.

    shape: expected shape, None entries match any size.
    """
    d = device()
    if not d.is_array(a):
        raise TypeError(f"{name}: expected a {d.array_name}, got {type(a).__module__}.{type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if shape is not None and (a.ndim != len(shape) or any(e is not None and e != s for e, s in zip(shape, a.shape))):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {a.strides} for shape {a.shape}")


def as_f32(name, a):
    """a as a C-contiguous float32 device array (copied only when needed); dtype must be float32."""
    if a is None:
        return None
    d = device()
    if not d.is_array(a):
        raise TypeError(f"{name}: expected a {d.array_name}, got {type(a).__module__}.{type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32 (the CUDA path is float32 only), got {a.dtype.name}; "
                        "use ReuseConfig(impl='reference') for other dtypes")
    return d.xp.ascontiguousarray(a)


def check_index_range(what, n):
    if n > INT32_LIMIT:
        raise ValueError(f"{what}: {n} elements exceed the kernels' int32 indexing ({INT32_LIMIT}); "
                         "split the batch")


def grid_1d(total, block=256, most=16384):
    """Grid of a 1-D grid-stride launch over ``total`` items."""
    return (runtime.grid_blocks(device().runner, -(-total // block), most),)


def row_grid(rows, cols, most=4096):
    """Grid of the (32, 8) row kernels: column blocks x blocks of 8 runs of RUN rows (grid-strided)."""
    return (-(-cols // ROW_BLOCK[0]), runtime.grid_blocks(device().runner, -(-rows // (ROW_BLOCK[1] * RUN)), most))


def i32(v):
    return np.int32(v)


def hash_bits_bucket(H):
    """The compiled bit count (8, 16, 32 or 64) that holds H bits."""
    if not 1 <= H <= 64:
        raise ValueError(f"H: expected 1..64, got {H}")
    return 8 if H <= 8 else 16 if H <= 16 else 32 if H <= 32 else 64


def table_size(capacity):
    """Slots per group: a power of two, at least twice the capacity (load <= 1/2)."""
    return max(64, 1 << (2 * capacity - 1).bit_length())


def padded_hash_params(state, config, G):
    """Planes (Gp, L, HB) and unit offsets (Gp, HB) on the device, zero-padded from H to HB bits."""
    return state.hash_params(config.L, config.H, G, config.family, config.seed, config.shared_planes,
                             device().xp, np.float32, pad_to=hash_bits_bucket(config.H))


def pad_hash_params(planes, offsets):
    """(planes (Gp, L, HB), offsets (Gp, HB)) from (Gp, L, H) and (Gp, H), zeros beyond H."""
    return lsh.pad_bits(planes, offsets, hash_bits_bucket(planes.shape[2]))
