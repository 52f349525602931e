"""Fast CPU twins of conv_geometry's padding, im2col and col2im, and a conv's input gradient.

Same results as the array code (im2col and padding bit for bit: they are copies),
with the work split over shards of images on every core:

- im2col pads a few images at a time into a small buffer of the shard (cache
  sized) and copies their windows straight into the columns: no padded copy of
  the whole batch;
- col2im adds the kh*kw window offsets into a few padded images at a time, which
  stay in cache over the kh*kw strided adds (the array code makes each add a pass
  over the whole padded batch);
- the input gradient of a stride-1 conv, col2im(dY @ W^T), is the convolution of dY,
  padded by (k - 1 - pad) on each side, with the kernel flipped in both spatial
  axes and its channel axes swapped:

      dx[u, v] = sum over i, j of dYpad[u + i, v + j] @ W[kh-1-i, kw-1-j]^T

  so it is im2col and one GEMM of the forward's shape (K = kh*kw*c_out rows):
  no (N, K) product written out and read back by col2im;
- a dY that is mostly zeros (``sparse_backward``) skips its zeros: dW and dX add
  only what its nonzero entries contribute (kernels.sparse_weight_grads and
  sparse_input_grad), the same sums as the GEMMs' less the zero terms.
"""
import numpy as np

from ..geometry import ConvGeometry
from . import compiled_kernels, parallel, threads

# images padded and copied together inside a shard: a few fit in a core's cache
IMAGES_PER_CHUNK = 4
# OpenBLAS's GEMM runs faster when K is a multiple of this (CifarNet's conv1, K = 75
# widened to 80 with the bias column: forward GEMM 14-18 ms against 17-20 ms plus
# 5-10 ms for the bias add; 2-core AMD EPYC, AVX2)
WIDTH_MULTIPLE = 16


def _geometry(x_shape, kh, kw, stride, pads):
    g = ConvGeometry.of(x_shape, kh, kw, stride, pads)
    return g.B, g.h, g.w, g.C, g.hp, g.wp, g.oh, g.ow


def pad(x, pads):
    """Zero-pad the spatial axes of an NHWC array by (top, bottom, left, right)."""
    if not any(pads):
        return x
    top, bottom, left, right = pads
    b, h, w, c = x.shape
    out = np.empty((b, h + top + bottom, w + left + right, c), dtype=x.dtype)

    def shard(lo, hi):
        o = out[lo:hi]
        o[:, :top] = 0
        o[:, top + h:] = 0
        o[:, top:top + h, :left] = 0
        o[:, top:top + h, left + w:] = 0
        o[:, top:top + h, left:left + w] = x[lo:hi]

    parallel(shard, b, out[0].size)
    return out


# Column memory whose contents are no longer needed, kept for the next im2col: a new
# array of hundreds of MB costs a page fault per page when first written (CifarNet's
# conv2 columns: about 20 ms of a step), memory already written does not. The largest
# IDLE_KEPT are kept, so the pool holds no more than the step's peak needed anyway.
IDLE_KEPT = 2
_idle = []


def _pooled(shape, dtype):
    """An array of this shape in idle memory of the pool (taken out of it) or in new memory."""
    size = int(np.prod(shape))
    for i, memory in enumerate(_idle):          # smallest first
        if memory.dtype == dtype and memory.size >= size:
            return _idle.pop(i)[:size].reshape(shape)
    return np.empty(size, dtype=dtype).reshape(shape)


def release(a):
    """Give the memory under ``a`` (columns from im2col) to the pool: the caller no longer
    needs its contents and reads it no more. Not NumPy memory (CuPy's) is left alone."""
    if type(a) is not np.ndarray:
        return
    while a.base is not None:
        a = a.base
    if not a.flags.c_contiguous:
        return
    _idle.append(a.reshape(-1))
    _idle.sort(key=lambda m: m.size)
    del _idle[:-IDLE_KEPT]


