"""The deep-reuse matrix product y = X @ W + b, forward and backward (reference path).

Read top to bottom, this is the whole technique for one product X (N, K) @ W (K, M)
(reuse_matmul_simple, first below, is these steps alone, without options):

1. split the K columns into G groups of L (zero-pad the last): Xg (N, G, L)
2. hash every neuron vector Xg[n, g] to an H-bit code, H <= 64   (lsh.py)
   (family 'centred': thresholds from the mean and std of the projections;
    'pca': planes along the principal axes of the vectors, cut into a grid)
3. equal codes in a group form a cluster: ids (N, G)              (clustering.py)
4. centroids C (G, Cmax, L), one GEMM per group: P_g = C_g @ W_g
5. reconstruct y[n] = sum_g P[g, ids[n, g]] (+ b)

Backward with the assignment held fixed (the exact gradient of the clustered forward):
    S[g, c] = sum of dY rows in cluster c of group g,   dW_g = C_g^T @ S_g,  db = sum dY
    dX 'exact':   dY @ W^T
    dX 'cluster': dx[n, g] = (S[g, c] / |c|) @ W_g^T  for c = ids[n, g]

dw_sample = p corrects the centroid dW, which misses sum_n (x_n - c_n)^T dy_n (c_n the
row of centroids that stands for x_n): the residuals of every s-th row (s = round(1/p))
from a random start, times s, estimate that sum without bias, so dW is X^T dY in
expectation (at p = 1 exactly) for the price of an (N/s)-row GEMM.

forward 'exact' reuses in the backward only: steps 1-3 and the centroids run as
above (the backward needs them), but y is the exact X @ W + b and the centroid
GEMM and the reconstruct are skipped. With measure_error the backward also
records how its dW compares with the exact X^T @ dY ('dw_cos', 'dw_gain') and,
with dx_mode 'cluster', its dX with the exact dY @ W^T ('dx_cos', 'dx_gain';
common.record_gradient).

The same functions serve dense layers and the general conv path (im2col rows,
see conv.py). dispatch.py decides when the CUDA fast path (minireuse.reuse.cuda)
runs instead; this file stays the oracle it is tested against.
"""
import dataclasses

import numpy as np

from .. import backend
from . import lsh
from .clustering import assign_clusters, assignment_matrix, centroids, cluster_sums, group_keys, reconstruct
from .common import DwCorrection, dw_sample_draw, record_gradient, relative_error, row_residuals


def reuse_matmul_simple(X, W, L=16, H=12, seed=0):
    """The idea alone: X (N, K) @ W (K, M) with deep reuse, no options, no statistics.

    Equal (up to float summation order) to reuse_matmul_forward with ReuseConfig(L=L, H=H,
    seed=seed) and no bias: the default family ('offset' planes, shared by the groups)."""
    xp = backend.get_array_module(X, W)
    Xg = lsh.split_groups(X, L)                                    # 1. (N, G, L) neuron vectors
    planes, unit_offsets = lsh.draw_hash_params(L, H, Xg.shape[1], seed, shared=True)
    planes, unit_offsets = xp.asarray(planes, X.dtype), xp.asarray(unit_offsets, X.dtype)
    codes = lsh.hash_codes(Xg, planes, unit_offsets * lsh.input_scale(X))    # 2. an H-bit code each
    ids, n_clusters = assign_clusters(codes, H)                    # 3. equal codes: one cluster
    C, _ = centroids(Xg, ids, n_clusters)                          #    its mean (G, Cmax, L)
    P = C @ group_weights(W, L)                                    # 4. one small GEMM per group
    groups = xp.arange(Xg.shape[1])
    return P[groups, ids].sum(axis=1)                              # 5. y[n] = sum_g P[g, ids[n, g]]


def impl_label(xp):
    """How the reference path is labelled in statistics and benchmarks."""
    return "numpy-reference" if xp is np else "cupy-reference"


