"""Fast CPU twins of LocalResponseNorm, MaxPool2D and ReLU (NumPy, every core).

Each function computes what its layer's array code computes, on shards of the
batch in parallel, writing into preallocated outputs. What changes besides the
threads:

- LRN's window sum over 2r+1 channels is one GEMM with a (C, C) band matrix of
  ones (BLAS on every core) instead of a padded copy and a cumulative sum (whose
  differences also lose precision), and for TensorFlow's beta = 0.75, D^-0.75 is
  1 / (sqrt(D) * sqrt(sqrt(D))): square roots are vector instructions, a general
  power is not (about 15 times slower here).
- Max pooling with windows that tile the input (stride = k, no padding) keeps the
  window position of each first maximum as a byte; the backward writes dY there
  (one pass) instead of comparing every window offset with the maximum again.
"""
import numpy as np

from . import CHUNK_ELEMENTS, compiled_kernels, parallel, threads


def _rows(a):
    """a as a (rows, channels) matrix without a copy."""
    return a.reshape(-1, a.shape[-1])


def band(c, r, dtype):
    """(c, c) matrix with ones where |i - j| <= r: rows @ band = the window sums of the rows."""
    i = np.arange(c)
    return (np.abs(i[:, None] - i[None, :]) <= r).astype(dtype)


def _power_neg(d, beta, out):
    """out = d ** -beta; square roots for beta = 0.75 and 0.5."""
    if beta == 0.75:
        np.sqrt(d, out=out)
        np.multiply(out, np.sqrt(out), out=out)
        np.reciprocal(out, out=out)
    elif beta == 0.5:
        np.sqrt(d, out=out)
        np.reciprocal(out, out=out)
    else:
        np.power(d, -beta, out=out)


def lrn_forward(x, r, bias, alpha, beta):
    """(y, scale, d) of LocalResponseNorm.forward: d = bias + alpha * window_sum(x^2), scale = d^-beta.

    Three phases: x^2 on the threads, its window sums as one GEMM with the band
    matrix (BLAS, every core), then d, scale and y on the threads in cache-sized pieces.
    """
    kernels = compiled_kernels()
    out = kernels and kernels.lrn_forward(x, r, bias, alpha, beta, threads())
    if out is not None:         # one pass per row (kernels.py), twice as fast
        return out
    x2 = _rows(x)
    n, c = x2.shape
    y, scale, d = (np.empty_like(x2) for _ in range(3))
    dtype = x.dtype.type
    parallel(lambda lo, hi: np.multiply(x2[lo:hi], x2[lo:hi], out=scale[lo:hi]), n, c)   # x^2, in scale for now
    np.matmul(scale, band(c, r, x.dtype), out=d)

    def finish(lo, hi):
        ds, ss = d[lo:hi], scale[lo:hi]
        ds *= dtype(alpha)
        ds += dtype(bias)
        _power_neg(ds, beta, ss)
        np.multiply(x2[lo:hi], ss, out=y[lo:hi])

    parallel(finish, n, c, CHUNK_ELEMENTS)
    return y.reshape(x.shape), scale.reshape(x.shape), d.reshape(x.shape)


def lrn_backward(dy, x, scale, d, r, alpha, beta):
    """dx of LocalResponseNorm.backward:
    dx = dy * scale - 2 alpha beta * x * window_sum(dy * x * scale / d)."""
    kernels = compiled_kernels()
    dx = kernels and kernels.lrn_backward(dy, x, scale, d, r, alpha, beta, threads())
    if dx is not None:          # one pass per row (kernels.py), four times as fast
        return dx
    dy2, x2, s2, d2 = _rows(dy), _rows(x), _rows(scale), _rows(d)
    n, c = dy2.shape
    t, dx = np.empty_like(dy2), np.empty_like(dy2)
    k = dy.dtype.type(2.0 * alpha * beta)

    def terms(lo, hi):
        ts = t[lo:hi]
        np.multiply(dy2[lo:hi], x2[lo:hi], out=ts)
        ts *= s2[lo:hi]
        ts /= d2[lo:hi]

    parallel(terms, n, c, CHUNK_ELEMENTS)
    ws = t @ band(c, r, dy.dtype)

    def finish(lo, hi):
        w = ws[lo:hi]
        w *= x2[lo:hi]
        w *= k
        out = dx[lo:hi]
        np.multiply(dy2[lo:hi], s2[lo:hi], out=out)
        out -= w

    parallel(finish, n, c, CHUNK_ELEMENTS)
    return dx.reshape(dy.shape)


