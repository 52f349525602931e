"""Deep-reuse convolution: the general (im2col) path and the pixel-aligned path.

General path: im2col turns the conv into X (N, K) @ W (K, M) with rows
n = (image, out_y, out_x) and columns k = (dy, dx, c); matmul.py does the rest,
and col2im carries dX back to the input.

Pixel-aligned path (L divides c_in): with that column order, column group
g = (offset t = (dy, dx), channel group q) of im2col row n is exactly channel
slice q of ONE input pixel, the one under offset t. So instead of hashing the
B*OH*OW*kh*kw*c_in/L im2col sub-vectors, hash every pixel of the padded input
once per channel group, cluster pixels per channel group, and let every kernel
offset read its cluster from the pixel:

    pixel_ids[p, q]  cluster of channel slice q of padded pixel p
    C_q              centroids of channel group q, shared by all kh*kw offsets
    P_q = C_q @ W_q  with W_q (L, T*M) = the weights of slice q for all T offsets
                     side by side: one batched GEMM gives every offset at once
    y[n] = sum over offsets t and groups q of P_q[pixel_ids[pixel(n, t), q], t-th M-block]

The last line is the reconstruct of matmul.py (y = R @ P) with the rows of P
read as (q, cluster, t): the only im2col left is of the ids (Q ints per pixel).

This is the general method with shared planes and clusters formed across the
kernel offsets, except at one point: in im2col a pixel occurs once per row that
reads it (kh*kw times inside the image, fewer near the border, and the zero
padding occurs too), so its weight in a centroid is its number of occurrences;
here every pixel (padding pixels included) counts once. docs/reuse.md shows it.

Backward (assignment fixed): S = R^T dY as in matmul.py, per (t, q); dW[t, q] =
C_q^T S[t, q]; dX 'cluster' goes straight to pixels without col2im:
dL/dC_q[c] = sum_t S[t, q, c] @ W[t, q]^T and each member pixel gets 1/|c| of it
(gradients of padding pixels are dropped). dX 'exact' is dY @ W^T then col2im.
dw_sample corrects dW as in matmul.py, with the sampled output pixels' im2col rows
gathered from the padded pixels and their centroids from the pixels' clusters.

forward 'exact' (both paths): y is the exact convolution (im2col + GEMM) while
the pixels or rows are still hashed and clustered for the backward above; the
'centred' family takes its projection statistics, and 'pca' fits its axes, over
the real input pixels on the pixel-aligned path (the zero padding would pull the
mean towards zero).
"""
import dataclasses

from .. import backend, cpu
from ..conv_geometry import col2im, im2col, pad_nhwc
from ..cpu import conv as cpu_conv
from ..geometry import ConvGeometry
from .clustering import assign_clusters, assignment_matrix, centroids, group_keys, product, transposed_product
from .common import DwCorrection, dw_sample_draw, pixel_index, pixel_residuals, record_gradient, relative_error
from .matmul import (hash_groups, impl_label, reuse_matmul_backward, reuse_matmul_forward,
                     reuse_matmul_forward_assigned)


def exact_conv(x, W, b, stride, pads):
    """The exact convolution (im2col + GEMM): forward 'exact', and the reference of the reuse error."""
    if cpu.supports(x, W):
        y, cols = cpu_conv.forward(x, W, b, stride, pads)
        cpu_conv.release(cols)     # the CPU fast path keeps the columns' memory for the next im2col
        return y
    kh, kw, _, m = W.shape
    cols, (oh, ow) = im2col(x, kh, kw, stride, pads)
    y = cols @ W.reshape(-1, m)
    if b is not None:
        y += b
    return y.reshape(x.shape[0], oh, ow, m)


# ---------------------------------------------------------------- general path

def general_conv_forward(x, W, b, stride, pads, config, state, train=True):
    """(y, cache): im2col, then the reuse product of matmul.py (hashing, clustering, stats)."""
    kh, kw, _, m = W.shape
    cols, (oh, ow) = im2col(x, kh, kw, stride, pads)
    y, mcache = reuse_matmul_forward(cols, W.reshape(-1, m), b, config, state, train, scale_source=x)
    cache = (x.shape, W.shape, stride, pads, mcache) if train else None
    return y.reshape(x.shape[0], oh, ow, m), cache


def general_conv_forward_assigned(x, W, b, stride, pads, ids, n_clusters, L, dx_mode="exact",
                                  forward="reuse"):
    """(y, cache) of the general path under a given assignment of the im2col rows' groups."""
    kh, kw, _, m = W.shape
    cols, (oh, ow) = im2col(x, kh, kw, stride, pads)
    y, mcache = reuse_matmul_forward_assigned(cols, W.reshape(-1, m), b, ids, n_clusters, L, dx_mode,
                                              forward)
    return y.reshape(x.shape[0], oh, ow, m), (x.shape, W.shape, stride, pads, mcache)


