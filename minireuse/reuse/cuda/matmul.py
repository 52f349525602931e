"""The deep-reuse product X (N, K) @ W (K, M) + b on the fast path; twin: reuse/matmul.py.

forward (3 launches + 1 cuBLAS call + 1 gather):
    input_rms, hash_rows_h*, centroid_sums    clustering.cluster
    cuBLAS     P = sums @ W_g for all groups in one strided-batched GEMM
    reconstruct_rows    y[n] = sum_g P[g, id] / count (+ b)
backward:
    cluster_sums_rows   S = per-cluster sums of dY / count, db, overflow dW
    cuBLAS     dW_g += sums_g^T @ S_g
    dX 'exact'   cuBLAS dY @ W^T;  'cluster'  cuBLAS D = S @ W_g^T, then dx_cluster_rows

Options as on the reference path: family 'centred' computes its thresholds on the
device first (lsh.centred_thresholds), family 'pca' its planes and thresholds
(lsh.pca_hash_params); forward 'exact' replaces the centroid GEMM
and the reconstruct by X @ W + b, the clustering staying for the backward;
dw_sample adds the sampled residuals' dW (common.DwCorrection, as the reference) and
measure_error how dW (and a clustered dX) compare with the exact ones (dw_cos,
dw_gain, dx_cos, dx_gain: common.record_gradient).

Nothing is copied to the host inside a call (after a call site's first,
calibrating call), so a forward + backward can be captured in a CUDA graph
(dw_sample's start is drawn on the host every call: training.graphs does not capture it).
"""
import dataclasses

import numpy as np

from .. import lsh as reference_lsh
from ..common import DwCorrection, dw_sample_draw, record_gradient, relative_error, row_residuals
from .clustering import cluster, cluster_means, dx_cluster_rows, launch_cluster_sums_rows, reconstruct_rows
from .lsh import Rows, family_hash_params
from .capacity import Arena, cuda_state
from .runtime import STAT_OVERFLOW, as_f32, check, check_index_range, device


def batched_gemm(a, b, out=None, trans_a=False, trans_b=False, beta=0.0):
    """out[i] = op(a[i]) @ op(b[i]) + beta * out[i] for stacked row-major float32 matrices.

    One cublasSgemmStridedBatched call, transposes by flag (never a copy). The
    row-major product is the column-major out^T = op(b)^T op(a)^T, so b is
    cuBLAS's first operand.
    """
    check("a", a, np.float32, (None, None, None))
    check("b", b, np.float32, (a.shape[0], None, None))
    batch = a.shape[0]
    m, k = (a.shape[2], a.shape[1]) if trans_a else (a.shape[1], a.shape[2])
    kb, n = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    if kb != k:
        raise ValueError(f"b: expected {k} rows in op(b) to match op(a) {(m, k)}, got op(b) {(kb, n)}")
    if out is None:
        if beta != 0.0:
            raise ValueError("out: required when beta is not 0")
        out = device().xp.empty((batch, m, n), dtype=np.float32)
    check("out", out, np.float32, (batch, m, n))
    device().gemm_strided_batched(trans_b, trans_a, n, m, k, b, b.shape[2], b.shape[1] * b.shape[2],
                                  a, a.shape[2], a.shape[1] * a.shape[2], beta, out, n, m * n, batch)
    return out


def group_weights(W, G, L, ws_pad):
    """W (K, M) as (G, L, M): a view when L divides K, else copied into the zeroed ws_pad (G*L, M)."""
    K, M = W.shape
    if G * L == K:
        return W.reshape(G, L, M)
    device().copy(ws_pad[:K], W)
    return ws_pad.reshape(G, L, M)


@dataclasses.dataclass
class CudaMatmulCache:
    """What the backward of one CUDA reuse product needs (assignment fixed)."""

    X: object            # (N, K): overflow members' exact gradients
    W: object            # (K, M)
    Wg: object           # (G, L, M), zero rows pad the last group
    ids: object          # (N, G), -1 = overflow
    counts: object       # (G, capacity)
    sums: object         # (G, capacity, L) unnormalised centroids
    has_bias: bool
    L: int
    dx_mode: str
    overflow_gemm: bool = False   # overflow members' dW by one GEMM (the last statistics overflowed)
    correction: object = None     # dw_sample: DwCorrection of the sampled rows
    stats: dict = None            # measure_error: the stats entry that receives dw_cos, dx_cos, ...
    used: bool = False


def take(cache):
    """The cache, marked used: a backward consumes the forward's assignment once."""
    if cache.used:
        raise RuntimeError("deep-reuse CUDA backward called twice for one forward; run the forward again")
    cache.used = True
    return cache


def record(state, run, impl_extra, rel_error, train):
    return state.record(r_c=run["r_c"], n_clusters=run["distinct"], impl="cuda", rel_error=rel_error,
                 capacity=run["capacity"], overflow=run["stats"][STAT_OVERFLOW], train=train, **impl_extra)


