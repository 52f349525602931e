"""Dense (fully connected) layer: y = x @ W + b, W of shape (in, out)."""
import numpy as np

from .. import backend
from .. import reuse as deep_reuse
from .base import ReusableLayer, default_dtype
from .init import resolve


class Dense(ReusableLayer):
    """reuse: None/False for exact computation, or a deep-reuse setting (see Conv2D)."""

    def __init__(self, n_in, n_out, bias=True, weight_init="glorot_uniform", bias_init="zeros",
                 reuse=None, dtype=None, rng=None, name=None):
        super().__init__(name)
        if n_in < 1 or n_out < 1:
            raise ValueError(f"{self.name}: sizes must be positive, got n_in={n_in}, n_out={n_out}")
        self.n_in, self.n_out = n_in, n_out
        rng = rng if rng is not None else np.random.default_rng()
        dtype = dtype or default_dtype()
        self.params["W"] = backend.to_device(resolve(weight_init)((n_in, n_out), n_in, n_out, rng), dtype)
        self.decay["W"] = True
        if bias:
            self.params["b"] = backend.to_device(resolve(bias_init)((n_out,), n_in, n_out, rng), dtype)
            self.decay["b"] = False
        self.set_reuse(reuse)

    def output_shape(self, input_shape):
        if input_shape[-1] != self.n_in or len(input_shape) != 2:
            raise ValueError(f"{self.name}: expected input (batch, {self.n_in}), got {input_shape}")
        return (input_shape[0], self.n_out)

    def forward(self, x, train=True):
        self._check_input(x, 2, f"(batch, {self.n_in})")
        if x.shape[1] != self.n_in:
            raise ValueError(f"{self.name}: expected input (batch, {self.n_in}), got shape {x.shape}")
        W, b = self.params["W"], self.params.get("b")
        if self.reuse_runs(train):
            y, cache = deep_reuse.dense_forward(x, W, b, self.reuse, self.reuse_state, train=train)
            self._cache = ("reuse", cache)
            return y
        y = x @ W
        if b is not None:
            y += b
        if train:
            self._cache = ("exact", x)
        return y

    def backward(self, dy):
        kind, cache = self._cache
        if kind == "reuse":
            dx, dW, db = deep_reuse.dense_backward(dy, cache, self.needs_input_grad)
        else:
            x = cache
            dW = x.T @ dy
            db = dy.sum(axis=0)
            dx = dy @ self.params["W"].T if self.needs_input_grad else None
        self.grads["W"] = dW
        if "b" in self.params:
            self.grads["b"] = db
        self._cache = None
        return dx