def relu_forward(x):
    y = np.empty_like(x)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    parallel(lambda lo, hi: np.maximum(flat_x[lo:hi], 0, out=flat_y[lo:hi]), flat_x.size)
    return y


def relu_backward(dy, y):
    """dy * (y > 0)."""
    dx = np.empty_like(dy)
    fd, fy, fx = dy.reshape(-1), y.reshape(-1), dx.reshape(-1)

    parallel(lambda lo, hi: np.multiply(fd[lo:hi], fy[lo:hi] > 0, out=fx[lo:hi]), fd.size)
    return dx


def tiles_input(x_shape, k, stride, pads):
    """True when k x k windows with this stride tile the input exactly (no padding, no overlap)."""
    _, h, w, _ = x_shape
    return stride == k and not any(pads) and h % k == 0 and w % k == 0 and k * k <= 255


def _windows(a, k):
    """(B, OH, k, OW, k, C) view of a (B, OH*k, OW*k, C) array."""
    b, h, w, c = a.shape
    return a.reshape(b, h // k, k, w // k, k, c)


def maxpool_forward(x, k):
    """(y, arg): the k x k/k max pool of an input it tiles, and each window's first maximum
    (offset i*k + j in (dy, dx) order; 255 for a NaN maximum) as uint8 (x's float type
    from the numba kernel)."""
    kernels = compiled_kernels()
    if kernels is not None:     # one pass over x (kernels.py), three times as fast
        return kernels.maxpool_forward(x, k, threads())
    b, h, w, c = x.shape
    xw = _windows(x, k)
    y = np.empty((b, h // k, w // k, c), dtype=x.dtype)
    arg = np.empty(y.shape, dtype=np.uint8)

    def shard(lo, hi):
        ys, args = y[lo:hi], arg[lo:hi]
        better, marked = np.empty(ys.shape, dtype=bool), np.empty(ys.shape, dtype=np.uint8)
        np.copyto(ys, xw[lo:hi, :, 0, :, 0, :])
        args[...] = 0
        for idx in range(1, k * k):
            v = xw[lo:hi, :, idx // k, :, idx % k, :]
            np.greater(v, ys, out=better)                  # strictly: ties keep the first maximum
            # args = idx where better: offsets grow, so a maximum with better * idx does it
            # (ten times faster than copyto with where=)
            np.multiply(better, np.uint8(idx), out=marked)
            np.maximum(args, marked, out=args)
            np.maximum(ys, v, out=ys)                      # NaN propagates as in the array code
        np.multiply(np.isnan(ys), np.uint8(255), out=marked)
        np.maximum(args, marked, out=args)                 # a NaN maximum gets no gradient, as there

    parallel(shard, b, h * w * c, 4 * CHUNK_ELEMENTS)
    return y, arg


def maxpool_backward(dy, arg, x_shape, k):
    """dx of the tiling max pool: each window's dY at its first maximum, zero elsewhere."""
    kernels = compiled_kernels()
    if kernels is not None:     # one pass over dx (kernels.py), twice as fast; arg of either dtype
        return kernels.maxpool_backward(dy, arg, x_shape, k, threads())
    b = x_shape[0]
    dx = np.empty(x_shape, dtype=dy.dtype)
    dxw = _windows(dx, k)

    def shard(lo, hi):
        for idx in range(k * k):
            out = dxw[lo:hi, :, idx // k, :, idx % k, :]
            np.multiply(dy[lo:hi], arg[lo:hi] == idx, out=out)

    parallel(shard, b, dy[0].size * k * k, 4 * CHUNK_ELEMENTS)
    return dx
