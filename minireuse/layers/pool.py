"""Max pooling on NHWC inputs."""
from .. import backend
from .base import Layer
from .conv import conv_padding


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

    def _windows(self, x, pads, oh, ow):
        """(B, OH, OW, k*k, C): every window's values; padding counts as -inf."""
        xp = backend.get_array_module(x)
        t, b, l, r = pads
        if any(pads):
            x = xp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=-xp.inf)
        s = self.stride
        return xp.stack([x[:, i:i + s * oh:s, j:j + s * ow:s, :]
                         for i in range(self.k) for j in range(self.k)], axis=3)

    def forward(self, x, train=True):
        self._check_input(x, 4, "(batch, height, width, channels)")
        pads, oh, ow = self._geometry(x.shape[1], x.shape[2])
        win = self._windows(x, pads, oh, ow)
        arg = win.argmax(axis=3)
        if train:
            self._cache = (arg, x.shape, pads)
        return win.max(axis=3)

    def backward(self, dy):
        xp = backend.get_array_module(dy)
        arg, (n, h, w, c), (t, b, l, r) = self._cache
        oh, ow = dy.shape[1:3]
        s = self.stride
        dxpad = xp.zeros((n, h + t + b, w + l + r, c), dtype=dy.dtype)
        for idx in range(self.k * self.k):
            i, j = divmod(idx, self.k)
            dxpad[:, i:i + s * oh:s, j:j + s * ow:s, :] += dy * (arg == idx)
        self._cache = None
        return dxpad[:, t:t + h, l:l + w, :]
