"""Parameter-free layers: ReLU, Flatten, Dropout."""
import numpy as np

from .. import backend
from .base import Layer


class ReLU(Layer):
    def forward(self, x, train=True):
        xp = backend.get_array_module(x)
        y = xp.maximum(x, 0)
        if train:
            self._y = y
        return y

    def backward(self, dy):
        dx = dy * (self._y > 0)
        self._y = None
        return dx


class Flatten(Layer):
    """(batch, ...) -> (batch, prod(...)); NHWC order, so features are (h, w, c)."""

    def output_shape(self, input_shape):
        return (input_shape[0], int(np.prod(input_shape[1:])))

    def forward(self, x, train=True):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``rate`` and
    scale the rest by 1/(1-rate); identity at evaluation.

    Random draws come from ``self.rng`` (a numpy Generator on the CPU, a cupy
    generator on the GPU); the trainer reseeds it so runs are reproducible.
    """

    def __init__(self, rate=0.5, seed=0, name=None):
        super().__init__(name)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{self.name}: rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.reseed(seed)

    def reseed(self, seed):
        self.rng = backend.random_generator(seed)

    def forward(self, x, train=True):
        if not train or self.rate == 0.0:
            self._mask = None
            return x
        keep = 1.0 - self.rate
        self._mask = (self.rng.random(x.shape, dtype=np.float32) < keep).astype(x.dtype) / keep
        return x * self._mask

    def backward(self, dy):
        return dy if self._mask is None else dy * self._mask
