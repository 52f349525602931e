"""Fused GPU kernels for the exact training step: one launch where the array code needs many.

On a modern GPU the CifarNet step is bound by kernel launches, not arithmetic: each
CuPy operation is a launch (about 16 us of host time), and the readable array code
of a layer is several operations. Each kernel here does the work of one such
sequence in one launch. Its twin, and the oracle it is tested against, is the array
code it replaces, which stays in the layer (or optimizer) and still runs on NumPy:

    kernel                  replaces (the twin)                        launches
    sgd_update              SGD.update (+ weight decay)                 6 -> 1
    adam_update             Adam.update (+ weight decay)               12 -> 1
    lrn_forward/backward    LocalResponseNorm.forward/backward         ~10 -> 1 each
    maxpool_forward/backward MaxPool2D (windows that do not overlap)   3 / ~25 -> 1
    relu_backward           ReLU.backward                               2 -> 1
    dropout_forward         Dropout.forward (counter-based random)      5 -> 1
    accumulate_step         the trainer's loss and accuracy sums        6 -> 1
    im2col / col2im         layers.conv.im2col / col2im             kh*kw -> 1

The layers call these only on CuPy arrays; NumPy arrays take the array code.

All kernels are grid-stride loops over independent outputs (gathers: no atomics,
except for the two sums of accumulate_step). They load, are checked against their
signatures and launch through minireuse.kernels.runtime, like the deep-reuse kernels, so
the same source also runs as its host build on NumPy arrays: tests check every
kernel on machines without a GPU through the launch the GPU uses. The module is
compiled without fused multiply-add (and the host build without contraction), so
elementwise kernels round like the NumPy expressions they replace on normal numbers.
Not on subnormals: CuPy adds -ftz=true to every NVRTC compile, so a float32 input or
result below 1.18e-38 (float64 keeps them) flushes to zero on the GPU where NumPy
keeps it. Exact comparisons with NumPy hold for data without float32 subnormals.

Values that change every step (learning rate, Adam's bias corrections, dropout
keys) are read from device memory (``backend.DeviceScalars``), never passed as
launch arguments, so a step recorded in a CUDA graph (training/graphs.py) stays correct when
replayed. The CUDA source is step_kernels.cu, beside this file.
"""
import os

import numpy as np

from .. import backend
from ..geometry import ConvGeometry
from . import runtime

# the kernels' CUDA source (the entry points below are generated from _ENTRIES)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_kernels.cu")) as _f:
    _KERNELS = _f.read()

# extern "C" entry points, one per kernel and dtype: name_f32 / name_f64 (T = float / double)
_ENTRIES = [
    ("sgd_update", "T* p, const T* g, T* v, const double* hyper, long long n, double momentum, double wd, "
                   "int nesterov, int first"),
    ("adam_update", "T* p, const T* g, T* m, T* v, const double* hyper, long long n, double b1, double b2, "
                    "double eps, double wd"),
    ("lrn_forward", "const T* x, T* y, T* scale, T* denom, long long n, int c, int r, double bias, double alpha, "
                    "double beta"),
    ("lrn_backward", "const T* dy, const T* x, const T* scale, const T* denom, T* dx, long long n, int c, int r, "
                     "double k"),
    ("maxpool_forward", "const T* x, T* y, unsigned char* arg, long long n, int h, int w, int c, int oh, int ow, "
                        "int k, int stride, int top, int left"),
    ("maxpool_backward", "const T* dy, const unsigned char* arg, T* dx, long long n, int h, int w, int c, int oh, "
                         "int ow, int k, int stride, int top, int left"),
    ("relu_backward", "const T* dy, const T* y, T* dx, long long n"),
    ("dropout_forward", "const T* x, T* mask, T* y, const unsigned int* key, long long n, double keep, double scale"),
    ("accumulate_step", "double* sums, const T* loss, const T* logits, const long long* labels, long long n, int k"),
    ("im2col", "const T* x, T* cols, long long n, int h, int w, int c, int kh, int kw, int stride, int top, "
               "int left, int oh, int ow"),
    ("col2im", "const T* cols, T* x, long long n, int h, int w, int c, int kh, int kw, int stride, int top, "
               "int left, int oh, int ow"),
]


