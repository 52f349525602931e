"""The deep-reuse convolution on the fast path; twin: reuse/conv.py.

General path (L does not divide the channels): im2col (one kernel), then the product of
matmul.py on the im2col rows; dX goes back through the one col2im kernel
(step_kernels.col2im), from dY @ W^T ('exact') or from the cluster rows ('cluster').

Pixel-aligned path (L divides the channels), forward:
    input_rms, hash_rows_h*, centroid_sums   clustering.cluster on the padded pixels
    cuBLAS     P_q = sums_q @ W'_q, W'_q[l, (t, m)] = W[t, q*L + l, m]: every offset at once
    reconstruct_pixels   y[n] = sum_{t, q} P[q, id(pixel(n, t)), t] / count (+ b)
backward:
    cluster_sums_pixels  S = per-cluster sums of dY / count per offset, db, overflow dW
    cuBLAS     dW'_q += sums_q^T @ S_q
    dX 'exact'   cuBLAS dY @ W^T, step_kernels.col2im;  'cluster'  cuBLAS D = S @ W'_q^T, dx_cluster_pixels

Options as in matmul.py: 'centred' thresholds and 'pca' planes from the real (unpadded) pixels; forward
'exact' is im2col + one GEMM; dw_sample's residuals are gathered for the sampled
output pixels (as common.pixel_residuals, with exactly computed pixels standing for
themselves).
"""
import dataclasses

import numpy as np

from ...kernels import step_kernels
from ...conv_geometry import pad_nhwc
from ...geometry import ConvGeometry
from .. import conv as reference
from ..common import DwCorrection, dw_sample_draw, pixel_index, pixel_residuals, record_gradient, \
    relative_error, use_pixel_aligned
from .clustering import cluster, cluster_means, dx_cluster_rows
from .lsh import Rows, family_hash_params
from .matmul import batched_gemm, cluster_D, matmul_backward_params, matmul_forward, record, take
from .capacity import Arena, cuda_state
from .runtime import ROW_BLOCK, as_f32, check, check_index_range, device, grid_1d, i32, launch, row_grid


def pixel_args(geo, L, Q):
    """The sizes the pixel kernels take, from a geometry.ConvGeometry, as int32."""
    return tuple(i32(v) for v in (geo.B, geo.h, geo.w, geo.C, L, Q, geo.kh, geo.kw, geo.stride,
                                  geo.top, geo.left, geo.hp, geo.wp, geo.oh, geo.ow, geo.M))


def im2col(x, geo):
    """cols (outputs, kh*kw*C) of x (B, H, W, C): the one im2col kernel (step_kernels.im2col)."""
    check_index_range("im2col columns", geo.outputs * geo.kh * geo.kw * geo.C)
    return step_kernels.im2col(x, geo.kh, geo.kw, geo.stride, geo.pads)[0]


def col2im(dcols, geo):
    """dx (B, H, W, C) from im2col-shaped columns (N, kh*kw*C): the one col2im kernel (step_kernels.col2im)."""
    check_index_range("input", geo.B * geo.h * geo.w * geo.C)
    return step_kernels.col2im(dcols, (geo.B, geo.h, geo.w, geo.C), geo.kh, geo.kw, geo.stride, geo.pads)


def dx_cluster_pixels(D, ids, dY, W, geo, L):
    """dx (B, H, W, C) of the pixel path's 'cluster' mode (kernel dx_cluster_pixels).

    D (Q, capacity, L) = (S_q / count) @ W'_q^T; ids (B*Hp*Wp, Q).
    """
    Q = D.shape[0]
    check("D", D, np.float32, (Q, None, L))
    check("ids", ids, np.int32, (geo.B * geo.hp * geo.wp, Q))
    check("dY", dY, np.float32, (geo.outputs, geo.M))
    check("W", W, np.float32, (geo.kh, geo.kw, geo.C, geo.M))
    check_index_range("x", geo.B * geo.h * geo.w * geo.C)
    dx = device().xp.empty((geo.B, geo.h, geo.w, geo.C), dtype=np.float32)
    launch("dx_cluster_pixels", grid_1d(dx.size), (256,), (
        D, ids, i32(D.shape[1]), dY, W, dx, *pixel_args(geo, L, Q)))
    return dx


def overflow_pixels(x, ids, geo, L):
    """x with every pixel's channel slice zeroed except those computed exactly (id -1): the
    exact dW of the overflow members is the exact conv dW of this input (one GEMM)."""
    Q = geo.C // L
    grid = ids.reshape(geo.B, geo.hp, geo.wp, Q)[:, geo.top:geo.top + geo.h, geo.left:geo.left + geo.w]
    mask = (grid < 0).astype(np.float32)[..., None]
    return device().xp.ascontiguousarray((x.reshape(geo.B, geo.h, geo.w, Q, L) * mask).reshape(x.shape))


