"""Local response normalisation across channels, with TensorFlow's semantics.

    sqr_sum[..., d] = sum(x[..., d - r : d + r + 1] ** 2)
    y = x / (bias + alpha * sqr_sum) ** beta

(tf.nn.local_response_normalization; alpha is NOT divided by the window size.)

On CuPy arrays, forward and backward are one fused kernel each (minireuse.kernels.step_kernels,
looping over the 2r+1 window per element); on NumPy arrays the CPU fast path
(minireuse.cpu.ops) runs them on every core. The array code below is their twin.
"""
from .. import backend, cpu
from ..kernels import step_kernels
from ..cpu import ops as cpu_ops
from .base import Layer


def window_sum(a, r):
    """Sum over channels d-r..d+r (clipped at the edges) along the last axis.

    With the channels zero-padded by r on both sides and cs the running sum
    (cs[k] = sum of the first k padded channels), the window of channel d is
    cs[d + 2r + 1] - cs[d]: two slices, no gather.
    """
    xp = backend.get_array_module(a)
    c = a.shape[-1]
    widths = [(0, 0)] * (a.ndim - 1) + [(r + 1, r)]   # one extra zero in front: cs[0] = 0
    cs = xp.cumsum(xp.pad(a, widths), axis=-1)
    return cs[..., 2 * r + 1:c + 2 * r + 1] - cs[..., :c]


class LocalResponseNorm(Layer):
    def __init__(self, depth_radius=5, bias=1.0, alpha=1.0, beta=0.5, name=None):
        super().__init__(name)
        if depth_radius < 0:
            raise ValueError(f"{self.name}: depth_radius must be >= 0, got {depth_radius}")
        self.r, self.bias, self.alpha, self.beta = int(depth_radius), float(bias), float(alpha), float(beta)

    def forward(self, x, train=True):
        fast = _fast_ops(x)
        if fast is not None:
            y, scale, d = fast.lrn_forward(x, self.r, self.bias, self.alpha, self.beta)
        else:
            d = self.bias + self.alpha * window_sum(x * x, self.r)
            scale = d ** -self.beta
            y = x * scale
        if train:
            self._cache = (x, d, scale)
        return y

    def backward(self, dy):
        # y_d = x_d * D_d^-b with D_j = bias + alpha * sum_{i in win(j)} x_i^2, so
        # dx_i = dy_i * D_i^-b - 2 alpha b x_i * sum_{j in win(i)} dy_j x_j D_j^(-b-1)
        # (the window is symmetric: i in win(j) <=> j in win(i)).
        x, d, scale = self._cache
        self._cache = None
        fast = _fast_ops(dy, x)
        if fast is not None:
            return fast.lrn_backward(dy, x, scale, d, self.r, self.alpha, self.beta)
        t = dy * x * scale / d
        return dy * scale - (2.0 * self.alpha * self.beta) * x * window_sum(t, self.r)


def _fast_ops(*arrays):
    """The module whose lrn_forward/lrn_backward run these arrays: the GPU's fused kernels,
    the CPU fast path, or None for the array code."""
    if step_kernels.supports(*arrays):
        return step_kernels
    return cpu_ops if cpu.supports(*arrays) else None
