"""CUDA fast path of deep reuse: fused RawKernels plus batched cuBLAS GEMMs.

Same math as the reference path (lsh.py, clustering.py, matmul.py, conv.py),
which is its oracle in tests/test_cuda_kernels.py. The kernels live in
``kernels/*.cu`` (one page each in docs/kernels/) and are compiled once per
process into one ``cupy.RawModule``.

One reuse product, forward (general path; the pixel-aligned conv path is the
same with padded pixels as rows and channel groups as groups):

    memset x3           zero the small stats and the workspace; empty the tables
    input_rms           s = RMS of the input ('offset' family), stays on the device
    hash_rows_h{8,16,32}  code of every (row, group), inserted into the group's table
    centroid_sums       ids, member counts and centroid sums (atomics)
    cuBLAS              P = sums @ W_g for all groups in one strided-batched GEMM
    reconstruct_*       y[n] = sum_g P[g, id] / count (+ b), a gather
backward:
    cluster_sums_*      S = per-cluster sums of dY / count, db, overflow dW
    cuBLAS              dW_g += sums_g^T @ S_g
    dX 'exact'          cuBLAS dY @ W^T (+ col2im_gather for conv)
    dX 'cluster'        cuBLAS D = S @ W_g^T, then dx_cluster_* / col2im_gather

Nothing is copied to the host inside a call, so a forward + backward can be
captured in a CUDA graph. The tables have a fixed capacity (clusters per
group), sized from earlier calls' statistics (CapacityTracker). A cluster
beyond capacity is not dropped: its members get id -1 and every kernel
computes them exactly (as singleton clusters), so results never depend on the
capacity; the statistics make the next calls' capacity large enough.

Importing this module needs no GPU; cupy is imported through
minireuse.backend.require_gpu() on first use.
"""
import dataclasses
import glob
import math
import os
import re

import numpy as np

from .. import backend
from ..layers.conv import im2col
from . import conv as ref_conv
from . import matmul as ref_matmul

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
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


_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(([^)]*)\)')
_POINTEE = {"float": np.float32, "int": np.int32, "unsigned int": np.uint32,
            "unsigned long long": np.uint64}
_SCALAR = {"int": np.int32, "long long": np.int64, "float": np.float32}
_signatures = {}


def kernel_signatures():
    """{kernel: [(C type, parameter name), ...]} of every extern "C" kernel in the sources."""
    if not _signatures:
        for name, params in _SIGNATURE.findall(module_source()):
            parsed = []
            for p in params.split(","):
                m = re.match(r"\s*(?:const\s+)?([\w\s]+?)\s*(\*?)\s*(?:__restrict__\s+)?(\w+)\s*$", p)
                parsed.append((m.group(1) + m.group(2), m.group(3)))
            _signatures[name] = parsed
    return _signatures


def check_launch_args(name, args):
    """Raise TypeError unless args match kernel `name`'s parameters in number and type.

    Pointers take device arrays of the pointee's dtype (or None: null);
    scalars take numpy scalars of the exact width, which is what the kernel
    reads from the argument buffer.
    """
    sig = kernel_signatures().get(name)
    if sig is None:
        raise ValueError(f"kernel {name!r}: not defined in {KERNEL_DIR}/*.cu")
    if len(args) != len(sig):
        raise TypeError(f"kernel {name}: expected {len(sig)} arguments ({', '.join(p for _, p in sig)}), "
                        f"got {len(args)}")
    for (ctype, pname), a in zip(sig, args):
        if ctype.endswith("*"):
            want = _POINTEE[ctype[:-1]]
            if a is None or (_device.is_array(a) and a.dtype == want):
                continue
            got = f"{type(a).__name__} of {a.dtype.name}" if hasattr(a, "dtype") else type(a).__name__
            raise TypeError(f"kernel {name}: argument {pname} expected a device array of "
                            f"{np.dtype(want).name} (or None), got {got}")
        want = _SCALAR[ctype]
        if not (isinstance(a, np.generic) and a.dtype == want):
            raise TypeError(f"kernel {name}: argument {pname} expected a numpy {np.dtype(want).name} scalar, "
                            f"got {type(a).__name__}")


def _launch(name, grid, block, args, shared_mem=0):
    check_launch_args(name, args)
    _device.launch(name, grid, block, args, shared_mem)


# ---------------------------------------------------------------- device layer

