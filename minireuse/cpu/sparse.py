"""The reuse path's sparse products, R @ B, compiled where numba is installed.

The reconstruct y = R @ P and the cluster sums S = R^T @ dY (through the CSR
form of R^T) are products of a sparse 0/1 matrix with a dense one
(reuse/clustering.py). scipy computes them in one thread and adds the dense
columns one at a time; the numba kernel of kernels.py runs the same loop with
the columns in vector instructions and the rows on every core, so the result is
scipy's bit for bit. Without numba (the ``fast`` extra, which the ``test`` extra
and ``make`` bring) the product is scipy's.

Measured on CifarNet's conv2 with the 'pca' L64 H16 setting (R: 32768 x 61250,
25 ones per row; B: 64 columns; 2-core AMD EPYC, 2 threads), the conv2 layer's
forward and backward in a loop, interleaved: scipy 51-54 / 46-49 ms, the kernel
36-40 / 37 ms. Blocks of R's rows handed to scipy on the thread pool (scipy
releases the GIL) ran twice as fast in isolation but no faster inside the layer.
"""
from . import compiled_kernels, threads


def product(R, B):
    """R @ B for a scipy CSR matrix R (n, k) and a dense NumPy B (k, m)."""
    kernels = compiled_kernels()
    if kernels is not None and R.dtype == B.dtype:
        return kernels.csr_product(R.indptr, R.indices, R.data, B, threads())
    return R @ B
