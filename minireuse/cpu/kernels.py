"""Compiled (numba) loops of the CPU fast path; importing this module needs numba.

Only where one beats threaded NumPy by a clear margin (measured on a 2-core AMD
EPYC, 2 threads, after a 96 MB write so that no input is in cache):

- csr_product, the reuse path's sparse products (cpu/sparse.py): scipy's
  CSR-times-dense loop, one row of the result per iteration, the ones of the row
  in order, so the result is scipy's bit for bit; the inner loop over the dense
  columns compiles to vector instructions and the rows run on every thread.
- maxpool_forward / maxpool_backward: one pass over x, then over dx: 9.6 against
  31.4 ms and 7.8-9.8 against 17.9-19.8 ms for ops.maxpool_forward/backward
  (CifarNet's pool1). The forward vectorizes only with the window position kept
  in x's float type (a uint8 position beside float maxima ran no faster than
  NumPy).
- lrn_forward / lrn_backward: one pass over each row of channels, the window sums
  as 2r+1 shifted adds of a zero-padded copy of the row: 12.4 against 22.0 ms and
  5.4 against 25.6 ms for ops.lrn_forward/backward (CifarNet's norm1). A first
  version with the window's bounds inside the loops and the power's choice per
  element did not vectorize and was slower than NumPy (24 / 27 ms).

Compiled on first use and cached on disk.

Threads: numba's 'workqueue' layer, whose idle threads sleep. Its OpenMP layer
(numba's first choice where libgomp is found) keeps them spinning after a kernel,
on the cores OpenBLAS and the fast path's pool need next: the conv2 backward
that follows ran 10-20 ms slower with it (2-core CPU). NUMBA_THREADING_LAYER, when
set, is left as it is.
"""
import os

import numba
import numpy as np
from numba import njit, prange

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


def _use(threads):
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


@njit(parallel=True, cache=True)
def _csr_product(indptr, indices, data, B, out):
    m = B.shape[1]
    for i in prange(out.shape[0]):
        acc = out[i]
        for k in range(m):
            acc[k] = 0
        for jj in range(indptr[i], indptr[i + 1]):
            a = data[jj]
            row = B[indices[jj]]
            for k in range(m):
                acc[k] += a * row[k]


def csr_product(indptr, indices, data, B, threads):
    """R @ B for R = (data, indices, indptr) in CSR form and a dense B, on ``threads`` threads."""
    B = np.ascontiguousarray(B)
    out = np.empty((len(indptr) - 1, B.shape[1]), dtype=B.dtype)
    _use(threads)
    _csr_product(indptr, indices, data, B, out)
    return out