@dataclasses.dataclass
class CudaConvCache:
    """What the backward of a CUDA reuse conv needs."""

    kind: str            # 'general' (im2col rows) or 'pixel'
    x: object            # the input (B, H, W, C)
    W: object            # (kh, kw, C, M)
    geo: ConvGeometry
    matmul: object = None    # general: CudaMatmulCache of the im2col product
    Wq: object = None        # pixel: (Q, L, kh*kw*M)
    ids: object = None       # pixel: (B*Hp*Wp, Q)
    counts: object = None    # pixel: (Q, capacity)
    sums: object = None      # pixel: (Q, capacity, L)
    has_bias: bool = False
    L: int = 0
    dx_mode: str = "exact"
    overflow_gemm: bool = False  # pixel: overflow members' dW by one GEMM
    correction: object = None    # pixel, dw_sample: DwCorrection of the sampled output pixels
    stats: dict = None           # pixel, measure_error: the stats entry that receives dw_cos, dx_cos, ...
    used: bool = False


def cuda_reuse_conv_forward(x, W, b, stride, pads, config, state, train=True):
    """(y (B, OH, OW, M), cache) of the deep-reuse conv on the fast path: pixel-aligned or general path."""
    x, W, b = as_f32("x", x), as_f32("W", W), as_f32("b", b)
    check("x", x, np.float32, (None, None, None, None))
    check("W", W, np.float32, (None, None, x.shape[3], None))
    if b is not None:
        check("b", b, np.float32, (W.shape[3],))
    pixel = use_pixel_aligned(config, x.shape[3])
    geo = ConvGeometry.of(x.shape, W.shape[0], W.shape[1], stride, pads, M=W.shape[3])
    if pixel:
        y, cache, run = _pixel_forward(x, W, b, geo, config, state, train)
    else:
        cols = im2col(x, geo)
        y, mcache, run = matmul_forward(cols, W.reshape(-1, geo.M), b, config, state, train, x, geo.B)
        cache = CudaConvCache("general", x, W, geo, matmul=mcache) if train else None
    y = y.reshape(geo.B, geo.oh, geo.ow, geo.M)
    rel_error = None
    if config.measure_error:
        # forward 'exact': y is the exact conv, its own reference (rel_error 0)
        exact = y if config.forward == "exact" else reference.exact_conv(x, W, b, stride, pads)
        rel_error = relative_error(y, exact)
    entry = record(state, run, {"pixel_aligned": pixel}, rel_error, train)
    if cache is not None and config.measure_error:
        if pixel:
            cache.stats = entry
        else:
            cache.matmul.stats = entry
    return y, cache


def exact_conv_rows(x, W, b, geo):
    """(outputs, M): the exact convolution as im2col + one GEMM (+ b)."""
    y = im2col(x, geo) @ W.reshape(-1, geo.M)
    if b is not None:
        y += b
    return y


