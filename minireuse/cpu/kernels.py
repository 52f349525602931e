"""Compiled (numba) loops of the CPU fast path; importing this module needs numba.

csr_product is scipy's CSR-times-dense loop, one row of the result per iteration,
the ones of the row in order, so the result is scipy's bit for bit; numba
compiles the inner loop over the dense columns to vector instructions and runs
the rows on every thread (``prange``). Compiled on first use and cached on disk.

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
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    _csr_product(indptr, indices, data, B, out)
    return out