def matmul_forward(X, W, b, config, state, train, scale_source, batch):
    """(y, cache or None, clustering run) of the product; the conv's general path calls it on im2col rows."""
    N, K = X.shape
    M = W.shape[1]
    L, H = config.L, config.H
    G = -(-K // L)
    planes, offsets = family_hash_params(state, config, G, lambda: reference_lsh.split_groups(X, L))
    tracker = cuda_state(state).tracker(("rows", N, G, L, H), N, H, batch=batch, train=train)

    def extra(cap):
        check_index_range("G x capacity x M", G * cap * max(M, L))
        return [] if G * L == K else [("W_pad", (G * L, M), np.float32)]

    run = cluster(Rows.matrix(X), L, G, planes, offsets, H, config.family, tracker, scale_source, extra)
    Wg = group_weights(W, G, L, run.get("W_pad"))
    if config.forward == "exact":
        y = X @ W                                                      # no centroid GEMM, no reconstruct
        if b is not None:
            y += b
    else:
        P = batched_gemm(run["sums"], Wg)                               # (G, cap, M)
        y = reconstruct_rows(P, run["ids"], run["counts"], X, W, b, L)
    cache = None
    if train:
        cache = CudaMatmulCache(X, W, Wg, run["ids"], run["counts"], run["sums"], b is not None, L,
                                config.dx_mode, run["overflow_gemm"])
        draw = dw_sample_draw(config, state, train)
        if draw is not None:
            cache.correction = DwCorrection.drawn(draw, N, device().xp, lambda rows: residual_rows(
                X, run["sums"], run["counts"], run["ids"], rows, L))
    return y, cache, run


def residual_rows(X, sums, counts, ids, rows, L):
    """(m, K): common.row_residuals of X[rows] against the centroids (sums (G, cap, L)
    unnormalised); a (row, group) computed exactly (id -1) stands for itself (residual 0)."""
    xp = device().xp
    means = cluster_means(sums, counts)
    exact = xp.repeat(ids[rows] < 0, L, axis=1)[:, :X.shape[1]]
    return row_residuals(X, means, xp.maximum(ids, 0), rows) * ~exact


def matmul_backward_params(dy, c):
    """(dW (K, M), db, S / count (G, capacity, M)) with the forward's assignment.

    S, dW and db are zeroed here (one memset), sized by the forward's capacity: a
    forward that no backward follows (evaluation) zeroes nothing.
    """
    G, L, M = c.Wg.shape
    cap = c.counts.shape[1]
    ws = Arena().add("S", (G, cap, M), np.float32).add("dW", (G * L, M), np.float32)
    if c.has_bias:
        ws.add("db", (M,), np.float32)
    ws = ws.allocate(0)
    launch_cluster_sums_rows(dy, c.ids, c.counts, c.X, ws["S"], None if c.overflow_gemm else ws["dW"],
                             ws.get("db"), c.L)
    batched_gemm(c.sums, ws["S"], out=ws["dW"].reshape(G, L, M), trans_a=True, beta=1.0)  # += sums^T (S / count)
    dW = ws["dW"][:c.W.shape[0]]
    if c.overflow_gemm:
        dW += overflow_rows(c.X, c.ids, c.L).T @ dy
    if c.correction is not None:
        dW += c.correction.dW(dy)
    if c.stats is not None:
        record_gradient(c.stats, "dw", dW, c.X.T @ dy)
    return dW, ws.get("db"), ws["S"]


def overflow_rows(X, ids, L):
    """X (N, K) with every (row, group) slice zeroed except those computed exactly (id -1):
    their exact dW is overflow_rows(X)^T @ dY, one GEMM however many overflow (the kernels'
    per-element atomics cost L per (row, group, output column))."""
    N, K = X.shape
    mask = device().xp.repeat(ids < 0, L, axis=1)[:, :K]
    return X * mask


def cluster_D(S, Wg):
    """D (G, capacity, L) = (S / count) @ W_g^T."""
    return batched_gemm(S, Wg, trans_b=True)


def cuda_reuse_matmul_forward(X, W, b, config, state, train=True):
    """(y (N, M), cache) of the deep-reuse product X (N, K) @ W (K, M) + b on the fast path.

    cache is None when train is False. Records r_c and the distinct codes per
    group in state (device scalars, no synchronisation).
    """
    X, W, b = as_f32("X", X), as_f32("W", W), as_f32("b", b)
    check("X", X, np.float32, (None, None))
    check("W", W, np.float32, (X.shape[1], None))
    if b is not None:
        check("b", b, np.float32, (W.shape[1],))
    y, cache, run = matmul_forward(X, W, b, config, state, train, X, X.shape[0])
    rel_error = None
    if config.measure_error:
        # forward 'exact': y is the exact product, its own reference (rel_error 0)
        exact = y if config.forward == "exact" else (X @ W if b is None else X @ W + b)
        rel_error = relative_error(y, exact)
    entry = record(state, run, {}, rel_error, train)
    if cache is not None and config.measure_error:
        cache.stats = entry
    return y, cache


def cuda_reuse_matmul_backward(dy, cache, input_grad=True):
    """(dX (N, K) or None when not input_grad, dW (K, M), db (M,) or None) with the forward's
    cluster assignment."""
    c = take(cache)
    dy = as_f32("dy", dy)
    check("dy", dy, np.float32, (c.X.shape[0], c.W.shape[1]))
    dW, db, S = matmul_backward_params(dy, c)
    if not input_grad:
        return None, dW, db
    if c.dx_mode == "exact":
        dX = dy @ c.W.T
    else:
        dX = dx_cluster_rows(cluster_D(S, c.Wg), c.ids, dy, c.W, c.L)
        if c.stats is not None:
            record_gradient(c.stats, "dx", dX, dy @ c.W.T)
    return dX, dW, db