@njit(parallel=True, cache=True)
def _maxpool_forward(x, k, y, where):
    b, oh, ow, c = y.shape
    for n in prange(b):
        for i in range(oh):
            for j in range(ow):
                best, w = y[n, i, j], where[n, i, j]
                first = x[n, i * k, j * k]
                for ch in range(c):
                    best[ch] = first[ch]
                    w[ch] = 0
                for idx in range(1, k * k):
                    row = x[n, i * k + idx // k, j * k + idx % k]
                    at = w.dtype.type(idx)
                    for ch in range(c):             # selects of one width: vector instructions
                        v, m = row[ch], best[ch]
                        take = (v > m) | (v != v)   # strictly: ties keep the first; a NaN stays
                        best[ch] = v if take else m
                        w[ch] = at if take else w[ch]
                for ch in range(c):
                    if best[ch] != best[ch]:
                        w[ch] = 255                 # a NaN maximum gets no gradient


def maxpool_forward(x, k, threads):
    """(y, arg) of ops.maxpool_forward in one pass over x; arg in x's float type (255 for a
    NaN maximum), whose selects vectorize with the maximum's where uint8 ones do not."""
    b, h, w, c = x.shape
    y = np.empty((b, h // k, w // k, c), dtype=x.dtype)
    arg = np.empty(y.shape, dtype=x.dtype)
    _use(threads)
    _maxpool_forward(np.ascontiguousarray(x), k, y, arg)
    return y, arg


@njit(parallel=True, cache=True)
def _maxpool_backward(dy, arg, k, dx):
    b, oh, ow, c = dy.shape
    for n in prange(b):
        for i in range(oh):
            for j in range(ow):
                g, where = dy[n, i, j], arg[n, i, j]
                for idx in range(k * k):
                    out = dx[n, i * k + idx // k, j * k + idx % k]
                    for ch in range(c):
                        out[ch] = g[ch] * (where[ch] == idx)     # as ops: a NaN of dY spreads


def maxpool_backward(dy, arg, x_shape, k, threads):
    """dx of ops.maxpool_backward (the same values) in one pass over dx."""
    dx = np.empty(x_shape, dtype=dy.dtype)
    _use(threads)
    _maxpool_backward(np.ascontiguousarray(dy), arg, k, dx)
    return dx


@njit(parallel=True, cache=True)
def _lrn_forward(x, r, bias, alpha, beta, blocks, y, scale, d):
    n, c = x.shape
    bad = 0
    for blk in prange(blocks):
        padded = np.zeros(c + 2 * r, x.dtype)       # x^2 of one row between r zeros each side
        for row in range(n * blk // blocks, n * (blk + 1) // blocks):
            xr, dr, sr, yr = x[row], d[row], scale[row], y[row]
            for i in range(c):
                padded[r + i] = xr[i] * xr[i]
            for i in range(c):
                dr[i] = padded[i]
            for o in range(1, 2 * r + 1):
                for i in range(c):
                    dr[i] += padded[i + o]
            for i in range(c):
                dr[i] = bias + alpha * dr[i]
            if beta == 0.75:                        # as ops._power_neg: square roots
                for i in range(c):
                    root = np.sqrt(dr[i])
                    sr[i] = 1 / (root * np.sqrt(root))
            elif beta == 0.5:
                for i in range(c):
                    sr[i] = 1 / np.sqrt(dr[i])
            else:
                for i in range(c):
                    sr[i] = dr[i] ** -beta
            for i in range(c):
                yr[i] = xr[i] * sr[i]
                bad += not (np.isfinite(yr[i]) and np.isfinite(dr[i]))     # x^2 may overflow into d alone
    return bad


@njit(parallel=True, cache=True)
def _lrn_backward(dy, x, scale, d, r, k, blocks, dx):
    n, c = x.shape
    bad = 0
    for blk in prange(blocks):
        padded = np.zeros(c + 2 * r, x.dtype)
        sums = np.empty(c, x.dtype)
        for row in range(n * blk // blocks, n * (blk + 1) // blocks):
            g, xr, sr, dr, out = dy[row], x[row], scale[row], d[row], dx[row]
            for i in range(c):
                padded[r + i] = g[i] * xr[i] * sr[i] / dr[i]
            for i in range(c):
                sums[i] = padded[i]
            for o in range(1, 2 * r + 1):
                for i in range(c):
                    sums[i] += padded[i + o]
            for i in range(c):
                out[i] = g[i] * sr[i] - k * xr[i] * sums[i]
                bad += not np.isfinite(out[i])
    return bad


def _row_blocks(rows, threads):
    """Blocks of rows for a parallel loop: a few per thread, so that one finishing early helps."""
    _use(threads)
    return max(1, min(rows, 4 * threads))


def _heard(bad):
    """False when some value came out inf or NaN and NumPy's error handling (np.errstate) wants
    to hear of overflow, invalid or division: the caller then runs NumPy, which raises or warns
    as the array code does. A kernel sets no NumPy error flags."""
    return bad and any(np.geterr()[kind] != "ignore" for kind in ("over", "invalid", "divide"))


def lrn_forward(x, r, bias, alpha, beta, threads):
    """(y, scale, d) of ops.lrn_forward, one pass over each row of channels (None: see _heard)."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y, scale, d = (np.empty_like(rows) for _ in range(3))
    t = x.dtype.type
    bad = _lrn_forward(rows, r, t(bias), t(alpha), float(beta), _row_blocks(rows.shape[0], threads), y, scale, d)
    if _heard(bad):
        return None
    return y.reshape(x.shape), scale.reshape(x.shape), d.reshape(x.shape)


def lrn_backward(dy, x, scale, d, r, alpha, beta, threads):
    """dx of ops.lrn_backward, one pass over each row of channels (None: see _heard)."""
    rows = [np.ascontiguousarray(a).reshape(-1, a.shape[-1]) for a in (dy, x, scale, d)]
    dx = np.empty_like(rows[0])
    bad = _lrn_backward(*rows, r, dy.dtype.type(2.0 * alpha * beta), _row_blocks(dx.shape[0], threads), dx)
    if _heard(bad):
        return None
    return dx.reshape(dy.shape)


@njit(parallel=True, cache=True)
def _sparse_weight_grads(cols, dy, blocks, partial):
    n, m = dy.shape
    width = cols.shape[1]
    for blk in prange(blocks):
        acc = partial[blk]                          # (M, width): dW^T of the block's rows
        for row in range(n * blk // blocks, n * (blk + 1) // blocks):
            g, c = dy[row], cols[row]
            for j in range(m):
                v = g[j]
                if v != 0:                          # a NaN is not 0: it spreads as in the GEMM
                    a = acc[j]
                    for k in range(width):
                        a[k] += v * c[k]


def sparse_weight_grads(cols, dy2, threads):
    """cols^T @ dY (width, M) adding only the nonzero entries of dY: one row of the columns times
    each nonzero of that row of dY, into a (M, width) sum per block of rows (a few per thread)."""
    blocks = _row_blocks(dy2.shape[0], threads)
    partial = np.zeros((blocks, dy2.shape[1], cols.shape[1]), dtype=cols.dtype)
    _sparse_weight_grads(cols, np.ascontiguousarray(dy2), blocks, partial)
    return np.ascontiguousarray(partial.sum(axis=0).T)


@njit(parallel=True, cache=True)
def _sparse_input_grad(dy, Wt, stride, top, left, dx):
    b, oh, ow, m = dy.shape
    kh, kw, _, c = Wt.shape
    h, w = dx.shape[1], dx.shape[2]
    for n in prange(b):                             # one image's dx per iteration: no two threads add to one
        for oy in range(oh):
            for ox in range(ow):
                g = dy[n, oy, ox]
                for j in range(m):
                    v = g[j]
                    if v != 0:
                        for i in range(kh):
                            iy = oy * stride + i - top
                            if iy < 0 or iy >= h:
                                continue
                            for jj in range(kw):
                                ix = ox * stride + jj - left
                                if ix < 0 or ix >= w:
                                    continue
                                out, wrow = dx[n, iy, ix], Wt[i, jj, j]
                                for k in range(c):
                                    out[k] += v * wrow[k]


def sparse_input_grad(dy, W, x_shape, stride, pads, threads):
    """dX of a conv, col2im(dY @ W^T), adding only the nonzero entries of dY: each one times
    its filter's (kh, kw, C) weights into the input pixels its output read."""
    Wt = np.ascontiguousarray(W.transpose(0, 1, 3, 2))     # (kh, kw, M, C): one output channel's weights in a row
    dx = np.zeros(x_shape, dtype=dy.dtype)
    _use(threads)
    _sparse_input_grad(np.ascontiguousarray(dy), Wt, stride, pads[0], pads[2], dx)
    return dx
