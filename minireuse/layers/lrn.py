"""Local response normalisation across channels, with TensorFlow's semantics.

    sqr_sum[..., d] = sum(x[..., d - r : d + r + 1] ** 2)
    y = x / (bias + alpha * sqr_sum) ** beta

(tf.nn.local_response_normalization; alpha is NOT divided by the window size.)
"""
from .. import backend
from .base import Layer


def window_sum(a, r):
    """Sum over channels d-r..d+r (clipped at the edges) along the last axis."""
    xp = backend.get_array_module(a)
    c = a.shape[-1]
    cs = xp.cumsum(a, axis=-1)
    zero = xp.zeros(a.shape[:-1] + (1,), dtype=a.dtype)
    cs = xp.concatenate([zero, cs], axis=-1)           # cs[..., k] = sum of the first k channels
    hi = xp.minimum(xp.arange(c) + r + 1, c)
    lo = xp.maximum(xp.arange(c) - r, 0)
    return cs[..., hi] - cs[..., lo]


class LocalResponseNorm(Layer):
    def __init__(self, depth_radius=5, bias=1.0, alpha=1.0, beta=0.5, name=None):
        super().__init__(name)
        if depth_radius < 0:
            raise ValueError(f"{self.name}: depth_radius must be >= 0, got {depth_radius}")
        self.r, self.bias, self.alpha, self.beta = int(depth_radius), float(bias), float(alpha), float(beta)

    def forward(self, x, train=True):
        d = self.bias + self.alpha * window_sum(x * x, self.r)
        scale = d ** -self.beta
        if train:
            self._cache = (x, d, scale)
        return x * scale

    def backward(self, dy):
        # y_d = x_d * D_d^-b with D_j = bias + alpha * sum_{i in win(j)} x_i^2, so
        # dx_i = dy_i * D_i^-b - 2 alpha b x_i * sum_{j in win(i)} dy_j x_j D_j^(-b-1)
        # (the window is symmetric: i in win(j) <=> j in win(i)).
        x, d, scale = self._cache
        t = dy * x * scale / d
        dx = dy * scale - (2.0 * self.alpha * self.beta) * x * window_sum(t, self.r)
        self._cache = None
        return dx
