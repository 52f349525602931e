"""Convolution geometry on NHWC arrays: padding, im2col and its adjoint col2im.

Below both the layers (layers/conv.py, layers/pool.py) and deep reuse (reuse/),
which share it. Columns are ordered (dy, dx, c), so with weights (kh, kw, c_in,
c_out) the conv is cols @ W.reshape(K, M) with no copy of W. On CuPy arrays,
col2im is one fused gather kernel (step_kernels.col2im); on NumPy arrays the CPU
fast path (cpu/conv.py) pads, copies and adds on every core. The array code below
is their twin.
"""
import numpy as np

from . import backend, cpu
from .kernels import step_kernels
from .cpu import conv as cpu_conv
from .geometry import ConvGeometry


def conv_padding(padding, size, k, stride):
    """(before, after, out) along one spatial axis for 'same', 'valid' or an int.

    'same' follows TensorFlow: out = ceil(size / stride), the extra pad goes after.
    """
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        return total // 2, total - total // 2, out
    if padding == "valid":
        pad = 0
    elif isinstance(padding, (int, np.integer)) and padding >= 0:
        pad = int(padding)
    else:
        raise ValueError(f"padding must be 'same', 'valid' or a non-negative int, got {padding!r}")
    out = (size + 2 * pad - k) // stride + 1
    if out <= 0:
        raise ValueError(f"kernel {k} with stride {stride} and padding {padding!r} does not fit input size {size}")
    return pad, pad, out


def pad_nhwc(x, pads):
    """Zero-pad the two spatial axes of an NHWC array by (top, bottom, left, right)."""
    if cpu.supports(x):
        return cpu_conv.pad(x, pads)
    xp = backend.get_array_module(x)
    top, bottom, left, right = pads
    if not any(pads):
        return x
    return xp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def im2col(x, kh, kw, stride, pads):
    """(B, H, W, C) -> cols (B*OH*OW, kh*kw*C) with columns ordered (dy, dx, c).

    The windows are a strided view of the padded input (no copy): axis (dy, dx)
    steps one pixel, axis (out_y, out_x) steps ``stride`` pixels; the reshape
    to a matrix makes the one copy.
    """
    if cpu.supports(x):
        return cpu_conv.im2col(x, kh, kw, stride, pads)
    xp = backend.get_array_module(x)
    g = ConvGeometry.of(x.shape, kh, kw, stride, pads)
    b, c, oh, ow = g.B, g.C, g.oh, g.ow
    xpad = xp.ascontiguousarray(pad_nhwc(x, pads))
    sb, sh, sw, sc = xpad.strides
    windows = xp.lib.stride_tricks.as_strided(
        xpad, shape=(b, oh, ow, kh, kw, c), strides=(sb, stride * sh, stride * sw, sh, sw, sc))
    return windows.reshape(b * oh * ow, kh * kw * c), (oh, ow)


def col2im(cols, x_shape, kh, kw, stride, pads):
    """Adjoint of im2col: scatter-add the columns back into a (B, H, W, C) array."""
    if step_kernels.supports(cols):          # CuPy: one gather kernel instead of kh*kw launches
        return step_kernels.col2im(cols, x_shape, kh, kw, stride, pads)
    if cpu.supports(cols):
        return cpu_conv.col2im(cols, x_shape, kh, kw, stride, pads)
    xp = backend.get_array_module(cols)
    g = ConvGeometry.of(x_shape, kh, kw, stride, pads)
    b, h, w, c, hp, wp, oh, ow = g.B, g.h, g.w, g.C, g.hp, g.wp, g.oh, g.ow
    cols = cols.reshape(b, oh, ow, kh, kw, c)
    dxpad = xp.zeros((b, hp, wp, c), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] += cols[:, :, :, i, j, :]
    return dxpad[:, pads[0]:pads[0] + h, pads[2]:pads[2] + w, :]