def exact_conv_dx(dy2, W2, x_shape, kh, kw, stride, pads):
    """The exact conv's dx, col2im(dY @ W^T), from dY (N, M) and W as (K, M)."""
    return col2im(dy2 @ W2.T, x_shape, kh, kw, stride, pads)


def general_conv_backward(dy, cache, input_grad=True):
    """(dx, dW, db) of the general path: the reuse product's backward, then col2im (dx None
    when not input_grad).

    dw_cos (measure_error) is the reuse product's: the exact conv dW is cols^T @ dY.
    """
    x_shape, w_shape, stride, pads, mcache = cache
    kh, kw, _, m = w_shape
    dX, dW, db = reuse_matmul_backward(dy.reshape(-1, m), mcache, input_grad)
    dx = col2im(dX, x_shape, kh, kw, stride, pads) if input_grad else None
    if dx is not None and mcache.X is not None and mcache.dx_mode != "exact":
        # the product's dx_cos compares columns; the layer's dx is what the layer below receives
        record_gradient(mcache.stats, "dx", dx, exact_conv_dx(dy.reshape(-1, m), mcache.W, x_shape, kh, kw, stride, pads))
    return dx, dW.reshape(w_shape), db


# ---------------------------------------------------------------- pixel-aligned path

@dataclasses.dataclass
class PixelCache:
    """What the pixel-aligned backward needs (the assignment is held fixed)."""

    x_shape: tuple
    W: object            # (kh, kw, c_in, c_out)
    stride: int
    pads: tuple
    pixel_ids: object    # (B*Hp*Wp, Q) cluster of every padded pixel, per channel group
    R: object            # sparse assignment matrix (N, Q*Cmax*kh*kw)
    centroids: object    # (Q, Cmax, L)
    counts: object       # (Q, Cmax)
    has_bias: bool
    dx_mode: str
    x: object = None     # measure_error only: the input, for the exact dW of dw_cos
    stats: dict = None   # measure_error only: the stats entry that receives dw_cos
    correction: object = None   # dw_sample: DwCorrection of the sampled output pixels