def im2col(x, kh, kw, stride, pads, width=None):
    """(B, H, W, C) -> (B*OH*OW, kh*kw*C), columns ordered (dy, dx, c): conv_geometry.im2col.

    The columns are written into memory from the pool when it has some (``release``
    gives it back). ``width`` > K = kh*kw*C widens every row: column K holds ones
    and the rest zeros (``forward``'s bias column).
    """
    b, h, w, c, hp, wp, oh, ow = _geometry(x.shape, kh, kw, stride, pads)
    top, _, left, _ = pads
    k = kh * kw * c
    width = width or k
    cols = _pooled((b, oh, ow, width), x.dtype)
    item = cols.itemsize
    # the first K columns of each row, seen as (kh, kw, c): where the windows go
    patches = np.lib.stride_tricks.as_strided(
        cols, shape=(b, oh, ow, kh, kw, c), strides=cols.strides[:3] + (kw * c * item, c * item, item))

    def shard(lo, hi):
        if width > k:
            cols[lo:hi, :, :, k] = 1
            cols[lo:hi, :, :, k + 1:] = 0
        buf = np.zeros((min(IMAGES_PER_CHUNK, hi - lo), hp, wp, c), dtype=x.dtype)  # borders stay 0
        for i0 in range(lo, hi, IMAGES_PER_CHUNK):
            n = min(IMAGES_PER_CHUNK, hi - i0)
            xpad = buf[:n]
            xpad[:, top:top + h, left:left + w] = x[i0:i0 + n]
            sb, sh, sw, sc = xpad.strides
            windows = np.lib.stride_tricks.as_strided(
                xpad, shape=(n, oh, ow, kh, kw, c), strides=(sb, stride * sh, stride * sw, sh, sw, sc))
            patches[i0:i0 + n] = windows

    parallel(shard, b, oh * ow * width)
    return cols.reshape(b * oh * ow, width), (oh, ow)