def residual_pixels(x, sums, counts, ids, rows, geo, L):
    """(m, kh*kw*C): common.pixel_residuals of the outputs ``rows`` (sums (Q, cap, L)
    unnormalised); a pixel slice computed exactly (id -1) stands for itself (residual 0)."""
    xp = device().xp
    means = cluster_means(sums, counts)
    where = pixel_index(geo.B, geo.hp, geo.wp, geo.kh, geo.kw, geo.stride, xp)[rows]   # (m, T)
    exact = xp.repeat(xp.take(ids, where, axis=0) < 0, L, axis=2).reshape(len(rows), -1)     # (m, T*Q*L)
    pixels = pad_nhwc(x, geo.pads).reshape(-1, geo.C // L, L)
    return pixel_residuals(pixels, means, xp.maximum(ids, 0), where) * ~exact


def _pixel_forward(x, W, b, geo, config, state, train):
    L, H = config.L, config.H
    Q = geo.C // L
    T = geo.kh * geo.kw
    rows = Rows.pixels(x, geo.pads)
    # 'centred' statistics and the 'pca' fit over the real pixels (the padding would pull them to 0)
    planes, offsets = family_hash_params(state, config, Q, lambda: x.reshape(-1, Q, L))
    tracker = cuda_state(state).tracker(("pixels", rows.rows, Q, L, H), rows.rows, H, batch=geo.B, train=train)

    def extra(cap):
        check_index_range("Q x capacity x kh*kw x M", Q * cap * T * geo.M)
        return ()

    run = cluster(rows, L, Q, planes, offsets, H, config.family, tracker, x, extra)
    cap = run["capacity"]
    # W'_q[l, (t, m)] = W[t, q*L + l, m]: one small transpose so one GEMM serves every offset
    Wq = device().xp.ascontiguousarray(W.reshape(T, Q, L, geo.M).transpose(1, 2, 0, 3)).reshape(Q, L, T * geo.M)
    if config.forward == "exact":
        y = exact_conv_rows(x, W, b, geo)                               # no centroid GEMM, no reconstruct
    else:
        P = batched_gemm(run["sums"], Wq)                               # (Q, cap, T*M)
        y = device().xp.empty((geo.outputs, geo.M), dtype=np.float32)
        check_index_range("outputs x M", geo.outputs * geo.M)
        launch("reconstruct_pixels", row_grid(geo.outputs, geo.M), ROW_BLOCK, (
            P, run["ids"], run["counts"], i32(cap), x, W, b, y, *pixel_args(geo, L, Q)))
    cache = None
    if train:
        cache = CudaConvCache("pixel", x, W, geo, Wq=Wq, ids=run["ids"], counts=run["counts"], sums=run["sums"],
                              has_bias=b is not None, L=L, dx_mode=config.dx_mode,
                              overflow_gemm=run["overflow_gemm"])
        draw = dw_sample_draw(config, state, train)
        if draw is not None:
            cache.correction = DwCorrection.drawn(draw, geo.outputs, device().xp, lambda rows: residual_pixels(
                x, run["sums"], run["counts"], run["ids"], rows, geo, L))
    return y, cache, run


def cuda_reuse_conv_backward(dy, cache, input_grad=True):
    """(dx (B, H, W, C) or None when not input_grad, dW (kh, kw, C, M), db (M,) or None) with the
    forward's cluster assignment; a first layer (input_grad False) skips dx like the exact layer."""
    c = take(cache)
    geo = c.geo
    dy = as_f32("dy", dy)
    check("dy", dy, np.float32, (geo.B, geo.oh, geo.ow, geo.M))
    dy2 = dy.reshape(geo.outputs, geo.M)
    if c.kind == "general":
        mc = take(c.matmul)
        dW, db, S = matmul_backward_params(dy2, mc)
        if not input_grad:
            return None, dW.reshape(c.W.shape), db
        if mc.dx_mode == "exact":
            return col2im(dy2 @ mc.W.T, geo), dW.reshape(c.W.shape), db
        dx = col2im(dx_cluster_rows(cluster_D(S, mc.Wg), mc.ids, dy2, mc.W, mc.L), geo)
        if mc.stats is not None:
            record_gradient(mc.stats, "dx", dx, col2im(dy2 @ mc.W.T, geo))
        return dx, dW.reshape(c.W.shape), db
    Q, cap = c.counts.shape
    T = geo.kh * geo.kw
    ws = Arena().add("S", (Q, cap, T, geo.M), np.float32).add("dWq", (Q, c.L, T * geo.M), np.float32)
    if c.has_bias:
        ws.add("db", (geo.M,), np.float32)
    ws = ws.allocate(0)
    check_index_range("S", Q * cap * T * geo.M)
    launch("cluster_sums_pixels", row_grid(geo.outputs, geo.M), ROW_BLOCK, (
        dy2, c.ids, c.counts, i32(cap), c.x, ws["S"], None if c.overflow_gemm else ws["dWq"], ws.get("db"),
        *pixel_args(geo, c.L, Q)))
    S = ws["S"].reshape(Q, cap, T * geo.M)
    batched_gemm(c.sums, S, out=ws["dWq"], trans_a=True, beta=1.0)       # += sums_q^T (S_q / count)
    dW = device().xp.ascontiguousarray(ws["dWq"].reshape(Q, c.L, T, geo.M).transpose(2, 0, 1, 3))
    dW = dW.reshape(c.W.shape)
    if c.overflow_gemm:
        dW += (im2col(overflow_pixels(c.x, c.ids, geo, c.L), geo).T @ dy2).reshape(c.W.shape)
    if c.correction is not None:
        dW += c.correction.dW(dy2).reshape(c.W.shape)
    if c.stats is not None:
        record_gradient(c.stats, "dw", dW.reshape(-1, geo.M), im2col(c.x, geo).T @ dy2)
    if not input_grad:
        return None, dW, ws.get("db")
    if c.dx_mode == "exact":
        dx = col2im(dy2 @ c.W.reshape(-1, geo.M).T, geo)
    else:
        D = batched_gemm(S, c.Wq, trans_b=True)                            # (Q, cap, L)
        dx = dx_cluster_pixels(D, c.ids, dy2, c.W, geo, c.L)
        if c.stats is not None:
            record_gradient(c.stats, "dx", dx, col2im(dy2 @ c.W.reshape(-1, geo.M).T, geo))
    return dx, dW, ws.get("db")
