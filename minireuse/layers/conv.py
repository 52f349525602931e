"""Conv2D on NHWC inputs as im2col + GEMM, with col2im in the backward.

Weights are (kh, kw, c_in, c_out), so W.reshape(K, M) needs no copy and the
im2col rows are (kh, kw, c) patches: row n = (image, out_y, out_x) and column
k = (dy, dx, c). With ``reuse`` set, the GEMM is replaced by the deep-reuse
product of ``minireuse.reuse`` (same layer, same parameters).
"""
import numpy as np

from .. import backend
from .base import ReusableLayer, default_dtype
from .init import resolve


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
    xp = backend.get_array_module(x)
    b, h, w, c = x.shape
    xpad = xp.ascontiguousarray(pad_nhwc(x, pads))
    oh = (h + pads[0] + pads[1] - kh) // stride + 1
    ow = (w + pads[2] + pads[3] - kw) // stride + 1
    sb, sh, sw, sc = xpad.strides
    windows = xp.lib.stride_tricks.as_strided(
        xpad, shape=(b, oh, ow, kh, kw, c), strides=(sb, stride * sh, stride * sw, sh, sw, sc))
    return windows.reshape(b * oh * ow, kh * kw * c), (oh, ow)


def col2im(cols, x_shape, kh, kw, stride, pads):
    """Adjoint of im2col: scatter-add the columns back into a (B, H, W, C) array."""
    from .. import fused
    if fused.supports(cols):          # CuPy: one gather kernel instead of kh*kw launches
        return fused.col2im(cols, x_shape, kh, kw, stride, pads)
    xp = backend.get_array_module(cols)
    b, h, w, c = x_shape
    hp, wp = h + pads[0] + pads[1], w + pads[2] + pads[3]
    oh = (hp - kh) // stride + 1
    ow = (wp - kw) // stride + 1
    cols = cols.reshape(b, oh, ow, kh, kw, c)
    dxpad = xp.zeros((b, hp, wp, c), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] += cols[:, :, :, i, j, :]
    return dxpad[:, pads[0]:pads[0] + h, pads[2]:pads[2] + w, :]


class Conv2D(ReusableLayer):
    """2-D convolution, NHWC, weights (kh, kw, c_in, c_out).

    reuse: None/False for exact computation, or a deep-reuse setting
    (a ``minireuse.reuse.ReuseConfig`` or a dict of its fields); change it
    between steps with ``set_reuse``.
    """

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding="same", bias=True,
                 weight_init="glorot_uniform", bias_init="zeros", reuse=None,
                 dtype=None, rng=None, name=None):
        super().__init__(name)
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
        if min(kh, kw, c_in, c_out, stride) < 1:
            raise ValueError(f"{self.name}: sizes must be positive (c_in={c_in}, c_out={c_out}, "
                             f"kernel={kernel_size}, stride={stride})")
        self.c_in, self.c_out, self.kh, self.kw, self.stride = c_in, c_out, kh, kw, stride
        self.padding = padding
        conv_padding(padding, max(kh, kw), kh, stride)  # validate early
        rng = rng if rng is not None else np.random.default_rng()
        dtype = dtype or default_dtype()
        fan_in, fan_out = kh * kw * c_in, kh * kw * c_out
        w = resolve(weight_init)((kh, kw, c_in, c_out), fan_in, fan_out, rng)
        self.params["W"] = backend.to_device(w, dtype)
        self.decay["W"] = True
        if bias:
            self.params["b"] = backend.to_device(resolve(bias_init)((c_out,), fan_in, fan_out, rng), dtype)
            self.decay["b"] = False
        self.set_reuse(reuse)

    def pads(self, h, w):
        t, b, oh = conv_padding(self.padding, h, self.kh, self.stride)
        l, r, ow = conv_padding(self.padding, w, self.kw, self.stride)
        return (t, b, l, r), (oh, ow)

    def output_shape(self, input_shape):
        n, h, w, c = input_shape
        if c != self.c_in:
            raise ValueError(f"{self.name}: expected {self.c_in} input channels, got shape {input_shape}")
        _, (oh, ow) = self.pads(h, w)
        return (n, oh, ow, self.c_out)

    def forward(self, x, train=True):
        self._check_input(x, 4, "(batch, height, width, channels)")
        if x.shape[3] != self.c_in:
            raise ValueError(f"{self.name}: expected {self.c_in} input channels (NHWC), got shape {x.shape}")
        pads, _ = self.pads(x.shape[1], x.shape[2])
        W, b = self.params["W"], self.params.get("b")
        if self.reuse_active():
            from .. import reuse as reuse_mod
            y, cache = reuse_mod.conv2d_forward(x, W, b, self.stride, pads, self.reuse,
                                                self.reuse_state, train=train)
            self._cache = ("reuse", cache)
            return y
        cols, (oh, ow) = im2col(x, self.kh, self.kw, self.stride, pads)
        y = cols @ W.reshape(-1, self.c_out)
        if b is not None:
            y += b
        if train:
            self._cache = ("exact", (cols, x.shape, pads))
        return y.reshape(x.shape[0], oh, ow, self.c_out)

    def backward(self, dy):
        kind, cache = self._cache
        if kind == "reuse":
            from .. import reuse as reuse_mod
            dx, dW, db = reuse_mod.conv2d_backward(dy, cache)
        else:
            cols, x_shape, pads = cache
            dy2 = dy.reshape(-1, self.c_out)
            W2 = self.params["W"].reshape(-1, self.c_out)
            dW = (cols.T @ dy2).reshape(self.params["W"].shape)
            db = dy2.sum(axis=0)
            dx = (col2im(dy2 @ W2.T, x_shape, self.kh, self.kw, self.stride, pads)
                  if self.needs_input_grad else None)
        self.grads["W"] = dW
        if "b" in self.params:
            self.grads["b"] = db
        self._cache = None
        return dx
