"""Weight initialisers. Each takes (shape, fan_in, fan_out, rng) and returns a host array."""
import numpy as np


def glorot_uniform(shape, fan_in, fan_out, rng):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def he_normal(shape, fan_in, fan_out, rng):
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


def truncated_normal(std):
    """TF-slim's truncated normal: redraw values beyond two standard deviations."""
    def init(shape, fan_in, fan_out, rng):
        w = rng.normal(0.0, std, size=shape)
        bad = np.abs(w) > 2 * std
        while bad.any():
            w[bad] = rng.normal(0.0, std, size=int(bad.sum()))
            bad = np.abs(w) > 2 * std
        return w
    return init


def zeros(shape, fan_in, fan_out, rng):
    return np.zeros(shape)


def constant(value):
    def init(shape, fan_in, fan_out, rng):
        return np.full(shape, float(value))
    return init


INITIALISERS = {"glorot_uniform": glorot_uniform, "he_normal": he_normal, "zeros": zeros}


def resolve(init):
    if callable(init):
        return init
    if init not in INITIALISERS:
        raise ValueError(f"unknown initialiser {init!r}; expected one of {sorted(INITIALISERS)} or a callable")
    return INITIALISERS[init]
