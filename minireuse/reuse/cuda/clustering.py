"""Cluster assignment, centroids, reconstruction and the backward's cluster sums on the fast path.

Twin: reuse/clustering.py. ``cluster`` is the forward's clustering stage in three
launches (input_rms, hash_rows_h*, centroid_sums); the other functions wrap one
kernel each, are named after it, and exist for the products (matmul.py) and the
tests that check every kernel against the reference.
"""
import numpy as np

from .lsh import Rows, launch_hash, launch_input_rms, small_arena
from .capacity import Arena
from .runtime import (PROBE_LIMIT, ROW_BLOCK, RUN, check, check_index_range, device, grid_1d, i32, launch, row_grid,
                      table_size)


def _table(G, T, capacity, rows, small):
    xp = device().xp
    keys = xp.empty((G, T), dtype=np.uint64)
    device().memset(keys, 0xFF)
    return dict(keys=keys, vals=xp.empty((G, T), dtype=np.int32), T=T, distinct=small["distinct"],
                capacity=capacity, slots=xp.empty((rows, G), dtype=np.int32), stats=small["stats"])


def launch_centroid_sums(rows, L, G, table, ids, counts, sums, small):
    launch("centroid_sums", grid_1d(-(-rows.rows // RUN) * rows.K), (256,), (
        rows.x, i32(rows.rows), i32(rows.K), i32(L), i32(G), *rows.geometry(),
        table["slots"], table["vals"], i32(table["T"]), i32(table["capacity"]),
        ids, counts, sums, small["distinct"], small["stats"], small["r_c"]))


def _calibrate(tracker, rows, L, G, planes, offsets, H, scale):
    """The call site's first capacity: hash into a table that holds every code, read the
    largest group's distinct count (one host wait per call site), or a fixed guess while
    a graph is being captured."""
    if device().capturing():
        tracker.capacity = tracker.fallback_capacity()
        return tracker.capacity
    small = small_arena(G).allocate(0)
    table = _table(G, table_size(tracker.limit), tracker.limit, rows.rows, small)
    launch_hash(rows, L, G, planes, offsets, H, scale, table=table)
    return tracker.calibrate(int(device().xp.max(small["distinct"])))


def cluster(rows, L, G, planes, offsets, H, family, tracker, scale_source, extra=lambda cap: ()):
    """Hash, assign and accumulate centroids of ``rows`` in 3 launches (+ 3 memsets).

    offsets: the unit offsets ('offset': scaled by the RMS of scale_source in the
    kernels; 'origin': unused) or, for 'centred' and 'pca', the thresholds themselves.
    tracker: the call site's CapacityTracker (calibrated on its first call).
    extra(capacity): (name, shape, dtype) zeroed buffers the caller needs (same memset).
    Returns a dict: capacity, ids, counts, sums (unnormalised), the extra buffers, and
    the small statistics (distinct, stats, r_c, scale).
    """
    check_index_range("rows x K", rows.rows * rows.K)
    check_index_range("rows x G", rows.rows * G)
    small = small_arena(G).allocate(0)
    scale = None
    if family == "offset":
        launch_input_rms(scale_source, small)
        scale = small["scale"]
    elif family in ("centred", "pca"):   # offsets are the thresholds themselves (lsh.centred_thresholds,
                                         # lsh.pca_hash_params)
        small["scale"].fill(1.0)
        scale = small["scale"]
    capacity = tracker.begin_call()
    if capacity is None:
        capacity = _calibrate(tracker, rows, L, G, planes, offsets, H, scale)
    ws = Arena().add("counts", (G, capacity), np.int32).add("sums", (G, capacity, L), np.float32)
    for name, shape, dtype in extra(capacity):
        ws.add(name, shape, dtype)
    ws = ws.allocate(0)
    table = _table(G, table_size(capacity), capacity, rows.rows, small)
    launch_hash(rows, L, G, planes, offsets, H, scale, table=table)
    ids = device().xp.empty((rows.rows, G), dtype=np.int32)
    launch_centroid_sums(rows, L, G, table, ids, ws["counts"], ws["sums"], small)
    tracker.end_call(small["stats"])
    out = dict(ws)
    out.update(capacity=capacity, overflow_gemm=tracker.overflowed(), ids=ids, distinct=small["distinct"], stats=small["stats"], r_c=small["r_c"],
               scale=small["scale"])
    return out


def assign_codes(codes, capacity):
    """(ids (N, G) int32, n_clusters (G,) int32) of codes (N, G) uint32 or uint64 (kernels
    assign_codes, centroid_sums).

    ids are compact per group in first-come order (not the reference's code
    order); a code beyond ``capacity`` clusters in its group gets id -1 for all
    its rows, and so does the one code that equals the tables' empty key (all 64
    bits set), which is not counted. n_clusters counts the distinct codes,
    overflowed ones included.
    """
    xp = device().xp
    if getattr(codes, "dtype", None) == np.uint32:
        codes = codes.astype(np.uint64)
    check("codes", codes, np.uint64, (None, None))
    n, G = codes.shape
    check_index_range("codes", n * G)
    small = small_arena(G).allocate(0)
    table = _table(G, table_size(capacity), capacity, n, small)
    launch("assign_codes", grid_1d(n * G), (256,), (
        codes, i32(n), i32(G), table["keys"], table["vals"], i32(table["T"]), table["distinct"], i32(capacity),
        i32(PROBE_LIMIT), table["slots"], table["stats"]))
    ids = xp.empty((n, G), dtype=np.int32)
    counts = xp.zeros((G, capacity), dtype=np.int32)
    # rows of G "columns" of length 1: one thread per (row, group), no sums
    launch_centroid_sums(Rows(None, n, G), 1, G, table, ids, counts, None, small)
    return ids, small["distinct"]


def _centroid_sums_of_ids(rows, ids, L, G, capacity):
    """Run centroid_sums on given ids: slots = ids and vals = the identity table."""
    xp = device().xp
    check_index_range("rows x K", rows.rows * rows.K)
    small = small_arena(G).allocate(0)
    vals = xp.tile(xp.arange(capacity, dtype=np.int32), G)
    table = dict(slots=ids, vals=vals, T=capacity, capacity=capacity)
    out_ids = xp.empty_like(ids)
    counts = xp.zeros((G, capacity), dtype=np.int32)
    sums = xp.zeros((G, capacity, L), dtype=np.float32)
    launch_centroid_sums(rows, L, G, table, out_ids, counts, sums, small)
    return sums, counts


def cluster_means(sums, counts):
    """Centroids (G, capacity, L) float32 from sums (G, capacity, L) and counts (G, capacity).

    The counts are cast as the reference does: float32 / int32 would promote to float64."""
    return sums / device().xp.maximum(counts, 1)[:, :, None].astype(sums.dtype)


def centroid_rows(X, ids, L, capacity):
    """(centroids (G, capacity, L), counts (G, capacity)) of rows X (N, K) under ids (N, G)
    (kernel centroid_sums; the means are taken here). ids -1 (overflow) belong to no cluster."""
    check("X", X, np.float32, (None, None))
    G = -(-X.shape[1] // L)
    check("ids", ids, np.int32, (X.shape[0], G))
    sums, counts = _centroid_sums_of_ids(Rows.matrix(X), ids, L, G, capacity)
    return cluster_means(sums, counts), counts


def centroid_pixels(x, pads, ids, L, capacity):
    """(centroids (Q, capacity, L), counts (Q, capacity)) of the padded pixels of x under ids (B*Hp*Wp, Q)."""
    check("x", x, np.float32, (None, None, None, None))
    rows = Rows.pixels(x, pads)
    Q = x.shape[3] // L
    check("ids", ids, np.int32, (rows.rows, Q))
    sums, counts = _centroid_sums_of_ids(rows, ids, L, Q, capacity)
    return cluster_means(sums, counts), counts


def reconstruct_rows(P, ids, counts, X, W, b, L):
    """y (N, M) = sum_g P[g, ids[n, g]] / counts[g, id] (+ b) (kernel reconstruct_rows).

    P (G, capacity, M) holds (cluster sum) @ W_g; rows with id -1 use the exact x[n, g] @ W_g.
    """
    N, K = X.shape
    G, cap, M = P.shape
    check("P", P, np.float32, (G, None, None))
    check("ids", ids, np.int32, (N, G))
    check("counts", counts, np.int32, (G, cap))
    check("X", X, np.float32, (N, None))
    check("W", W, np.float32, (K, M))
    if b is not None:
        check("b", b, np.float32, (M,))
    check_index_range("N x max(M, G)", N * max(M, G))
    y = device().xp.empty((N, M), dtype=np.float32)
    launch("reconstruct_rows", row_grid(N, M), ROW_BLOCK, (
        P, ids, counts, i32(cap), X, W, b, y, i32(N), i32(K), i32(L), i32(G), i32(M)))
    return y


def cluster_sums_rows(dY, ids, counts, X, L, with_bias=True):
    """(S (G, capacity, M), dW_over (G*L, M), db (M,) or None) (kernel cluster_sums_rows).

    S[g, c] = sum of dY rows of cluster c / |c|; dW_over = the exact x^T dY of the
    overflow members (id -1); db = dY.sum(0).
    """
    N, M = dY.shape
    G, cap = counts.shape
    check("dY", dY, np.float32, (None, None))
    check("ids", ids, np.int32, (N, G))
    check("counts", counts, np.int32, (G, None))
    check("X", X, np.float32, (N, None))
    xp = device().xp
    S = xp.zeros((G, cap, M), dtype=np.float32)
    dW = xp.zeros((G * L, M), dtype=np.float32)
    db = xp.zeros((M,), dtype=np.float32) if with_bias else None
    launch_cluster_sums_rows(dY, ids, counts, X, S, dW, db, L)
    return S, dW, db


def launch_cluster_sums_rows(dY, ids, counts, X, S, dW, db, L):
    N, M = dY.shape
    G, cap = counts.shape
    check_index_range("G x capacity x M", S.size)
    launch("cluster_sums_rows", row_grid(N, M), ROW_BLOCK, (
        dY, ids, counts, i32(cap), X, S, dW, db, i32(N), i32(X.shape[1]), i32(L), i32(G), i32(M)))


def dx_cluster_rows(D, ids, dY, W, L):
    """dX (N, K) of the 'cluster' mode: row n, group g gets D[g, ids[n, g]] (kernel dx_cluster_rows).

    D (G, capacity, L) = (S / count) @ W_g^T; overflow rows get the exact dY[n] @ W^T slice.
    """
    N, M = dY.shape
    K = W.shape[0]
    G, cap, _ = D.shape
    check("D", D, np.float32, (G, None, L))
    check("ids", ids, np.int32, (N, G))
    check("dY", dY, np.float32, (N, M))
    check("W", W, np.float32, (K, M))
    check_index_range("N x K", N * K)
    dX = device().xp.empty((N, K), dtype=np.float32)
    launch("dx_cluster_rows", grid_1d(N * K), (256,), (
        D, ids, i32(cap), dY, W, dX, i32(N), i32(K), i32(L), i32(G), i32(M)))
    return dX
