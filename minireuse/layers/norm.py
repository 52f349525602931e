"""Batch normalisation over the channel (last) axis of NHWC or (batch, features) inputs.

Training: with mu and var the mean and (biased) variance over every axis but the
last, xhat = (x - mu) / sqrt(var + eps), y = gamma * xhat + beta; the running
statistics move towards the batch's (running = m * running + (1 - m) * batch, the
variance unbiased). Evaluation uses the running statistics. Backward (training):

    dgamma = sum(dy * xhat),  dbeta = sum(dy)
    dx = (gamma / sqrt(var + eps)) * (dy - mean(dy) - xhat * mean(dy * xhat))

The running statistics are buffers: saved with the parameters (model.npz,
checkpoints), never touched by the optimizer, updated in place.
"""
import numpy as np

from .. import backend
from .base import Layer, default_dtype


class BatchNorm(Layer):
    def __init__(self, channels, momentum=0.9, eps=1e-5, dtype=None, name=None):
        super().__init__(name)
        if channels < 1:
            raise ValueError(f"{self.name}: channels must be positive, got {channels}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{self.name}: momentum must be in [0, 1), got {momentum}")
        dtype = dtype or default_dtype()
        self.channels, self.momentum, self.eps = int(channels), float(momentum), float(eps)
        self.params = {"gamma": backend.to_device(np.ones(channels), dtype),
                       "beta": backend.to_device(np.zeros(channels), dtype)}
        self.decay = {"gamma": False, "beta": False}
        self.buffers = {"running_mean": backend.to_device(np.zeros(channels), dtype),
                        "running_var": backend.to_device(np.ones(channels), dtype)}

    def _check(self, x):
        if not hasattr(x, "shape") or x.ndim < 2 or x.shape[-1] != self.channels:
            raise ValueError(f"{self.name}: expected an input with {self.channels} channels on its last axis, "
                             f"got shape {getattr(x, 'shape', type(x).__name__)}")

    def forward(self, x, train=True):
        self._check(x)
        axes = tuple(range(x.ndim - 1))
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not train:
            inv = 1.0 / (self.buffers["running_var"] + self.eps) ** 0.5
            return (x - self.buffers["running_mean"]) * (inv * gamma) + beta
        mu = x.mean(axis=axes)
        var = x.var(axis=axes)
        inv = 1.0 / (var + self.eps) ** 0.5
        xhat = (x - mu) * inv
        n = x.size // self.channels
        m = self.momentum
        # in place: a training step recorded as a CUDA graph (training/graphs.py) keeps writing the
        # arrays it saw while recording; evaluation and checkpoints must read those
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean[...] = m * running_mean + (1 - m) * mu
        running_var[...] = m * running_var + (1 - m) * var * (n / max(n - 1, 1))
        self._cache = (xhat, inv, axes)
        return xhat * gamma + beta

    def backward(self, dy):
        xhat, inv, axes = self._cache
        self._cache = None
        self.grads = {"gamma": (dy * xhat).sum(axis=axes), "beta": dy.sum(axis=axes)}
        if not self.needs_input_grad:
            return None
        g = self.params["gamma"] * inv
        return g * (dy - dy.mean(axis=axes) - xhat * (dy * xhat).mean(axis=axes))

    def astype(self, dtype):
        super().astype(dtype)
        self.buffers = {k: v.astype(dtype) for k, v in self.buffers.items()}
        return self
