"""Clusters from hash codes: ids, centroids and cluster sums (array-module reference).

Representation used everywhere (reference and CUDA paths):
    ids (N, G) int32       local cluster id of row n in group g, in [0, n_clusters[g])
    n_clusters (G,) int32  clusters per group
    centroids (G, Cmax, L) mean member of each cluster; rows >= n_clusters[g] are zero

Every "sum the rows of each cluster" and "give every row its cluster's row" of the
reuse pipeline is a product with one sparse 0/1 matrix, the *assignment matrix*
R (N x G*Cmax): row n has a one in column g*Cmax + ids[n, g] for every group g.

    reconstruct      y = R @ P          (P: the G*Cmax centroid products, stacked)
    cluster sums     S = R.T @ dY
    centroid sums    the same with one row per (n, g) pair

Why a sparse matrix: measured on 2 CPU cores for conv2 of CifarNet (32768 rows,
25 groups, 64 outputs), R @ P took 22 ms and R.T @ dY 21 ms; a chunked
``take(...).sum()`` gather took 50 ms, one ``take`` + add per group 46 ms, and
``np.add.at`` is slower by more than an order of magnitude. The products never
build an (N, G, M) temporary, so memory stays at the size of R (N*G indices).
On the CPU fast path, ``product`` runs them compiled on every core (cpu/sparse.py).
CuPy has the same API in cupyx.scipy.sparse (cuSPARSE).
"""
import numpy as np

from .. import backend, cpu
from ..cpu import sparse as cpu_sparse

# Number clusters with a dense (group, code) presence table while it is small,
# both in bytes (a 16 MB bool table at most) and next to the number of keys
# (a table much larger than the keys costs more to scan than sorting the keys).
DENSE_TABLE_MAX = 1 << 24
DENSE_TABLE_PER_KEY = 8


def sparse_module(xp):
    """scipy.sparse for NumPy arrays, cupyx.scipy.sparse for CuPy arrays."""
    if xp is np:
        import scipy.sparse
        return scipy.sparse
    backend.require_gpu()
    import cupyx.scipy.sparse
    return cupyx.scipy.sparse


def assign_clusters(codes, H=32):
    """ids (N, G) int32 and n_clusters (G,) int32 from codes (N, G) of H bits (up to 64).

    Rows of one group with equal codes share a cluster; clusters of group g are
    numbered 0.. in increasing code order. No loop over rows or groups.
    """
    xp = backend.get_array_module(codes)
    n, g = codes.shape
    if g << H <= min(DENSE_TABLE_MAX, DENSE_TABLE_PER_KEY * codes.size):
        # Dense table: mark which (group, code) pairs occur; the running count of
        # marks along each group's row numbers its clusters. O(N*G + G*2**H).
        key = (xp.arange(g, dtype=xp.int64) << H) + codes.astype(xp.int64)
        present = xp.zeros(g << H, dtype=bool)
        present[key.ravel()] = True
        present = present.reshape(g, 1 << H)
        number = xp.cumsum(present, axis=1, dtype=xp.int32) - 1
        return number.ravel()[key], number[:, -1] + 1
    return number_sorted_runs(codes)


def number_sorted_runs(codes):
    """ids (N, G) int32 and n_clusters (G,) int32 by sorting each group's codes.

    Too many possible codes for a table (and no room for the group beside a
    64-bit code in one integer key): sort every group's column of codes at once
    (an argsort along the rows of codes.T), count the runs of equal codes along
    the sorted order, and scatter each run's number back to its rows.
    """
    xp = backend.get_array_module(codes)
    n, g = codes.shape
    by_group = codes.T                                          # (G, N)
    order = xp.argsort(by_group, axis=1)
    ordered = xp.take_along_axis(by_group, order, axis=1)
    run_starts = xp.concatenate([xp.ones((g, 1), dtype=bool), ordered[:, 1:] != ordered[:, :-1]], axis=1)
    number = xp.cumsum(run_starts, axis=1, dtype=xp.int32) - 1
    ids = xp.empty((g, n), dtype=xp.int32)
    ids[xp.arange(g)[:, None], order] = number
    return xp.ascontiguousarray(ids.T), number[:, -1] + 1


