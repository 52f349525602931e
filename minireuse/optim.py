"""Optimizers (SGD with momentum/Nesterov, Adam) and learning-rate schedules.

An optimizer updates every parameter of a model in place from the gradients its
layers stored in backward. Weight decay is per parameter: it applies where the
layer's ``decay[name]`` is True (weights, not biases, by default) and can be
switched per layer with ``decay_layers``.

A step has a host part and a device part: ``begin_step`` counts it and, on the
GPU, uploads the values that change every step (learning rate, Adam's bias
corrections) into device memory without waiting; ``apply`` updates the parameters.
``step`` is both. On CuPy arrays ``apply`` is one fused kernel per parameter
(minireuse.kernels.step_kernels) that reads those values from device memory, never
from its launch arguments; ``update`` below, the array code, is its twin and runs on
NumPy.
"""
import math

import numpy as np

from . import backend
from .kernels import step_kernels


class Optimizer:
    def __init__(self, model, lr, weight_decay=0.0, decay_layers=None):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.decay_layers = set(decay_layers) if decay_layers is not None else None
        self.state = {}
        self.steps = 0
        self._hyper = None      # DeviceScalars of step_scalars() on the GPU

    def _decays(self, layer, name):
        if self.weight_decay == 0.0 or not layer.decay.get(name, False):
            return False
        return self.decay_layers is None or layer.name in self.decay_layers

    def step(self):
        self.begin_step()
        self.apply()

    def begin_step(self):
        """The host part of a step: count it; on the GPU, upload this step's scalars."""
        self.steps += 1
        params = [layer.params[name] for _, layer, name in self.model.named_parameters()]
        if params and step_kernels.supports(params[0]):
            if self._hyper is None:
                self._hyper = backend.DeviceScalars(3, np.float64, xp=backend.get_array_module(params[0]))
            self._hyper.set(self.step_scalars())

    def step_scalars(self):
        """[lr, 1 - b1^t, 1 - b2^t]: what the fused kernels read from device memory."""
        return (self.lr, 1.0, 1.0)

    def apply(self):
        """Update every parameter from its gradient (the device part of a step)."""
        for key, layer, name in self.model.named_parameters():
            p, g = layer.params[name], layer.grads[name]
            wd = self.weight_decay if self._decays(layer, name) else 0.0
            if step_kernels.supports(p, g) and p.flags.c_contiguous:
                if self._hyper is None:
                    raise RuntimeError("Optimizer.apply on the GPU needs begin_step first (use step())")
                self.fused_update(key, p, g, wd)
                continue
            if wd:
                g = g + self.weight_decay * p
            self.update(key, p, g)

    def update(self, key, p, g):
        raise NotImplementedError

    def fused_update(self, key, p, g, weight_decay):
        raise NotImplementedError

    def state_dict(self):
        return {"steps": self.steps, "lr": self.lr,
                "state": {k: {n: backend.asnumpy(v) for n, v in s.items()} for k, s in self.state.items()}}

    def load_state_dict(self, d):
        self.steps = int(d["steps"])
        self.lr = float(d["lr"])
        self.state = {k: {n: backend.to_device(v) for n, v in s.items()} for k, s in d["state"].items()}


class SGD(Optimizer):
    """v = momentum * v + g;  p -= lr * (g + momentum * v if nesterov else v)."""

    def __init__(self, model, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, decay_layers=None):
        super().__init__(model, lr, weight_decay, decay_layers)
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov

    def update(self, key, p, g):
        if self.momentum == 0.0:
            p -= self.lr * g
            return
        s = self.state.setdefault(key, {})
        if "v" not in s:
            s["v"] = g.copy()
        else:
            s["v"] *= self.momentum
            s["v"] += g
        p -= self.lr * (g + self.momentum * s["v"] if self.nesterov else s["v"])

    def fused_update(self, key, p, g, weight_decay):
        if self.momentum == 0.0:
            step_kernels.sgd_update(p, g, None, self._hyper.array, 0.0, False, weight_decay, False)
            return
        s = self.state.setdefault(key, {})
        first = "v" not in s
        if first:
            s["v"] = backend.get_array_module(p).empty_like(p)
        step_kernels.sgd_update(p, g, s["v"], self._hyper.array, self.momentum, self.nesterov, weight_decay, first)


class Adam(Optimizer):
    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_layers=None):
        super().__init__(model, lr, weight_decay, decay_layers)
        self.b1, self.b2 = betas
        self.eps = eps

    def update(self, key, p, g):
        xp = backend.get_array_module(p)
        s = self.state.setdefault(key, {})
        if "m" not in s:
            s["m"], s["v"] = xp.zeros_like(p), xp.zeros_like(p)
        s["m"] *= self.b1
        s["m"] += (1 - self.b1) * g
        s["v"] *= self.b2
        s["v"] += (1 - self.b2) * g * g
        c1, c2 = 1 - self.b1 ** self.steps, 1 - self.b2 ** self.steps
        p -= self.lr * (s["m"] / c1) / (xp.sqrt(s["v"] / c2) + self.eps)

    def step_scalars(self):
        return (self.lr, 1 - self.b1 ** self.steps, 1 - self.b2 ** self.steps)

    def fused_update(self, key, p, g, weight_decay):
        s = self.state.setdefault(key, {})
        if "m" not in s:
            xp = backend.get_array_module(p)
            s["m"], s["v"] = xp.zeros_like(p), xp.zeros_like(p)
        step_kernels.adam_update(p, g, s["m"], s["v"], self._hyper.array, self.b1, self.b2, self.eps, weight_decay)


# ----- learning-rate schedules: callables epoch_fraction -> lr, where the
# argument is the (fractional) epoch count since the start of training.

def constant_lr(base):
    return lambda t: base


def step_lr(base, step_epochs, gamma=0.1):
    """base * gamma ** floor(t / step_epochs)."""
    return lambda t: base * gamma ** math.floor(t / step_epochs)


def cosine_lr(base, total_epochs, final=0.0):
    return lambda t: final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(t, total_epochs) / total_epochs))


def warmup(schedule, warmup_epochs):
    """Linear warm-up from 0 to schedule(warmup_epochs) over the first warmup_epochs."""
    if warmup_epochs <= 0:
        return schedule
    return lambda t: schedule(t) * min(1.0, (t + 1e-12) / warmup_epochs) if t < warmup_epochs else schedule(t)


def make_schedule(name, base, total_epochs, warmup_epochs=0.0, step_epochs=None, gamma=0.1):
    if name == "constant":
        s = constant_lr(base)
    elif name == "step":
        s = step_lr(base, step_epochs or max(1, total_epochs // 3), gamma)
    elif name == "cosine":
        s = cosine_lr(base, total_epochs)
    else:
        raise ValueError(f"unknown lr schedule {name!r}; expected constant, step or cosine")
    return warmup(s, warmup_epochs)
