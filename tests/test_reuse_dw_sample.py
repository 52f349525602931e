"""ReuseConfig.dw_sample on the reference path: the centroid dW plus sampled exact residuals.

p = 1 gives the exact dW; for p < 1 the mean of dW over every possible start of the
systematic sample is the exact dW (unbiased), while y, dX and db do not change.
"""
import numpy as np
import pytest

from minireuse.conv_geometry import im2col
from minireuse.layers import Conv2D
from minireuse.layers.simple import reseed_layers
from minireuse.models import cifarnet
from minireuse.reuse import ReuseConfig, ReuseState, conv2d_backward, conv2d_forward, dense_backward, dense_forward

PADS = (1, 2, 0, 1)


def _conv(config, state, x, W, b, dy):
    y, cache = conv2d_forward(x, W, b, 1, PADS, config, state)
    return (y, *conv2d_backward(dy, cache))


def _dense(config, state, X, W, b, dy):
    y, cache = dense_forward(X, W, b, config, state)
    return (y, *dense_backward(dy, cache))


def _data(kind, rng):
    if kind == "dense":
        X = rng.standard_normal((53, 13)) + 0.2
        W = rng.standard_normal((13, 5))
        return _dense, (X, W, rng.standard_normal(5), rng.standard_normal((53, 5))), X.T
    x = rng.standard_normal((2, 5, 6, 8)) + 0.3
    W = rng.standard_normal((3, 3, 8, 5))
    oh, ow = 5 + 3 - 2, 6 + 1 - 2
    cols, _ = im2col(x, 3, 3, 1, PADS)
    return _conv, (x, W, rng.standard_normal(5), rng.standard_normal((2, oh, ow, 5))), cols.T


CASES = [("dense", dict(L=4, H=3)), ("pixel", dict(L=4, H=3)),
         ("general", dict(L=5, H=4, pixel_aligned=False))]


@pytest.mark.parametrize("kind,fields", CASES, ids=[c[0] for c in CASES])
def test_full_sample_gives_the_exact_dW(kind, fields):
    run, data, XT = _data(kind, np.random.default_rng(1))
    y, dX, dW, db = run(ReuseConfig(dw_sample=1.0, **fields), ReuseState(), *data)
    exact = XT @ data[-1].reshape(-1, 5)
    assert np.allclose(dW.reshape(exact.shape), exact, atol=1e-10)
    y0, dX0, dW0, db0 = run(ReuseConfig(**fields), ReuseState(), *data)
    assert np.linalg.norm(dW0.reshape(exact.shape) - exact) > 0.05 * np.linalg.norm(exact)  # the bias it removes
    assert np.array_equal(y, y0) and np.array_equal(dX, dX0) and np.array_equal(db, db0)


@pytest.mark.parametrize("kind,fields", CASES, ids=[c[0] for c in CASES])
def test_mean_over_every_start_is_the_exact_dW(kind, fields, monkeypatch):
    run, data, XT = _data(kind, np.random.default_rng(2))
    exact = XT @ data[-1].reshape(-1, 5)
    step = 4
    dWs = []
    for start in range(step):
        monkeypatch.setattr(ReuseState, "sample_rows", lambda self, n, fraction, s=start: (s, step))
        dWs.append(run(ReuseConfig(dw_sample=0.25, **fields), ReuseState(), *data)[2].reshape(exact.shape))
    assert np.allclose(np.mean(dWs, axis=0), exact, atol=1e-10)
    assert not np.allclose(dWs[0], exact, atol=1e-3)          # one start alone is an estimate


def test_sample_rows_draws_a_start_below_the_step_from_the_state_generator():
    state = ReuseState()
    starts = {state.sample_rows(100, 0.125)[0] for _ in range(200)}
    assert starts == set(range(8))
    assert state.sample_rows(100, 1.0) == (0, 1)
    assert state.sample_rows(3, 0.01) [1] == 3                # the step never exceeds the rows
    a, b = ReuseState(), ReuseState()
    a.reseed((0, 1, 2))
    b.reseed((0, 1, 2))
    assert [a.sample_rows(50, 0.1) for _ in range(5)] == [b.sample_rows(50, 0.1) for _ in range(5)]


def test_the_trainer_seed_reaches_every_reuse_state():
    model = cifarnet()
    model.layer("conv2").set_reuse(dict(L=64, H=32, dw_sample=0.125))
    model.layer("fc3").set_reuse(dict(L=64, H=12, dw_sample=0.125))
    draws = []
    for _ in range(2):
        reseed_layers(model, (3, 1, 7))
        draws.append([model.layer(n).reuse_state.sample_rows(10 ** 6, 0.001) for n in ("conv2", "fc3")])
    assert draws[0] == draws[1]
    reseed_layers(model, (3, 1, 8))
    assert [model.layer(n).reuse_state.sample_rows(10 ** 6, 0.001) for n in ("conv2", "fc3")] != draws[0]


def test_a_layer_with_dw_sample_trains_and_its_gradient_check_holds_at_full_sample():
    rng = np.random.default_rng(3)
    layer = Conv2D(8, 4, 3, padding="same", reuse=dict(L=4, H=3, dw_sample=1.0))
    x = rng.standard_normal((2, 5, 5, 8))
    layer.params["W"] = rng.standard_normal(layer.params["W"].shape)
    dy = rng.standard_normal((2, 5, 5, 4))
    layer.forward(x)
    layer.backward(dy)
    cols, _ = im2col(x, 3, 3, 1, (1, 1, 1, 1))
    assert np.allclose(layer.grads["W"].reshape(-1, 4), cols.T @ dy.reshape(-1, 4), atol=1e-10)
