"""Layer protocol: explicit forward(x, train) and backward(dy) -> dx.

Every layer keeps what its backward needs from the last forward call, holds
its parameters in ``params`` and, after backward, their gradients in ``grads``
(same keys). There is no autograd tape: a model's backward is the layers'
backward calls in reverse order.
"""
import numpy as np

from .. import backend
from ..reuse.config import ReuseConfig, ReuseState


class Layer:
    def __init__(self, name=None):
        self.name = name or type(self).__name__.lower()
        self.params = {}
        self.grads = {}
        # per-parameter weight-decay switch, read by the optimizers
        self.decay = {}
        # False for a model's first layer: its backward may skip dx (returns None)
        self.needs_input_grad = True

    def forward(self, x, train=True):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def output_shape(self, input_shape):
        """Shape of the output for an input of shape (batch, ...), batch may be None."""
        return input_shape

    def __call__(self, x, train=True):
        return self.forward(x, train)

    def astype(self, dtype):
        for k, v in self.params.items():
            self.params[k] = v.astype(dtype)
        return self

    def _check_input(self, x, ndim, what):
        if not hasattr(x, "shape") or x.ndim != ndim:
            shape = getattr(x, "shape", type(x).__name__)
            raise ValueError(f"{self.name}: expected a {ndim}-d input {what}, got shape {shape}")
        if self.params:
            backend.get_array_module(x, *self.params.values())

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


def default_dtype():
    return np.float32


class ReusableLayer(Layer):
    """A layer whose matrix product can run exactly or with deep reuse (Conv2D, Dense)."""

    reuse = None
    reuse_state = None

    def set_reuse(self, reuse):
        """Switch deep reuse on (a setting or dict of its fields) or off (None/False)."""
        if reuse is None or reuse is False:
            self.reuse = None
            return
        self.reuse = ReuseConfig.coerce(reuse)
        if self.reuse_state is None:
            self.reuse_state = ReuseState()

    def reuse_active(self):
        return self.reuse is not None and self.reuse.enabled

    def reuse_runs(self, train):
        """Whether a forward takes the reuse path: a setting that reuses in the backward
        only (forward 'exact') has nothing to reuse in a forward without a backward
        (evaluation), which then takes the exact path instead of clustering for nothing."""
        return self.reuse_active() and (train or self.reuse.forward != "exact")