class CupyDevice:
    """The few CuPy/CUDA calls of this module: memory, launches, cuBLAS, async copies."""

    def __init__(self):
        self._cupy = None
        self._module = None
        self._functions = {}

    @property
    def xp(self):
        if self._cupy is None:
            self._cupy = backend.require_gpu()
        return self._cupy

    def is_array(self, a):
        return backend.is_cupy_array(a)

    def module(self):
        """The RawModule of every kernel, compiled on first use (memoized per process)."""
        if self._module is None:
            self._module = self.xp.RawModule(code=module_source(), options=COMPILE_OPTIONS)
        return self._module

    def launch(self, name, grid, block, args, shared_mem=0):
        """Launch kernel `name`; None arguments become null pointers."""
        if name not in self._functions:
            self._functions[name] = self.module().get_function(name)
        args = tuple(np.uint64(0) if a is None else a for a in args)
        self._functions[name](grid, block, args, shared_mem=shared_mem)

    def carve(self, buf, offset, shape, dtype):
        """A typed view of bytes [offset, ...) of the uint8 buffer buf."""
        cp = self.xp
        return cp.ndarray(shape, dtype, memptr=buf.data + offset)

    def memset(self, a, byte):
        a.data.memset_async(byte, a.nbytes)

    def copy(self, dst, src):
        """dst[...] = src for contiguous arrays of equal size, as one async memcpy."""
        dst.data.copy_from_device_async(src.data, src.nbytes)

    def gemm_strided_batched(self, op_b, op_a, m, n, k, b, ldb, stride_b, a, lda, stride_a,
                             beta, c, ldc, stride_c, batch):
        """cublasSgemmStridedBatched, column-major arguments (see batched_gemm)."""
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
        """Whether the current stream is being captured into a CUDA graph."""
        return self.xp.cuda.get_current_stream().is_capturing()

    def host_buffer(self, count):
        """A pinned host int32 array (async device-to-host copies land there)."""
        cp = self.xp
        mem = cp.cuda.alloc_pinned_memory(count * 4)
        return np.frombuffer(mem, np.int32, count)

    def copy_to_host_async(self, host, dev):
        """Enqueue dev -> host (pinned) on the current stream; returns an event to poll."""
        cp = self.xp
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(host.ctypes.data, dev.data.ptr, dev.nbytes,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        return stream.record()

    def done(self, event):
        return event.done


_device = CupyDevice()


def device_layer():
    """The device layer in use (tests of the index math may swap in another)."""
    return _device


# ---------------------------------------------------------------- checks

def _check(name, a, dtype, shape=None):
    """Raise TypeError/ValueError naming `name` unless a is a C-contiguous device array as expected.

    shape: expected shape, None entries match any size.
    """
    if not _device.is_array(a):
        raise TypeError(f"{name}: expected a cupy.ndarray, got {type(a).__module__}.{type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if shape is not None and (a.ndim != len(shape) or any(e is not None and e != s for e, s in zip(shape, a.shape))):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {a.strides} for shape {a.shape}")


def _check_index_range(what, n):
    if n > INT32_LIMIT:
        raise ValueError(f"{what}: {n} elements exceed the kernels' int32 indexing ({INT32_LIMIT}); "
                         "split the batch")


def _grid_1d(total, block=256, most=16384):
    return (max(1, min(-(-total // block), most)),)


def _row_grid(rows, cols, most=4096):
    """Grid of the (32, 8) row kernels: column blocks x blocks of 8 runs of RUN rows."""
    return (-(-cols // ROW_BLOCK[0]), max(1, min(-(-rows // (ROW_BLOCK[1] * RUN)), most)))


def _i32(v):
    return np.int32(v)


def hash_bits_bucket(H):
    """The compiled bit count (8, 16 or 32) that holds H bits."""
    if not 1 <= H <= 32:
        raise ValueError(f"H: expected 1..32, got {H}")
    return 8 if H <= 8 else 16 if H <= 16 else 32


def table_size(capacity):
    """Slots per group: a power of two, at least twice the capacity (load <= 1/2)."""
    return max(64, 1 << (2 * capacity - 1).bit_length())


# ---------------------------------------------------------------- workspace

class _Arena:
    """Typed arrays carved from one allocation, so one memset clears them all."""

    ALIGN = 256

    def __init__(self):
        self._parts = []
        self.nbytes = 0

    def add(self, name, shape, dtype):
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        self._parts.append((name, shape, dtype, self.nbytes))
        size = int(np.prod(shape)) * dtype.itemsize
        self.nbytes += -(-size // self.ALIGN) * self.ALIGN
        return self

    def allocate(self, fill_byte=0):
        """dict name -> array, every byte set to fill_byte (one memset)."""
        buf = _device.xp.empty(max(self.nbytes, self.ALIGN), dtype=np.uint8)
        _device.memset(buf, fill_byte)
        return {name: _device.carve(buf, off, shape, dtype) for name, shape, dtype, off in self._parts}


# ---------------------------------------------------------------- capacity

def _round_capacity(need, limit):
    """The next size of the form {4,5,6,7} * 2**e >= need (at least 32), at most limit."""
    need = max(32, int(math.ceil(need)))
    e = max(0, need.bit_length() - 3)
    cap = -(-need // (1 << e)) * (1 << e)
    return max(1, min(cap, limit))


class CapacityTracker:
    """Clusters per group of one call site (shape), sized from earlier calls.

    The statistics of a call (max distinct codes per group, overflow counts)
    are copied to pinned host memory asynchronously at its end; the next call
    reads them only if that copy has completed (an event poll, never a wait),
    so no call ever waits for its own or an earlier call's GPU work. The
    capacity grows to 1.25x the observed need when a group overflowed or came
    within the margin, and shrinks when 4x too large; a table that filled up
    doubles it. Nothing is read or copied while a CUDA graph is being captured.
    """

    HEADROOM = 1.25

    def __init__(self, rows, H):
        self.limit = max(1, min(rows, 1 << H))
        self.capacity = _round_capacity(max(1024, rows // 8), self.limit)
        self.last = None            # the statistics last read: STAT_* vector
        self._host = None
        self._event = None

    def begin_call(self):
        """The capacity for this call, after reading earlier statistics if they arrived."""
        if self._event is not None and not _device.capturing() and _device.done(self._event):
            self._event = None
            self.last = self._host.copy()
            self.capacity = self.next_capacity(self.last, self.capacity, self.limit)
        return self.capacity

    @classmethod
    def next_capacity(cls, stats, capacity, limit):
        need = int(stats[STAT_MAX_DISTINCT])
        if stats[STAT_TABLE_FULL] > 0:
            need = max(need, 2 * capacity)
        if need * cls.HEADROOM > capacity or need * 4 < capacity:
            return _round_capacity(need * cls.HEADROOM, limit)
        return capacity

    def end_call(self, stats):
        """Enqueue the async copy of this call's statistics (skipped during graph capture)."""
        if _device.capturing():
            return
        if self._host is None:
            self._host = _device.host_buffer(STAT_COUNT)
        self._event = _device.copy_to_host_async(self._host, stats)


class CudaState:
    """What the CUDA path keeps in ReuseState.capacity: trackers and padded hash planes."""

    def __init__(self):
        self.trackers = {}
        self.padded_planes = {}

    def tracker(self, key, rows, H):
        if key not in self.trackers:
            self.trackers[key] = CapacityTracker(rows, H)
        return self.trackers[key]

    def capture_key(self):
        """The capacities a recorded CUDA graph freezes: ((call site, capacity), ...).

        While a graph replays, no statistics are read, so capacities stay fixed
        (overflowing clusters are still computed exactly); eager calls grow them.
        """
        return tuple(sorted((key, t.capacity) for key, t in self.trackers.items()))


def cuda_state(state):
    if not isinstance(state.capacity, CudaState):
        state.capacity = CudaState()
    return state.capacity


def padded_hash_params(state, config, G):
    """Planes (Gp, L, HB) and unit offsets (Gp, HB) on the device, zero-padded from H to HB bits."""
    cs = cuda_state(state)
    key = (config.L, config.H, G, config.family, config.seed, config.shared_planes)
    if key not in cs.padded_planes:
        planes, unit = state.hash_params(config.L, config.H, G, config.family, config.seed,
                                         config.shared_planes, _device.xp, np.float32)
        cs.padded_planes[key] = pad_hash_params(planes, unit)
    return cs.padded_planes[key]


def pad_hash_params(planes, offsets):
    """(planes (Gp, L, HB), offsets (Gp, HB)) from (Gp, L, H) and (Gp, H), zeros beyond H."""
    xp = _device.xp
    gp, L, H = planes.shape
    hb = hash_bits_bucket(H)
    p = xp.zeros((gp, L, hb), dtype=np.float32)
    p[:, :, :H] = planes
    o = xp.zeros((gp, hb), dtype=np.float32)
    o[:, :H] = offsets
    return p, o


# ---------------------------------------------------------------- kernel launches

@dataclasses.dataclass
class Rows:
    """The rows that are hashed: rows of X (N, K), or the padded pixels of an NHWC image.

    For pixels, K is the channel count and every row maps back to a pixel of
    the unpadded input x (B, h, w, K), or to a zero padding pixel.
    """

    x: object
    rows: int
    K: int
    hp: int = 0
    wp: int = 0
    h: int = 0
    w: int = 0
    top: int = 0
    left: int = 0

    @classmethod
    def matrix(cls, X):
        return cls(X, X.shape[0], X.shape[1])

    @classmethod
    def pixels(cls, x, pads):
        b, h, w, c = x.shape
        hp, wp = h + pads[0] + pads[1], w + pads[2] + pads[3]
        return cls(x, b * hp * wp, c, hp, wp, h, w, pads[0], pads[2])

    def geometry(self):
        return tuple(_i32(v) for v in (self.hp, self.wp, self.h, self.w, self.top, self.left))


def _launch_input_rms(x, small):
    n = x.size
    grid = (max(1, min(RMS_BLOCKS, -(-n // (256 * 8)))),)
    _launch("input_rms", grid, (256,), (x, np.int64(n), small["partials"], small["ticket"], small["scale"]))


def _launch_hash(rows, L, G, planes, offsets, H, scale, codes=None, table=None):
    """hash_rows_h{HB}: codes and/or table insertion (table: dict keys, vals, T, distinct, capacity, slots, stats)."""
    hb = planes.shape[-1]
    in_smem = (hb + L * hb) * 4 <= SMEM_LIMIT
    smem = (hb + L * hb) * 4 if in_smem else hb * 4
    if G > MAX_GRID_Y:
        raise ValueError(f"G: {G} groups exceed the grid limit {MAX_GRID_Y}; use a larger L")
    t = table or {}
    grid = (max(1, min(-(-rows.rows // 128), 8192)), G)
    _launch(f"hash_rows_h{hb}", grid, (128,), (
        rows.x, _i32(rows.rows), _i32(rows.K), _i32(L), _i32(G), *rows.geometry(),
        planes, offsets, _i32(H), _i32(planes.shape[0] == 1), _i32(in_smem), scale, codes,
        t.get("keys"), t.get("vals"), _i32(t.get("T", 0)), t.get("distinct"), _i32(t.get("capacity", 0)),
        _i32(PROBE_LIMIT), t.get("slots"), t.get("stats")), shared_mem=smem)


def _launch_centroid_sums(rows, L, G, table, ids, counts, sums, small):
    _launch("centroid_sums", _grid_1d(-(-rows.rows // RUN) * rows.K), (256,), (
        rows.x, _i32(rows.rows), _i32(rows.K), _i32(L), _i32(G), *rows.geometry(),
        table["slots"], table["vals"], _i32(table["T"]), _i32(table["capacity"]),
        ids, counts, sums, small["distinct"], small["stats"], small["r_c"]))


def _small_arena(G):
    return (_Arena().add("distinct", (G,), np.int32).add("stats", (STAT_COUNT,), np.int32)
            .add("r_c", (), np.float32).add("scale", (), np.float32).add("ticket", (), np.uint32)
            .add("partials", (RMS_BLOCKS,), np.float32))


def _cluster(rows, L, G, planes, offsets, H, family, capacity, scale_source, extra):
    """Hash, assign and accumulate centroids of `rows` in 3 launches (+ 3 memsets).

    extra: list of (name, shape, dtype) zeroed buffers the caller needs (one memset for all).
    Returns a dict: ids, counts, sums (unnormalised), the extra buffers, and the
    small statistics (distinct, stats, r_c, scale).
    """
    xp = _device.xp
    _check_index_range("rows x K", rows.rows * rows.K)
    _check_index_range("rows x G", rows.rows * G)
    T = table_size(capacity)
    small = _small_arena(G).allocate(0)
    ws = _Arena().add("counts", (G, capacity), np.int32).add("sums", (G, capacity, L), np.float32)
    for name, shape, dtype in extra:
        ws.add(name, shape, dtype)
    ws = ws.allocate(0)
    keys = xp.empty((G, T), dtype=np.uint64)
    _device.memset(keys, 0xFF)
    table = dict(keys=keys, vals=xp.empty((G, T), dtype=np.int32), T=T, distinct=small["distinct"],
                 capacity=capacity, slots=xp.empty((rows.rows, G), dtype=np.int32), stats=small["stats"])
    scale = None
    if family == "offset":
        _launch_input_rms(scale_source, small)
        scale = small["scale"]
    _launch_hash(rows, L, G, planes, offsets, H, scale, table=table)
    ids = xp.empty((rows.rows, G), dtype=np.int32)
    _launch_centroid_sums(rows, L, G, table, ids, ws["counts"], ws["sums"], small)
    out = dict(ws)
    out.update(ids=ids, distinct=small["distinct"], stats=small["stats"], r_c=small["r_c"],
               scale=small["scale"])
    return out


def batched_gemm(a, b, out=None, trans_a=False, trans_b=False, beta=0.0):
    """out[i] = op(a[i]) @ op(b[i]) + beta * out[i] for stacked row-major float32 matrices.

    One cublasSgemmStridedBatched call, transposes by flag (never a copy). The
    row-major product is the column-major out^T = op(b)^T op(a)^T, so b is
    cuBLAS's first operand.
    """
    _check("a", a, np.float32, (None, None, None))
    _check("b", b, np.float32, (a.shape[0], None, None))
    batch = a.shape[0]
    m, k = (a.shape[2], a.shape[1]) if trans_a else (a.shape[1], a.shape[2])
    kb, n = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    if kb != k:
        raise ValueError(f"b: expected {k} rows in op(b) to match op(a) {(m, k)}, got op(b) {(kb, n)}")
    if out is None:
        if beta != 0.0:
            raise ValueError("out: required when beta is not 0")
        out = _device.xp.empty((batch, m, n), dtype=np.float32)
    _check("out", out, np.float32, (batch, m, n))
    _device.gemm_strided_batched(trans_b, trans_a, n, m, k, b, b.shape[2], b.shape[1] * b.shape[2],
                                 a, a.shape[2], a.shape[1] * a.shape[2], beta, out, n, m * n, batch)
    return out


def _group_weights(W, G, L, ws_pad):
    """W (K, M) as (G, L, M): a view when L divides K, else copied into the zeroed ws_pad (G*L, M)."""
    K, M = W.shape
    if G * L == K:
        return W.reshape(G, L, M)
    _device.copy(ws_pad[:K], W)
    return ws_pad.reshape(G, L, M)


# ---------------------------------------------------------------- public kernel wrappers

def input_scale(x):
    """s = sqrt(mean(x * x)) as a 0-d float32 device array (kernel input_rms)."""
    _check("x", x, np.float32)
    small = _small_arena(1).allocate(0)
    _launch_input_rms(x, small)
    return small["scale"]


def hash_codes(X, L, planes, offsets):
    """Codes (N, G) uint32 of the rows of X (N, K) in groups of L (kernel hash_rows).

    planes (Gp, L, H), offsets (Gp, H): thresholds b (already scaled), as
    lsh.hash_codes takes them.
    """
    _check("X", X, np.float32, (None, None))
    return _hash_codes(Rows.matrix(X), L, planes, offsets)


def hash_pixels(x, pads, L, planes, offsets):
    """Codes (B*Hp*Wp, Q) uint32 of every padded pixel of x (B, H, W, C) per group of L channels."""
    _check("x", x, np.float32, (None, None, None, None))
    if x.shape[3] % L:
        raise ValueError(f"L: expected a divisor of the {x.shape[3]} channels, got {L}")
    return _hash_codes(Rows.pixels(x, pads), L, planes, offsets)


def _hash_codes(rows, L, planes, offsets):
    G = -(-rows.K // L)
    gp = 1 if planes.shape[0] == 1 else G
    _check("planes", planes, np.float32, (gp, L, None))
    _check("offsets", offsets, np.float32, (gp, planes.shape[2]))
    H = planes.shape[2]
    p, o = pad_hash_params(planes, offsets)
    codes = _device.xp.empty((rows.rows, G), dtype=np.uint32)
    one = _device.xp.ones((), dtype=np.float32)
    _launch_hash(rows, L, G, p, o, H, one, codes=codes)
    return codes


def assign_clusters(codes, capacity):
    """(ids (N, G) int32, n_clusters (G,) int32) of codes (N, G) uint32 (kernels assign_codes, centroid_sums).

    ids are compact per group in first-come order (not the reference's code
    order); a code beyond `capacity` clusters in its group gets id -1 for all
    its rows. n_clusters counts the distinct codes, overflowed ones included.
    """
    _check("codes", codes, np.uint32, (None, None))
    xp = _device.xp
    n, G = codes.shape
    _check_index_range("codes", n * G)
    T = table_size(capacity)
    small = _small_arena(G).allocate(0)
    keys = xp.empty((G, T), dtype=np.uint64)
    _device.memset(keys, 0xFF)
    table = dict(keys=keys, vals=xp.empty((G, T), dtype=np.int32), T=T, distinct=small["distinct"],
                 capacity=capacity, slots=xp.empty((n, G), dtype=np.int32), stats=small["stats"])
    _launch("assign_codes", _grid_1d(n * G), (256,), (
        codes, _i32(n), _i32(G), keys, table["vals"], _i32(T), table["distinct"], _i32(capacity),
        _i32(PROBE_LIMIT), table["slots"], table["stats"]))
    ids = xp.empty((n, G), dtype=np.int32)
    counts = xp.zeros((G, capacity), dtype=np.int32)
    # rows of G "columns" of length 1: one thread per (row, group), no sums
    _launch_centroid_sums(Rows(None, n, G), 1, G, table, ids, counts, None, small)
    return ids, small["distinct"]


def centroids(X, ids, L, capacity):
    """(centroids (G, capacity, L), counts (G, capacity)) of rows X (N, K) under ids (N, G) (kernel centroid_sums).

    ids -1 (overflow) are not members of any cluster.
    """
    _check("X", X, np.float32, (None, None))
    G = -(-X.shape[1] // L)
    _check("ids", ids, np.int32, (X.shape[0], G))
    sums, counts = _centroid_sums_of_ids(Rows.matrix(X), ids, L, G, capacity)
    return sums / _device.xp.maximum(counts, 1)[:, :, None], counts


def _centroid_sums_of_ids(rows, ids, L, G, capacity):
    """Run centroid_sums on given ids: slots = ids and vals = the identity table."""
    xp = _device.xp
    _check_index_range("rows x K", rows.rows * rows.K)
    small = _small_arena(G).allocate(0)
    vals = xp.tile(xp.arange(capacity, dtype=np.int32), G)
    table = dict(slots=ids, vals=vals, T=capacity, capacity=capacity)
    out_ids = xp.empty_like(ids)
    counts = xp.zeros((G, capacity), dtype=np.int32)
    sums = xp.zeros((G, capacity, L), dtype=np.float32)
    _launch_centroid_sums(rows, L, G, table, out_ids, counts, sums, small)
    return sums, counts


def centroid_pixels(x, pads, ids, L, capacity):
    """(centroids (Q, capacity, L), counts (Q, capacity)) of the padded pixels of x under ids (B*Hp*Wp, Q)."""
    _check("x", x, np.float32, (None, None, None, None))
    rows = Rows.pixels(x, pads)
    Q = x.shape[3] // L
    _check("ids", ids, np.int32, (rows.rows, Q))
    sums, counts = _centroid_sums_of_ids(rows, ids, L, Q, capacity)
    return sums / _device.xp.maximum(counts, 1)[:, :, None], counts


def reconstruct(P, ids, counts, X, W, b, L):
    """y (N, M) = sum_g P[g, ids[n, g]] / counts[g, id] (+ b) (kernel reconstruct_rows).

    P (G, capacity, M) holds (cluster sum) @ W_g; rows with id -1 use the exact x[n, g] @ W_g.
    """
    N, K = X.shape
    G, cap, M = P.shape
    _check("P", P, np.float32, (G, None, None))
    _check("ids", ids, np.int32, (N, G))
    _check("counts", counts, np.int32, (G, cap))
    _check("X", X, np.float32, (N, None))
    _check("W", W, np.float32, (K, M))
    if b is not None:
        _check("b", b, np.float32, (M,))
    _check_index_range("N x max(M, G)", N * max(M, G))
    y = _device.xp.empty((N, M), dtype=np.float32)
    _launch("reconstruct_rows", _row_grid(N, M), ROW_BLOCK, (
        P, ids, counts, _i32(cap), X, W, b, y, _i32(N), _i32(K), _i32(L), _i32(G), _i32(M)))
    return y


@dataclasses.dataclass
class ConvGeometry:
    """Sizes of one convolution, as the pixel kernels take them."""

    B: int
    h: int
    w: int
    C: int
    kh: int
    kw: int
    stride: int
    top: int
    left: int
    hp: int
    wp: int
    oh: int
    ow: int
    M: int

    @classmethod
    def of(cls, x_shape, w_shape, stride, pads):
        B, h, w, C = x_shape
        kh, kw, _, M = w_shape
        hp, wp = h + pads[0] + pads[1], w + pads[2] + pads[3]
        return cls(B, h, w, C, kh, kw, stride, pads[0], pads[2], hp, wp,
                   (hp - kh) // stride + 1, (wp - kw) // stride + 1, M)

    @property
    def outputs(self):
        return self.B * self.oh * self.ow

    def pixel_args(self, L, Q):
        return tuple(_i32(v) for v in (self.B, self.h, self.w, self.C, L, Q, self.kh, self.kw, self.stride,
                                        self.top, self.left, self.hp, self.wp, self.oh, self.ow, self.M))

    def col2im_args(self):
        return tuple(_i32(v) for v in (self.B, self.h, self.w, self.C, self.kh, self.kw, self.stride,
                                        self.top, self.left, self.oh, self.ow))


def reconstruct_pixels(P, ids, counts, x, W, b, stride, pads, L):
    """y (B*OH*OW, M) of the pixel-aligned conv (kernel reconstruct_pixels).

    P (Q, capacity, kh*kw*M) holds (cluster sum of channel group q) @ W'_q,
    W'_q[l, (t, m)] = W[t, q*L + l, m]; ids (B*Hp*Wp, Q) per padded pixel.
    """
    geo = ConvGeometry.of(x.shape, W.shape, stride, pads)
    Q, cap = P.shape[0], P.shape[1]
    _check("x", x, np.float32, (None, None, None, Q * L))
    _check("W", W, np.float32, (None, None, x.shape[3], None))
    _check("P", P, np.float32, (Q, cap, geo.kh * geo.kw * geo.M))
    _check("ids", ids, np.int32, (geo.B * geo.hp * geo.wp, Q))
    _check("counts", counts, np.int32, (Q, cap))
    if b is not None:
        _check("b", b, np.float32, (geo.M,))
    y = _device.xp.empty((geo.outputs, geo.M), dtype=np.float32)
    _launch_reconstruct_pixels(P, ids, counts, x, W, b, y, geo, L, Q, cap)
    return y


def _launch_reconstruct_pixels(P, ids, counts, x, W, b, y, geo, L, Q, cap):
    _check_index_range("outputs x M", geo.outputs * geo.M)
    _launch("reconstruct_pixels", _row_grid(geo.outputs, geo.M), ROW_BLOCK, (
        P, ids, counts, _i32(cap), x, W, b, y, *geo.pixel_args(L, Q)))


def cluster_sums(dY, ids, counts, X, L, with_bias=True):
    """(S (G, capacity, M), dW_over (G*L, M), db (M,) or None) (kernel cluster_sums_rows).

    S[g, c] = sum of dY rows of cluster c / |c|; dW_over = the exact x^T dY of the
    overflow members (id -1); db = dY.sum(0).
    """
    N, M = dY.shape
    G, cap = counts.shape
    _check("dY", dY, np.float32, (None, None))
    _check("ids", ids, np.int32, (N, G))
    _check("counts", counts, np.int32, (G, None))
    _check("X", X, np.float32, (N, None))
    xp = _device.xp
    S = xp.zeros((G, cap, M), dtype=np.float32)
    dW = xp.zeros((G * L, M), dtype=np.float32)
    db = xp.zeros((M,), dtype=np.float32) if with_bias else None
    _launch_cluster_sums_rows(dY, ids, counts, X, S, dW, db, L)
    return S, dW, db


def _launch_cluster_sums_rows(dY, ids, counts, X, S, dW, db, L):
    N, M = dY.shape
    G, cap = counts.shape
    _check_index_range("G x capacity x M", S.size)
    _launch("cluster_sums_rows", _row_grid(N, M), ROW_BLOCK, (
        dY, ids, counts, _i32(cap), X, S, dW, db, _i32(N), _i32(X.shape[1]), _i32(L), _i32(G), _i32(M)))


def cluster_sums_pixels(dY, ids, counts, x, W_shape, stride, pads, L, with_bias=True):
    """(S (Q, capacity, kh*kw, M), dW_over (Q, L, kh*kw*M), db) of the pixel path (kernel cluster_sums_pixels)."""
    geo = ConvGeometry.of(x.shape, W_shape, stride, pads)
    Q, cap = counts.shape
    _check("dY", dY, np.float32, (geo.outputs, geo.M))
    _check("ids", ids, np.int32, (geo.B * geo.hp * geo.wp, Q))
    _check("counts", counts, np.int32, (Q, None))
    _check("x", x, np.float32, (None, None, None, Q * L))
    xp = _device.xp
    T = geo.kh * geo.kw
    S = xp.zeros((Q, cap, T, geo.M), dtype=np.float32)
    dW = xp.zeros((Q, L, T * geo.M), dtype=np.float32)
    db = xp.zeros((geo.M,), dtype=np.float32) if with_bias else None
    _launch_cluster_sums_pixels(dY, ids, counts, x, S, dW, db, geo, L)
    return S, dW, db


def _launch_cluster_sums_pixels(dY, ids, counts, x, S, dW, db, geo, L):
    Q, cap = counts.shape
    _check_index_range("S", S.size)
    _launch("cluster_sums_pixels", _row_grid(geo.outputs, geo.M), ROW_BLOCK, (
        dY, ids, counts, _i32(cap), x, S, dW, db, *geo.pixel_args(L, Q)))


def dx_cluster(D, ids, dY, W, L):
    """dX (N, K) of the 'cluster' mode: row n, group g gets D[g, ids[n, g]] (kernel dx_cluster_rows).

    D (G, capacity, L) = (S / count) @ W_g^T; overflow rows get the exact dY[n] @ W^T slice.
    """
    N, M = dY.shape
    K = W.shape[0]
    G, cap, _ = D.shape
    _check("D", D, np.float32, (G, None, L))
    _check("ids", ids, np.int32, (N, G))
    _check("dY", dY, np.float32, (N, M))
    _check("W", W, np.float32, (K, M))
    _check_index_range("N x K", N * K)
    dX = _device.xp.empty((N, K), dtype=np.float32)
    _launch("dx_cluster_rows", _grid_1d(N * K), (256,), (
        D, ids, _i32(cap), dY, W, dX, _i32(N), _i32(K), _i32(L), _i32(G), _i32(M)))
    return dX


def col2im(dcols, x_shape, W_shape, stride, pads):
    """dx (B, H, W, C) from im2col-shaped columns (N, kh*kw*C), as a gather (kernel col2im_gather)."""
    geo = ConvGeometry.of(x_shape, W_shape, stride, pads)
    _check("dcols", dcols, np.float32, (geo.outputs, geo.kh * geo.kw * geo.C))
    return _launch_col2im(geo, dcols=dcols)


def col2im_cluster(D, ids, dY, W, x_shape, stride, pads, L):
    """dx (B, H, W, C) of the general conv path's 'cluster' mode, col2im fused (kernel col2im_gather)."""
    geo = ConvGeometry.of(x_shape, W.shape, stride, pads)
    G = D.shape[0]
    _check("D", D, np.float32, (G, None, L))
    _check("ids", ids, np.int32, (geo.outputs, G))
    _check("dY", dY, np.float32, (geo.outputs, geo.M))
    _check("W", W, np.float32, (geo.kh, geo.kw, geo.C, geo.M))
    return _launch_col2im(geo, D=D, ids=ids, dY=dY, W=W, L=L)


def _launch_col2im(geo, dcols=None, D=None, ids=None, dY=None, W=None, L=1):
    _check_index_range("im2col columns", geo.outputs * geo.kh * geo.kw * geo.C)
    dx = _device.xp.empty((geo.B, geo.h, geo.w, geo.C), dtype=np.float32)
    G = D.shape[0] if D is not None else 1
    cap = D.shape[1] if D is not None else 0
    _launch("col2im_gather", _grid_1d(dx.size), (256,), (
        dcols, D, ids, _i32(cap), dY, W, dx, *geo.col2im_args(), _i32(L), _i32(G), _i32(geo.M)))
    return dx


def dx_cluster_pixels(D, ids, dY, W, x_shape, stride, pads, L):
    """dx (B, H, W, C) of the pixel path's 'cluster' mode (kernel dx_cluster_pixels).

    D (Q, capacity, L) = (S_q / count) @ W'_q^T; ids (B*Hp*Wp, Q).
    """
    geo = ConvGeometry.of(x_shape, W.shape, stride, pads)
    Q = D.shape[0]
    _check("D", D, np.float32, (Q, None, L))
    _check("ids", ids, np.int32, (geo.B * geo.hp * geo.wp, Q))
    _check("dY", dY, np.float32, (geo.outputs, geo.M))
    _check("W", W, np.float32, (geo.kh, geo.kw, geo.C, geo.M))
    _check_index_range("x", geo.B * geo.h * geo.w * geo.C)
    dx = _device.xp.empty((geo.B, geo.h, geo.w, geo.C), dtype=np.float32)
    _launch("dx_cluster_pixels", _grid_1d(dx.size), (256,), (
        D, ids, _i32(D.shape[1]), dY, W, dx, *geo.pixel_args(L, Q)))
    return dx


# ---------------------------------------------------------------- reuse products

@dataclasses.dataclass
class CudaMatmulCache:
    """What the backward of one CUDA reuse product needs (assignment fixed)."""

    X: object            # (N, K): overflow members' exact gradients
    W: object            # (K, M)
    Wg: object           # (G, L, M), zero rows pad the last group
    ids: object          # (N, G), -1 = overflow
    counts: object       # (G, capacity)
    sums: object         # (G, capacity, L) unnormalised centroids
    S: object            # (G, capacity, M) zeroed, filled by the backward
    dW: object           # (G*L, M) zeroed, filled by the backward
    db: object           # (M,) zeroed, or None without bias
    L: int
    dx_mode: str
    used: bool = False


def _take(cache):
    """The cache, marked used: the backward accumulates into its zeroed buffers, so only once."""
    if cache.used:
        raise RuntimeError("deep-reuse CUDA backward called twice for one forward (its gradient buffers "
                           "are filled in place); run the forward again")
    cache.used = True
    return cache


def _as_f32(name, a):
    """a as a C-contiguous float32 device array (copied only when needed); dtype must be float32."""
    if a is None:
        return None
    if not _device.is_array(a):
        raise TypeError(f"{name}: expected a cupy.ndarray, got {type(a).__module__}.{type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32 (the CUDA path is float32 only), got {a.dtype.name}; "
                        "use ReuseConfig(impl='reference') for other dtypes")
    return _device.xp.ascontiguousarray(a)


def _record(state, run, impl_extra, rel_error, capacity):
    state.record(r_c=run["r_c"], n_clusters=run["distinct"], impl="cuda", rel_error=rel_error,
                 capacity=capacity, overflow=run["stats"][STAT_OVERFLOW], **impl_extra)


def _matmul_forward(X, W, b, config, state, train, scale_source):
    N, K = X.shape
    M = W.shape[1]
    L, H = config.L, config.H
    G = -(-K // L)
    planes, offsets = padded_hash_params(state, config, G)
    tracker = cuda_state(state).tracker(("rows", N, G, L, H), N, H)
    cap = tracker.begin_call()
    _check_index_range("G x capacity x M", G * cap * max(M, L))
    extra = [] if G * L == K else [("W_pad", (G * L, M), np.float32)]
    if train:
        extra += [("S", (G, cap, M), np.float32), ("dW", (G * L, M), np.float32)]
        if b is not None:
            extra.append(("db", (M,), np.float32))
    run = _cluster(Rows.matrix(X), L, G, planes, offsets, H, config.family, cap, scale_source, extra)
    Wg = _group_weights(W, G, L, run.get("W_pad"))
    P = batched_gemm(run["sums"], Wg)                                   # (G, cap, M)
    y = reconstruct(P, run["ids"], run["counts"], X, W, b, L)
    tracker.end_call(run["stats"])
    cache = None
    if train:
        cache = CudaMatmulCache(X, W, Wg, run["ids"], run["counts"], run["sums"], run["S"], run["dW"],
                                run.get("db"), L, config.dx_mode)
    return y, cache, run, cap


def _matmul_backward_params(dy, c):
    """Fill c.S, c.dW, c.db: returns (dW (K, M), db)."""
    _launch_cluster_sums_rows(dy, c.ids, c.counts, c.X, c.S, c.dW, c.db, c.L)
    G, L, M = c.Wg.shape
    batched_gemm(c.sums, c.S, out=c.dW.reshape(G, L, M), trans_a=True, beta=1.0)   # += sums^T (S / count)
    return c.dW[:c.W.shape[0]], c.db


def _matmul_cluster_D(c):
    """D (G, capacity, L) = (S / count) @ W_g^T."""
    return batched_gemm(c.S, c.Wg, trans_b=True)


def cuda_reuse_matmul_forward(X, W, b, config, state, train=True):
    """(y (N, M), cache) of the deep-reuse product X (N, K) @ W (K, M) + b on the GPU.

    cache is None when train is False. Records r_c and the distinct codes per
    group in state (device scalars, no synchronisation).
    """
    X, W, b = _as_f32("X", X), _as_f32("W", W), _as_f32("b", b)
    _check("X", X, np.float32, (None, None))
    _check("W", W, np.float32, (X.shape[1], None))
    if b is not None:
        _check("b", b, np.float32, (W.shape[1],))
    y, cache, run, cap = _matmul_forward(X, W, b, config, state, train, X)
    rel_error = None
    if config.measure_error:
        exact = X @ W if b is None else X @ W + b
        rel_error = ref_matmul.relative_error(y, exact)
    _record(state, run, {}, rel_error, cap)
    return y, cache


def cuda_reuse_matmul_backward(dy, cache):
    """(dX (N, K), dW (K, M), db (M,) or None) with the forward's cluster assignment."""
    c = _take(cache)
    dy = _as_f32("dy", dy)
    _check("dy", dy, np.float32, (c.X.shape[0], c.W.shape[1]))
    dW, db = _matmul_backward_params(dy, c)
    if c.dx_mode == "exact":
        dX = dy @ c.W.T
    else:
        dX = dx_cluster(_matmul_cluster_D(c), c.ids, dy, c.W, c.L)
    return dX, dW, db


@dataclasses.dataclass
class CudaConvCache:
    """What the backward of a CUDA reuse conv needs."""

    kind: str            # 'general' (im2col rows) or 'pixel'
    x: object            # the input (B, H, W, C)
    W: object            # (kh, kw, C, M)
    stride: int
    pads: tuple
    matmul: object = None    # general: CudaMatmulCache of the im2col product
    Wq: object = None        # pixel: (Q, L, kh*kw*M)
    ids: object = None       # pixel: (B*Hp*Wp, Q)
    counts: object = None    # pixel: (Q, capacity)
    sums: object = None      # pixel: (Q, capacity, L)
    S: object = None         # pixel: (Q, capacity, kh*kw, M)
    dWq: object = None       # pixel: (Q, L, kh*kw*M)
    db: object = None
    L: int = 0
    dx_mode: str = "exact"
    used: bool = False


def cuda_reuse_conv_forward(x, W, b, stride, pads, config, state, train=True):
    """(y (B, OH, OW, M), cache) of the deep-reuse conv on the GPU: pixel-aligned or general path."""
    x, W, b = _as_f32("x", x), _as_f32("W", W), _as_f32("b", b)
    _check("x", x, np.float32, (None, None, None, None))
    _check("W", W, np.float32, (None, None, x.shape[3], None))
    if b is not None:
        _check("b", b, np.float32, (W.shape[3],))
    pixel = ref_conv.use_pixel_aligned(config, x.shape[3])
    geo = ConvGeometry.of(x.shape, W.shape, stride, pads)
    if pixel:
        y, cache, run, cap = _pixel_forward(x, W, b, geo, config, state, train)
    else:
        cols, _ = im2col(x, geo.kh, geo.kw, stride, pads)
        y, mcache, run, cap = _matmul_forward(cols, W.reshape(-1, geo.M), b, config, state, train, x)
        cache = CudaConvCache("general", x, W, stride, tuple(pads), matmul=mcache) if train else None
    y = y.reshape(geo.B, geo.oh, geo.ow, geo.M)
    rel_error = None
    if config.measure_error:
        rel_error = ref_matmul.relative_error(y, ref_conv.exact_conv(x, W, b, stride, pads))
    _record(state, run, {"pixel_aligned": pixel}, rel_error, cap)
    return y, cache


def _pixel_forward(x, W, b, geo, config, state, train):
    L, H = config.L, config.H
    Q = geo.C // L
    T = geo.kh * geo.kw
    rows = Rows.pixels(x, (geo.top, geo.hp - geo.h - geo.top, geo.left, geo.wp - geo.w - geo.left))
    planes, offsets = padded_hash_params(state, config, Q)
    tracker = cuda_state(state).tracker(("pixels", rows.rows, Q, L, H), rows.rows, H)
    cap = tracker.begin_call()
    _check_index_range("Q x capacity x kh*kw x M", Q * cap * T * geo.M)
    extra = []
    if train:
        extra = [("S", (Q, cap, T, geo.M), np.float32), ("dWq", (Q, L, T * geo.M), np.float32)]
        if b is not None:
            extra.append(("db", (geo.M,), np.float32))
    run = _cluster(rows, L, Q, planes, offsets, H, config.family, cap, x, extra)
    # W'_q[l, (t, m)] = W[t, q*L + l, m]: one small transpose so one GEMM serves every offset
    Wq = _device.xp.ascontiguousarray(W.reshape(T, Q, L, geo.M).transpose(1, 2, 0, 3)).reshape(Q, L, T * geo.M)
    P = batched_gemm(run["sums"], Wq)                                   # (Q, cap, T*M)
    y = _device.xp.empty((geo.outputs, geo.M), dtype=np.float32)
    _launch_reconstruct_pixels(P, run["ids"], run["counts"], x, W, b, y, geo, L, Q, cap)
    tracker.end_call(run["stats"])
    cache = None
    if train:
        cache = CudaConvCache("pixel", x, W, geo.stride, (geo.top, geo.hp - geo.h - geo.top,
                                                          geo.left, geo.wp - geo.w - geo.left),
                              Wq=Wq, ids=run["ids"], counts=run["counts"], sums=run["sums"], S=run["S"],
                              dWq=run["dWq"], db=run.get("db"), L=L, dx_mode=config.dx_mode)
    return y, cache, run, cap


def cuda_reuse_conv_backward(dy, cache):
    """(dx (B, H, W, C), dW (kh, kw, C, M), db (M,) or None) with the forward's cluster assignment."""
    c = _take(cache)
    geo = ConvGeometry.of(c.x.shape, c.W.shape, c.stride, c.pads)
    dy = _as_f32("dy", dy)
    _check("dy", dy, np.float32, (geo.B, geo.oh, geo.ow, geo.M))
    dy2 = dy.reshape(geo.outputs, geo.M)
    if c.kind == "general":
        mc = _take(c.matmul)
        dW, db = _matmul_backward_params(dy2, mc)
        if mc.dx_mode == "exact":
            dx = _launch_col2im(geo, dcols=dy2 @ mc.W.T)
        else:
            dx = _launch_col2im(geo, D=_matmul_cluster_D(mc), ids=mc.ids, dY=dy2, W=c.W, L=mc.L)
        return dx, dW.reshape(c.W.shape), db
    Q, cap = c.counts.shape
    T = geo.kh * geo.kw
    _launch_cluster_sums_pixels(dy2, c.ids, c.counts, c.x, c.S, c.dWq, c.db, geo, c.L)
    S = c.S.reshape(Q, cap, T * geo.M)
    batched_gemm(c.sums, S, out=c.dWq, trans_a=True, beta=1.0)            # += sums_q^T (S_q / count)
    dW = _device.xp.ascontiguousarray(c.dWq.reshape(Q, c.L, T, geo.M).transpose(2, 0, 1, 3))
    dW = dW.reshape(c.W.shape)
    if c.dx_mode == "exact":
        dx = _launch_col2im(geo, dcols=dy2 @ c.W.reshape(-1, geo.M).T)
    else:
        D = batched_gemm(S, c.Wq, trans_b=True)                            # (Q, cap, L)
        dx = dx_cluster_pixels(D, c.ids, dy2, c.W, c.x.shape, c.stride, c.pads, c.L)
    return dx, dW, c.db