def group_keys(ids, cmax):
    """(N, G) int32 column of each (row, group) in the stacked (G*Cmax) cluster axis."""
    xp = backend.get_array_module(ids)
    g = ids.shape[1]
    if g * cmax >= 2 ** 31:
        raise ValueError(f"{g} groups x {cmax} clusters do not fit int32 cluster keys")
    return ids + xp.arange(g, dtype=xp.int32) * xp.int32(cmax)


def assignment_matrix(keys, n_cols, dtype):
    """Sparse (rows x n_cols) 0/1 matrix with a one at (r, keys[r, j]) for every j.

    keys (rows, per_row) int32; the ones of a row must be in distinct columns.
    """
    xp = backend.get_array_module(keys)
    rows, per_row = keys.shape
    indptr = xp.arange(0, rows * per_row + 1, per_row, dtype=xp.int32)
    data = xp.ones(rows * per_row, dtype=dtype)
    return sparse_module(xp).csr_matrix((data, keys.ravel(), indptr), shape=(rows, n_cols))


def centroids(Xg, ids, n_clusters):
    """Centroids (G, Cmax, L) and member counts (G, Cmax) of every cluster.

    Cmax = max n_clusters (a host sync on the GPU: the reference path sizes its
    arrays from it; the CUDA path uses a fixed capacity instead).
    """
    xp = backend.get_array_module(Xg, ids)
    n, g, L = Xg.shape
    cmax = int(n_clusters.max())
    keys = group_keys(ids, cmax).reshape(-1, 1)            # one row per (n, g) vector
    members = assignment_matrix(keys, g * cmax, Xg.dtype)  # (N*G) x (G*Cmax)
    sums = members.T @ Xg.reshape(n * g, L)
    counts = xp.bincount(keys.ravel(), minlength=g * cmax).reshape(g, cmax)
    mean = sums.reshape(g, cmax, L) / xp.maximum(counts, 1)[:, :, None].astype(Xg.dtype)
    return mean, counts


def cluster_sums(dY, ids, cmax, R=None):
    """S (G, Cmax, M): S[g, c] = sum of the rows dY[n] with ids[n, g] == c.

    R, the assignment matrix of (ids, cmax), is rebuilt when not given.
    """
    g = ids.shape[1]
    if R is None:
        R = assignment_matrix(group_keys(ids, cmax), g * cmax, dY.dtype)
    return transposed_product(R, dY).reshape(g, cmax, dY.shape[1])


def product(R, B):
    """R @ B for the CSR assignment matrix R (or its transpose in CSR form) and a dense B.

    On the CPU fast path a compiled kernel where numba is installed (cpu/sparse.py,
    the same result bit for bit); otherwise (the array code, CuPy) scipy's R @ B.
    """
    if cpu.supports(B):
        return cpu_sparse.product(R, B)
    return R @ B


def transposed_product(R, dY):
    """R.T @ dY for the CSR assignment matrix R.

    scipy multiplies by R.T through a CSC view of R, which scatters into the rows
    of the result; converting R.T to CSR first (a sort of the ones by column) and
    gathering is faster in all: 8 + 24 ms against 46 ms for CifarNet's conv2
    (32768 x 25 ones, 64 columns; 2-core CPU). cupyx's product is left as it is.
    """
    if isinstance(dY, np.ndarray):
        return product(R.T.tocsr(), dY)
    return R.T @ dY


def reconstruct(R, P):
    """y (N, M): y[n] = sum_g P[g, ids[n, g]] for P (G, Cmax, M), as R @ P."""
    return product(R, P.reshape(-1, P.shape[-1]))