def _entry_points():
    lines = []
    for name, params in _ENTRIES:
        args = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
        for ctype, suffix in (("float", "f32"), ("double", "f64")):
            typed = params.replace("T*", ctype + "*")
            lines.append(f'extern "C" __global__ void {name}_{suffix}({typed}) {{ {name}<{ctype}>({args}); }}')
    return "\n".join(lines) + "\n"


CUDA_SOURCE = _KERNELS + "\n// ---- entry points\n" + _entry_points()

MODULE = runtime.KernelModule("minireuse/kernels/step_kernels.py", CUDA_SOURCE,
                              gpu_options=("--std=c++14", "--fmad=false"))

THREADS = 256
MAX_BLOCKS = 1 << 16
_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


# ---------------------------------------------------------------- launching

def supports(*arrays):
    """True when every array is a float32/float64 CuPy array: the layers' test for the
    fused path (NumPy arrays take the array code)."""
    return all(backend.is_cupy_array(a) and a.dtype in _DTYPES for a in arrays)


def _launch(name, a, size, args):
    """Run kernel ``name`` for a's dtype over ``size`` outputs: on the GPU for CuPy
    arrays, on the host build for NumPy arrays (tests)."""
    if size == 0:
        return
    runner = MODULE.runner_for(a)
    blocks = runtime.grid_blocks(runner, -(-size // THREADS), MAX_BLOCKS)
    runner.launch(f"{name}_{_DTYPES[np.dtype(a.dtype)]}", (blocks,), (THREADS,), args)


def _empty_like(a):
    return backend.get_array_module(a).empty(a.shape, dtype=a.dtype)


def _ints(*values):
    """int launch arguments (np.int32: the kernels' ``int``)."""
    return tuple(np.int32(v) for v in values)


def _doubles(*values):
    return tuple(np.float64(v) for v in values)


def _contiguous(*arrays):
    """Arrays a kernel updates in place must be contiguous already."""
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"fused kernels need contiguous arrays, got shape {a.shape} strides {a.strides}")


def _c(a):
    """A contiguous version of an input (no copy when it already is)."""
    return a if a.flags.c_contiguous else backend.get_array_module(a).ascontiguousarray(a)


# ---------------------------------------------------------------- optimizers

def sgd_update(p, g, v, hyper, momentum, nesterov, weight_decay, first):
    """In place: p (and v) after one SGD step; hyper = device [lr, ...] (DeviceScalars.array).

    v is ignored when momentum is 0; first=True sets v = g (the optimizer's first step).
    """
    _contiguous(p, *(() if v is None else (v,)))
    args = (p, _c(g), p if v is None else v, hyper, np.int64(p.size)) + _doubles(momentum, weight_decay)
    _launch("sgd_update", p, p.size, args + _ints(bool(nesterov), bool(first)))


def adam_update(p, g, m, v, hyper, b1, b2, eps, weight_decay):
    """In place: p, m, v after one Adam step; hyper = device [lr, 1 - b1^t, 1 - b2^t]."""
    _contiguous(p, m, v)
    args = (p, _c(g), m, v, hyper, np.int64(p.size)) + _doubles(b1, b2, eps, weight_decay)
    _launch("adam_update", p, p.size, args)


# ---------------------------------------------------------------- layers

def lrn_forward(x, r, bias, alpha, beta):
    """(y, scale, denom) of LocalResponseNorm.forward: denom = bias + alpha * window sum of x^2."""
    x = _c(x)
    y, scale, denom = _empty_like(x), _empty_like(x), _empty_like(x)
    args = (x, y, scale, denom, np.int64(x.size)) + _ints(x.shape[-1], r) + _doubles(bias, alpha, beta)
    _launch("lrn_forward", x, x.size, args)
    return y, scale, denom


def lrn_backward(dy, x, scale, denom, r, alpha, beta):
    """dx of LocalResponseNorm.backward from the forward's (x, scale, denom)."""
    dy, x, scale, denom = _c(dy), _c(x), _c(scale), _c(denom)
    dx = _empty_like(x)
    args = (dy, x, scale, denom, dx, np.int64(x.size)) + _ints(x.shape[-1], r) + _doubles(2.0 * alpha * beta)
    _launch("lrn_backward", x, x.size, args)
    return dx


def maxpool_fits(k, stride):
    """Whether the fused max pool takes a k x k window moved by ``stride``: windows that do
    not overlap (stride >= k), and a window's offsets fit the byte that stores them."""
    return stride >= k and k * k <= 255


def maxpool_forward(x, k, stride, pads, out_hw):
    """(y, arg) of MaxPool2D.forward where maxpool_fits(k, stride); arg (uint8) is each
    window's first maximum (i * k + j), 255 for NaN."""
    if not maxpool_fits(k, stride):
        raise ValueError(f"fused max pooling needs stride >= k and k*k <= 255, got k={k}, stride={stride}")
    x = _c(x)
    xp = backend.get_array_module(x)
    b, h, w, c = x.shape
    oh, ow = out_hw
    y = xp.empty((b, oh, ow, c), dtype=x.dtype)
    arg = xp.empty((b, oh, ow, c), dtype=np.uint8)
    args = (x, y, arg, np.int64(y.size)) + _ints(h, w, c, oh, ow, k, stride, pads[0], pads[2])
    _launch("maxpool_forward", x, y.size, args)
    return y, arg


def maxpool_backward(dy, arg, x_shape, k, stride, pads):
    """dx of MaxPool2D.backward from the forward's arg."""
    dy, arg = _c(dy), _c(arg)
    xp = backend.get_array_module(dy)
    b, h, w, c = x_shape
    oh, ow = dy.shape[1:3]
    dx = xp.empty(x_shape, dtype=dy.dtype)
    args = (dy, arg, dx, np.int64(dx.size)) + _ints(h, w, c, oh, ow, k, stride, pads[0], pads[2])
    _launch("maxpool_backward", dy, dx.size, args)
    return dx


def relu_backward(dy, y):
    """dy * (y > 0) in one launch."""
    dy, y = _c(dy), _c(y)
    dx = _empty_like(dy)
    _launch("relu_backward", dy, dy.size, (dy, y, dx, np.int64(dy.size)))
    return dx


def dropout_forward(x, keep, key_words):
    """(mask, y): mask = 1/keep where u < keep else 0, y = x * mask; key_words = device
    uint32[2] (the 64-bit key of this call). u depends only on the key and the index."""
    x = _c(x)
    scale = np.dtype(x.dtype).type(1) / np.dtype(x.dtype).type(keep)
    mask, y = _empty_like(x), _empty_like(x)
    _launch("dropout_forward", x, x.size, (x, mask, y, key_words, np.int64(x.size)) + _doubles(keep, scale))
    return mask, y


def accumulate_step(sums, loss, logits, labels):
    """In place: sums[0] += loss * batch, sums[1] += correct predictions (sums: float64[2])."""
    if sums.dtype != np.float64 or sums.size < 2 or loss.dtype != logits.dtype:
        raise ValueError("accumulate_step: sums must be float64[2] and loss the dtype of logits")
    _contiguous(sums)
    loss, logits, labels = _c(loss), _c(logits), _c(labels.astype(np.int64, copy=False))
    n, k = logits.shape
    _launch("accumulate_step", logits, n, (sums, loss, logits, labels, np.int64(n)) + _ints(k))


def _conv_geometry(x_shape, kh, kw, stride, pads):
    g = ConvGeometry.of(x_shape, kh, kw, stride, pads)
    return _ints(g.h, g.w, g.C, kh, kw, stride, g.top, g.left, g.oh, g.ow), (g.oh, g.ow)


def im2col(x, kh, kw, stride, pads):
    """layers.conv.im2col in one launch: (B*OH*OW, kh*kw*C) and (OH, OW)."""
    x = _c(x)
    geometry, (oh, ow) = _conv_geometry(x.shape, kh, kw, stride, pads)
    cols = backend.get_array_module(x).empty((x.shape[0] * oh * ow, kh * kw * x.shape[3]), dtype=x.dtype)
    _launch("im2col", x, cols.size, (x, cols, np.int64(cols.size)) + geometry)
    return cols, (oh, ow)


def col2im(cols, x_shape, kh, kw, stride, pads):
    """layers.conv.col2im in one launch (a gather: deterministic, no atomics)."""
    cols = _c(cols)
    geometry, _ = _conv_geometry(x_shape, kh, kw, stride, pads)
    x = backend.get_array_module(cols).empty(x_shape, dtype=cols.dtype)
    _launch("col2im", cols, x.size, (cols, x, np.int64(x.size)) + geometry)
    return x