def column_width(k, has_bias):
    """Columns of ``forward``'s im2col for K = kh*kw*c_in: K when K is a multiple of
    WIDTH_MULTIPLE, else K (+ 1 for the bias) rounded up to one."""
    if k % WIDTH_MULTIPLE == 0:
        return k
    return -(-(k + has_bias) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def forward(x, W, b, stride, pads):
    """(y (B, OH, OW, M), cols): the exact conv, im2col + one GEMM.

    Columns of a K that is not a multiple of WIDTH_MULTIPLE are widened to one; the
    first extra column holds ones and the matching row of the widened W the bias,
    so the bias add happens inside the GEMM (and db inside weight_grads' GEMM).
    """
    kh, kw, c, m = W.shape
    k = kh * kw * c
    width = column_width(k, b is not None)
    cols, (oh, ow) = im2col(x, kh, kw, stride, pads, width)
    if width == k:
        y = cols @ W.reshape(k, m)
        if b is not None:
            y += b
    else:
        Wide = np.zeros((width, m), dtype=W.dtype)
        Wide[:k] = W.reshape(k, m)
        if b is not None:
            Wide[k] = b
        y = cols @ Wide
    return y.reshape(x.shape[0], oh, ow, m), cols


def col2im(cols, x_shape, kh, kw, stride, pads):
    """Adjoint of im2col: conv_geometry.col2im (the same sums, in the same order per element)."""
    b, h, w, c, hp, wp, oh, ow = _geometry(x_shape, kh, kw, stride, pads)
    top, _, left, _ = pads
    cols = cols.reshape(b, oh, ow, kh, kw, c)
    dx = np.empty(x_shape, dtype=cols.dtype)

    def shard(lo, hi):
        buf = np.empty((min(IMAGES_PER_CHUNK, hi - lo), hp, wp, c), dtype=cols.dtype)
        for i0 in range(lo, hi, IMAGES_PER_CHUNK):
            n = min(IMAGES_PER_CHUNK, hi - i0)
            dxpad = buf[:n]
            dxpad[...] = 0
            for i in range(kh):
                for j in range(kw):
                    dxpad[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] += cols[i0:i0 + n, :, :, i, j, :]
            dx[i0:i0 + n] = dxpad[:, top:top + h, left:left + w, :]

    parallel(shard, b, cols[0].size)
    return dx


def flipped_pads(x_shape, kh, kw, stride, pads):
    """The padding of dY whose stride-1 convolution with the flipped kernel is the conv's dX,
    or None when there is none (stride > 1, or a pad of k or more)."""
    _, h, w, _, hp, wp, oh, ow = _geometry(x_shape, kh, kw, stride, pads)
    if stride != 1:
        return None
    top, _, left, _ = pads
    dpads = (kh - 1 - top, h + top - oh, kw - 1 - left, w + left - ow)
    return dpads if min(dpads) >= 0 else None


# The share of nonzero entries in dY at or below which the backward skips its zeros. A
# conv's dY behind ReLU, LRN and max pooling is mostly zeros once training is under way:
# CifarNet's conv2 95 % (3.3 nonzero channels of 64 per pixel), conv1 89-93 % in the
# middle and at the end of a full-data run; 54 % and 84 % at initialisation.
SPARSE_DENSITY = 0.15
# ... and the least K = kh*kw*c_in for it: each nonzero adds a row of K columns to dW, and
# short rows do not pay for the scan of dY. Measured on trained CifarNet weights, 2-core
# AMD EPYC: conv2 (K = 1600, 5 % nonzero) dW 32 against 55 ms, dX 24 against 80 ms;
# conv1 (K = 75, 11 % nonzero) dW 30 against 19 ms.
SPARSE_MIN_K = 256


def input_finite(x):
    """Whether every value of a conv's input is finite (the condition of sparse_backward), from
    one sum: a sum that is finite has no inf or NaN among its terms."""
    return bool(np.isfinite(x.sum()))


def sparse_backward(dy, W, x_finite):
    """Whether the backward should add only dY's nonzero entries: the compiled kernels load,
    K = kh*kw*c_in is at least SPARSE_MIN_K, at most SPARSE_DENSITY of dY is nonzero, and
    the input (``x_finite``) and W are finite, so the terms skipped are exact zeros (a
    GEMM's 0 x inf would be NaN). dX alone does not read the input: x_finite True."""
    kh, kw, c_in, _ = W.shape
    return (compiled_kernels() is not None and x_finite and kh * kw * c_in >= SPARSE_MIN_K
            and np.count_nonzero(dy) <= SPARSE_DENSITY * dy.size and bool(np.isfinite(W.sum())))


def weight_grads(cols, dy2, k, sparse=False):
    """(dW as (K, M), db) of a conv from its columns and dY (N, M): cols^T dY and the column sums.

    dY^T cols (M x K) runs faster than cols^T dY in OpenBLAS (54 against 66 ms for
    CifarNet's conv2, 16 against 23 for conv1; 2-core CPU), and a product with ones
    sums the columns faster than a reduction along the rows. Columns widened by
    ``forward`` give db as row K of the product (the bias column is all ones).
    ``sparse`` (see sparse_backward): only dY's nonzero entries are added.
    """
    if sparse:
        dW = compiled_kernels().sparse_weight_grads(cols, dy2, threads())
    else:
        dW = np.ascontiguousarray((dy2.T @ cols).T)
    if cols.shape[1] > k:
        return dW[:k], dW[k].copy()
    return dW, np.ones(dy2.shape[0], dtype=dy2.dtype) @ dy2


def input_grad(dy, W, x_shape, stride, pads, sparse=False):
    """dX of a conv (B, OH, OW, M) -> (B, H, W, C): col2im(dY @ W^T), as a convolution of dY
    with the flipped kernel where flipped_pads allows, else col2im of the product;
    ``sparse`` (see sparse_backward): only dY's nonzero entries are added, at any stride."""
    if sparse:
        return compiled_kernels().sparse_input_grad(dy, W, x_shape, stride, pads, threads())
    kh, kw, c, m = W.shape
    dpads = flipped_pads(x_shape, kh, kw, stride, pads)
    if dpads is None:
        return col2im(dy.reshape(-1, m) @ W.reshape(-1, m).T, x_shape, kh, kw, stride, pads)
    cols, _ = im2col(dy, kh, kw, 1, dpads)
    flipped = np.ascontiguousarray(W[::-1, ::-1].transpose(0, 1, 3, 2)).reshape(kh * kw * m, c)
    dx = (cols @ flipped).reshape(x_shape)
    release(cols)
    return dx