def group_weights(W, L):
    """(K, M) -> (G, L, M): the rows of W that multiply each column group (zero rows pad)."""
    return lsh.pad_to_groups(W, L, 0).reshape(-(-W.shape[0] // L), L, W.shape[1])


def hash_groups(Xg, config, state, scale_source, stats_source=None):
    """Codes (N, G) of the neuron vectors Xg (N, G, L) under config's planes.

    scale_source: the array whose RMS scales the 'offset' thresholds;
    stats_source: the vectors (n, G, L) whose projections centre the 'centred'
    thresholds, or that 'pca' fits its axes to (Xg itself by default; the unpadded
    pixels on the pixel-aligned path).
    """
    xp = backend.get_array_module(Xg)
    n, g, L = Xg.shape
    fitted_to = Xg if stats_source is None else stats_source
    if config.family == "pca":
        return lsh.hash_codes(Xg, *lsh.pca_params(fitted_to, config.H, config.shared_planes))
    planes, unit_offsets = state.hash_params(L, config.H, g, config.family, config.seed,
                                             config.shared_planes, xp, Xg.dtype)
    if config.family == "centred":
        mean, std = lsh.projection_stats(fitted_to, planes)
        b = lsh.centred_offsets(unit_offsets, mean, std)
    else:
        b = lsh.offsets(unit_offsets, config.family, lsh.input_scale(scale_source))
    return lsh.hash_codes(Xg, planes, b)


@dataclasses.dataclass
class MatmulCache:
    """What the backward of one reuse product needs (the assignment is held fixed)."""

    W: object            # (K, M)
    Wg: object           # (G, L, M)
    R: object            # sparse assignment matrix (N, G*Cmax)
    ids: object          # (N, G)
    centroids: object    # (G, Cmax, L)
    counts: object       # (G, Cmax)
    has_bias: bool
    dx_mode: str
    X: object = None     # measure_error only: the input, for the exact dW of dw_cos
    stats: dict = None   # measure_error only: the stats entry that receives dw_cos, dx_cos, ...
    correction: object = None   # dw_sample: DwCorrection of the sampled rows


def reuse_matmul_forward_assigned(X, W, b, ids, n_clusters, L, dx_mode="exact", forward="reuse",
                                  sample=None):
    """y = X @ W + b with deep reuse under a given assignment (ids, n_clusters) of groups of L.

    Returns (y, cache). forward 'exact': y is the exact product and the cache the
    same as with 'reuse' (the backward reuses the clusters). sample: draw(n) ->
    (start, step) of the rows whose residuals correct dW (dw_sample). Tests hold the
    assignment fixed through this function (numerical gradients, identity
    assignment = exact product).
    """
    Xg = lsh.split_groups(X, L)
    g = Xg.shape[1]
    C, counts = centroids(Xg, ids, n_clusters)             # (G, Cmax, L)
    Wg = group_weights(W, L)                               # (G, L, M)
    cmax = C.shape[1]
    R = assignment_matrix(group_keys(ids, cmax), g * cmax, X.dtype)
    if forward == "exact":
        y = X @ W                                          # no centroid GEMM, no reconstruct
    else:
        P = C @ Wg                                         # (G, Cmax, M): one small GEMM per group
        y = reconstruct(R, P)                              # y[n] = sum_g P[g, ids[n, g]]
    if b is not None:
        y += b
    cache = MatmulCache(W, Wg, R, ids, C, counts, b is not None, dx_mode)
    if sample is not None:
        cache.correction = DwCorrection.drawn(sample, X.shape[0], backend.get_array_module(X),
                                              lambda rows: row_residuals(X, C, ids, rows))
    return y, cache


def reuse_matmul_forward(X, W, b, config, state, train=True, scale_source=None):
    """(y, cache) of the reuse product X (N, K) @ W (K, M) + b (reference path).

    scale_source: the array whose RMS scales the 'offset' family's thresholds
    (the unpadded conv input for im2col rows; X itself by default). Records one
    entry in state.stats. cache is None when train is False.
    """
    xp = backend.get_array_module(X, W, b)
    Xg = lsh.split_groups(X, config.L)
    codes = hash_groups(Xg, config, state, X if scale_source is None else scale_source)
    ids, n_clusters = assign_clusters(codes, config.H)
    y, cache = reuse_matmul_forward_assigned(X, W, b, ids, n_clusters, config.L, config.dx_mode,
                                             config.forward, dw_sample_draw(config, state, train))
    rel_error = None
    if config.measure_error:
        # forward 'exact': y is the exact product, its own reference (rel_error 0)
        exact = y if config.forward == "exact" else (X @ W if b is None else X @ W + b)
        rel_error = relative_error(y, exact)
    entry = state.record(r_c=n_clusters.sum() / ids.size, n_clusters=n_clusters, impl=impl_label(xp),
                         rel_error=rel_error, train=train)
    if not train:
        return y, None
    if config.measure_error:
        cache.X, cache.stats = X, entry
    return y, cache


def reuse_matmul_backward(dy, cache, input_grad=True):
    """(dX, dW, db) of the reuse product with the forward's assignment; db None without bias,
    dX None when not input_grad.

    When the forward measured the error (cache.X kept), also stores dw_cos and dw_gain
    against the exact X^T @ dY (and dx_cos, dx_gain against dY @ W^T when dX is
    clustered) in the forward's stats entry.
    """
    xp = backend.get_array_module(dy)
    k, m = cache.W.shape
    g, cmax, L = cache.centroids.shape
    S = cluster_sums(dy, cache.ids, cmax, cache.R)                      # (G, Cmax, M)
    dW = (cache.centroids.transpose(0, 2, 1) @ S).reshape(g * L, m)[:k]
    if cache.correction is not None:
        dW += cache.correction.dW(dy)
    if cache.X is not None:
        record_gradient(cache.stats, "dw", dW, cache.X.T @ dy)
    db = dy.sum(axis=0) if cache.has_bias else None
    if not input_grad:
        return None, dW, db
    if cache.dx_mode == "exact":
        dX = dy @ cache.W.T
    else:
        # every member of a cluster gets 1/|c| of the gradient of its centroid
        mean_dy = S / xp.maximum(cache.counts, 1)[:, :, None].astype(dy.dtype)
        per_cluster = mean_dy @ cache.Wg.transpose(0, 2, 1)             # (G, Cmax, L)
        keys = group_keys(cache.ids, cmax)
        dXg = xp.take(per_cluster.reshape(g * cmax, L), keys, axis=0)   # (N, G, L)
        dX = dXg.reshape(dy.shape[0], g * L)[:, :k]
        if cache.X is not None:
            record_gradient(cache.stats, "dx", dX, dy @ cache.W.T)
    return dX, dW, db
