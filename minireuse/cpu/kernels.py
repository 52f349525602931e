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
  NumPy). LRN as a kernel was slower than ops.py (24 / 27 against 20 / 21 ms:
  its window sums are one BLAS GEMM there), so it stays NumPy.

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
