"""Conv2D on NHWC inputs as im2col + GEMM, with col2im in the backward.

Weights are (kh, kw, c_in, c_out), so W.reshape(K, M) needs no copy and the
im2col rows are (kh, kw, c) patches: row n = (image, out_y, out_x) and column
k = (dy, dx, c). With ``reuse`` set, the GEMM is replaced by the deep-reuse
product of ``minireuse.reuse`` (same layer, same parameters).
"""
import numpy as np

from .. import backend, cpu
from .. import reuse as deep_reuse
from ..cpu import conv as cpu_conv
from ..conv_geometry import col2im, conv_padding, im2col, pad_nhwc  # noqa: F401 (the layer API names them)
from .base import ReusableLayer, default_dtype
from .init import resolve


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
        if self.reuse_runs(train):
            y, cache = deep_reuse.conv2d_forward(x, W, b, self.stride, pads, self.reuse,
                                                self.reuse_state, train=train)
            self._cache = ("reuse", (cache, x.shape, pads, self.reuse.dx_mode))
            return y
        if cpu.supports(x, W):      # the CPU fast path: widened columns carry the bias
            y, cols = cpu_conv.forward(x, W, b, self.stride, pads)
            if not train:
                cpu_conv.release(cols)      # kept for the next im2col
                return y
            # whether the backward may skip dY's zeros (cpu_conv.sparse_backward)
            x_finite = (cpu.compiled_kernels() is not None and self.kh * self.kw * self.c_in >= cpu_conv.SPARSE_MIN_K
                        and cpu_conv.input_finite(x))
            self._cache = ("cpu", (cols, x.shape, pads, x_finite))
            return y
        cols, (oh, ow) = im2col(x, self.kh, self.kw, self.stride, pads)
        y = (cols @ W.reshape(-1, self.c_out)).reshape(x.shape[0], oh, ow, self.c_out)
        if b is not None:
            y += b
        if train:
            self._cache = ("exact", (cols, x.shape, pads))
        return y

    def backward(self, dy):
        kind, cache = self._cache
        self._cache = None
        if kind == "reuse":
            cache, x_shape, pads, dx_mode = cache
            W = self.params["W"]
            # an exact dX needs nothing of the clusters: the CPU fast path's (sparse) one serves
            fast_dx = self.needs_input_grad and dx_mode == "exact" and cpu.supports(dy, W)
            dx, dW, db = deep_reuse.conv2d_backward(dy, cache, self.needs_input_grad and not fast_dx)
            if fast_dx:
                dx = cpu_conv.input_grad(dy, W, x_shape, self.stride, pads, cpu_conv.sparse_backward(dy, W, True))
        elif kind == "cpu":             # the CPU fast path: dX as a conv of dY, no col2im
            cols, x_shape, pads, x_finite = cache
            W = self.params["W"]
            sparse = cpu_conv.sparse_backward(dy, W, x_finite)
            dW, db = cpu_conv.weight_grads(cols, dy.reshape(-1, self.c_out), self.kh * self.kw * self.c_in, sparse)
            dW = dW.reshape(W.shape)
            cpu_conv.release(cols)          # dY's columns (and the next step's) reuse its memory
            dx = (cpu_conv.input_grad(dy, W, x_shape, self.stride, pads, sparse)
                  if self.needs_input_grad else None)
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
        return dx
