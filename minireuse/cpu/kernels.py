"""Compiled (numba) loops of the CPU fast path; importing this module needs numba.

Only where one beats threaded NumPy by a clear margin (measured on a 2-core AMD
EPYC, 2 threads, after a 96 MB write so that no input is in cache):

- csr_product, the reuse path's sparse products (cpu/sparse.py): scipy's
  CSR-times-dense loop, one row of the result per iteration, the ones of the row
  in order, so the result is scipy's bit for bit; the inner loop over the dense
  columns compiles to vector instructions and the rows run on every thread.
- maxpool_backward: dY written at each window's first maximum in one pass over
  dx, 8.5-9.8 ms against 17.9-19.8 ms for ops.maxpool_backward (CifarNet's pool1).
  The forward as a kernel was no faster than ops.maxpool_forward (19.5-27.6
  against 22.8-26.6 ms), nor was LRN (24 / 27 against 20 / 21 ms: its window sums
  are one BLAS GEMM in ops.py), so those stay NumPy.

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
