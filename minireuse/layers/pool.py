"""Max pooling on NHWC inputs.

On CuPy arrays with windows that do not overlap (stride >= pool size, CifarNet's
2x2/2), forward and backward are one fused kernel each (minireuse.kernels.step_kernels): the
forward keeps the position of each window's first maximum (one byte per output)
and the backward is a gather from it. On NumPy arrays with windows that tile the
input (CifarNet's 2x2/2), the CPU fast path (minireuse.cpu.ops) does the same on
every core. The array code below is their twin.
"""
from .. import backend, cpu
from ..kernels import step_kernels
from ..cpu import ops as cpu_ops
from .base import Layer
from ..conv_geometry import conv_padding


class MaxPool2D(Layer):
    """Max pool with a (k x k) window and stride; padding 'valid' (TF-slim's default) or 'same'.

    Ties go to the first maximum in (dy, dx) order; windows may overlap (stride < k):
    the backward accumulates.
    """

    def __init__(self, pool_size=2, stride=None, padding="valid", name=None):
        super().__init__(name)
        self.k = int(pool_size)
        self.stride = int(stride or pool_size)
        if self.k < 1 or self.stride < 1:
            raise ValueError(f"{self.name}: pool_size and stride must be positive")
        if padding not in ("valid", "same"):
            raise ValueError(f"{self.name}: padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding

    def _geometry(self, h, w):
        t, b, oh = conv_padding(self.padding, h, self.k, self.stride)
        l, r, ow = conv_padding(self.padding, w, self.k, self.stride)
        return (t, b, l, r), oh, ow

    def output_shape(self, input_shape):
        n, h, w, c = input_shape
        _, oh, ow = self._geometry(h, w)
        return (n, oh, ow, c)

    def _window(self, xpad, i, j, oh, ow):
        """The (B, OH, OW, C) view of xpad under window offset (i, j)."""
        s = self.stride
        return xpad[:, i:i + s * oh:s, j:j + s * ow:s, :]

    def forward(self, x, train=True):
        self._check_input(x, 4, "(batch, height, width, channels)")
        xp = backend.get_array_module(x)
        pads, oh, ow = self._geometry(x.shape[1], x.shape[2])
        if step_kernels.supports(x) and step_kernels.maxpool_fits(self.k, self.stride):
            y, arg = step_kernels.maxpool_forward(x, self.k, self.stride, pads, (oh, ow))
            if train:
                self._cache = ("fused", arg, x.shape, pads)
            return y
        if cpu.supports(x) and cpu_ops.tiles_input(x.shape, self.k, self.stride, pads):
            y, arg = cpu_ops.maxpool_forward(x, self.k)
            if train:
                self._cache = ("cpu", arg, x.shape)
            return y
        t, b, l, r = pads
        xpad = xp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=-xp.inf) if any(pads) else x
        y = self._window(xpad, 0, 0, oh, ow)
        for idx in range(1, self.k * self.k):
            y = xp.maximum(y, self._window(xpad, *divmod(idx, self.k), oh, ow))
        if train:
            self._cache = ("array", xpad, y, x.shape, pads)
        return y

    def backward(self, dy):
        # The gradient goes to the first maximum of each window in (dy, dx) order:
        # walk the offsets in that order and hand it to positions equal to the max
        # that no earlier offset has taken.
        kind, *cache = self._cache
        self._cache = None
        if kind == "fused":
            arg, x_shape, pads = cache
            return step_kernels.maxpool_backward(dy, arg, x_shape, self.k, self.stride, pads)
        if kind == "cpu":
            arg, x_shape = cache
            return cpu_ops.maxpool_backward(dy, arg, x_shape, self.k)
        xp = backend.get_array_module(dy)
        xpad, y, (n, h, w, c), (t, b, l, r) = cache
        oh, ow = dy.shape[1:3]
        dxpad = xp.zeros(xpad.shape, dtype=dy.dtype)
        taken = xp.zeros(y.shape, dtype=bool)
        for idx in range(self.k * self.k):
            i, j = divmod(idx, self.k)
            hit = (self._window(xpad, i, j, oh, ow) == y) & ~taken
            taken |= hit
            self._window(dxpad, i, j, oh, ow)[...] += dy * hit
        return dxpad[:, t:t + h, l:l + w, :]