def pixel_vectors(x, pads, L):
    """(B*Hp*Wp, Q, L): every padded input pixel split into Q = c_in / L channel groups."""
    xpad = pad_nhwc(x, pads)
    return xpad.reshape(-1, x.shape[3] // L, L)


def offset_weights(W, L):
    """(kh, kw, c_in, M) -> W_q (Q, L, kh*kw*M): slice q's weights for every offset, side by side."""
    kh, kw, c_in, m = W.shape
    q = c_in // L
    return W.reshape(kh * kw, q, L, m).transpose(1, 2, 0, 3).reshape(q, L, kh * kw * m)


def pixel_keys(pixel_ids, cmax, padded_shape, kh, kw, stride):
    """(N, T*Q): the row of P, read as (q, cluster, t), that group (t, q) of output n uses.

    Computed per pixel first (Q ints), gathered for every (output, offset) from
    the pixel it reads, and the offset t added last.
    """
    xp = backend.get_array_module(pixel_ids)
    b_, hp, wp, q = padded_shape
    t = kh * kw
    first_row = (pixel_ids + xp.arange(q, dtype=xp.int32) * xp.int32(cmax)) * xp.int32(t)
    keys = xp.take(first_row, pixel_index(b_, hp, wp, kh, kw, stride, xp), axis=0)     # (N, T, Q)
    keys += xp.arange(t, dtype=xp.int32)[:, None]
    return keys.reshape(-1, t * q)


def pixel_conv_forward_assigned(x, W, b, stride, pads, pixel_ids, n_clusters, L, dx_mode="exact",
                                pixels=None, forward="reuse", sample=None):
    """(y, cache) of the pixel-aligned reuse conv under a given pixel assignment.

    pixel_ids (B*Hp*Wp, Q) and n_clusters (Q,) cluster the padded pixels per
    channel group of L channels; pixels = pixel_vectors(x, pads, L) if the caller has it.
    forward 'exact': y is the exact conv, the cache the same as with 'reuse'.
    sample: draw(n) -> (start, step) of the outputs whose residuals correct dW (dw_sample).
    """
    xp = backend.get_array_module(x, W, b)
    b_, h, w, c_in = x.shape
    kh, kw, _, m = W.shape
    t, q = kh * kw, c_in // L
    geo = ConvGeometry.of(x.shape, kh, kw, stride, pads, M=m)
    hp, wp = geo.hp, geo.wp
    if pixels is None:
        pixels = pixel_vectors(x, pads, L)
    C, counts = centroids(pixels, pixel_ids, n_clusters)                         # (Q, Cmax, L)
    cmax = C.shape[1]
    keys = pixel_keys(pixel_ids, cmax, (b_, hp, wp, q), kh, kw, stride)
    R = assignment_matrix(keys, q * cmax * t, x.dtype)
    cache = PixelCache(x.shape, W, stride, pads, pixel_ids, R, C, counts, b is not None, dx_mode)
    if sample is not None:
        where = pixel_index(b_, hp, wp, kh, kw, stride, xp)
        cache.correction = DwCorrection.drawn(sample, keys.shape[0], xp,
                                              lambda rows: pixel_residuals(pixels, C, pixel_ids, where[rows]))
    if forward == "exact":
        return exact_conv(x, W, b, stride, pads), cache   # no centroid GEMM, no reconstruct
    P = C @ offset_weights(W, L)                       # (Q, Cmax, T*M): every offset at once
    y = product(R, P.reshape(q * cmax * t, m))         # rows of P read as (q, cluster, t)
    if b is not None:
        y += b
    return y.reshape(b_, geo.oh, geo.ow, m), cache


def pixel_conv_forward(x, W, b, stride, pads, config, state, train=True):
    """(y, cache): hash and cluster the padded pixels, then the pixel-aligned product."""
    xp = backend.get_array_module(x, W, b)
    L = config.L
    pixels = pixel_vectors(x, pads, L)
    real_pixels = x.reshape(-1, pixels.shape[1], L)    # 'centred' statistics and the 'pca' fit skip the padding
    codes = hash_groups(pixels, config, state, x, stats_source=real_pixels)
    pixel_ids, n_clusters = assign_clusters(codes, config.H)
    y, cache = pixel_conv_forward_assigned(x, W, b, stride, pads, pixel_ids, n_clusters, L, config.dx_mode,
                                           pixels=pixels, forward=config.forward,
                                           sample=dw_sample_draw(config, state, train))
    rel_error = None
    if config.measure_error:
        # forward 'exact': y is the exact conv, its own reference (rel_error 0)
        rel_error = relative_error(y, y if config.forward == "exact" else exact_conv(x, W, b, stride, pads))
    entry = state.record(r_c=n_clusters.sum() / pixel_ids.size, n_clusters=n_clusters, impl=impl_label(xp),
                         pixel_aligned=True, rel_error=rel_error, train=train)
    if not train:
        return y, None
    if config.measure_error:
        cache.x, cache.stats = x, entry
    return y, cache


def pixel_conv_backward(dy, cache, input_grad=True):
    """(dx, dW, db) of the pixel-aligned reuse conv with the forward's assignment (dx None
    when not input_grad).

    When the forward measured the error (cache.x kept), also stores dw_cos and dw_gain
    against the exact conv dW = im2col(x)^T @ dY (and dx_cos, dx_gain against the exact
    dx when dx is clustered) in the forward's stats entry (common.record_gradient).
    """
    xp = backend.get_array_module(dy)
    b_, h, w, c_in = cache.x_shape
    kh, kw, _, m = cache.W.shape
    q, cmax, L = cache.centroids.shape
    t = kh * kw
    top, _, left, _ = cache.pads
    dy2 = dy.reshape(-1, m)
    S = transposed_product(cache.R, dy2).reshape(q, cmax, t * m)      # cluster sums R^T dY, laid out like P
    dW_q = cache.centroids.transpose(0, 2, 1) @ S      # (Q, L, T*M): C_q^T S_q
    dW = dW_q.reshape(q, L, t, m).transpose(2, 0, 1, 3).reshape(cache.W.shape)
    if cache.correction is not None:
        dW += cache.correction.dW(dy2).reshape(cache.W.shape)
    if cache.x is not None:
        cols, _ = im2col(cache.x, kh, kw, cache.stride, cache.pads)
        record_gradient(cache.stats, "dw", dW.reshape(-1, m), cols.T @ dy2)
    db = dy2.sum(axis=0) if cache.has_bias else None
    if not input_grad:
        return None, dW, db
    if cache.dx_mode == "exact":
        dx = exact_conv_dx(dy2, cache.W.reshape(-1, m), cache.x_shape, kh, kw, cache.stride, cache.pads)
        return dx, dW, db
    # dL/dC_q = S_q @ W_q^T sums over every offset; each member pixel gets 1/|c| of it
    per_member = (S @ offset_weights(cache.W, L).transpose(0, 2, 1)) \
        / xp.maximum(cache.counts, 1)[:, :, None].astype(dy.dtype)
    dpix = xp.take(per_member.reshape(q * cmax, L), group_keys(cache.pixel_ids, cmax), axis=0)
    hp, wp = h + sum(cache.pads[:2]), w + sum(cache.pads[2:])
    dx = dpix.reshape(b_, hp, wp, c_in)[:, top:top + h, left:left + w, :]
    if cache.x is not None:
        record_gradient(cache.stats, "dx", dx,
                        exact_conv_dx(dy2, cache.W.reshape(-1, m), cache.x_shape, kh, kw, cache.stride, cache.pads))
    return dx, dW, db
