import math

import numpy as np
import pytest

from minireuse import backend
from minireuse.layers import Dense
from minireuse.models import Sequential
from minireuse.optim import SGD, Adam, cosine_lr, make_schedule, step_lr, warmup


def one_layer_model(device, rng, name="fc"):
    layer = Dense(3, 2, dtype=np.float64, rng=rng, name=name)
    layer.grads = {k: device.asarray(rng.standard_normal(v.shape)) for k, v in layer.params.items()}
    return Sequential([layer]), layer


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_formula(device, rng, nesterov):
    model, layer = one_layer_model(device, rng)
    w = backend.asnumpy(layer.params["W"]).copy()
    g = backend.asnumpy(layer.grads["W"])
    opt = SGD(model, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    v = np.zeros_like(w)
    for step in range(3):
        opt.step()
        gd = g + 0.01 * w  # decay applies to W
        v = gd if step == 0 else 0.9 * v + gd
        w = w - 0.1 * (gd + 0.9 * v if nesterov else v)
    np.testing.assert_allclose(backend.asnumpy(layer.params["W"]), w, rtol=1e-12)


def test_weight_decay_only_on_chosen_layers(device, rng):
    a = Dense(3, 2, dtype=np.float64, rng=rng, name="a")
    b = Dense(2, 2, dtype=np.float64, rng=rng, name="b")
    model = Sequential([a, b])
    for layer in (a, b):
        layer.grads = {k: device.zeros_like(v) for k, v in layer.params.items()}
    wa, wb = a.params["W"].copy(), b.params["W"].copy()
    bias_a = a.params["b"].copy()
    SGD(model, lr=0.5, weight_decay=0.1, decay_layers=["a"]).step()
    np.testing.assert_allclose(backend.asnumpy(a.params["W"]), backend.asnumpy(wa) * (1 - 0.05))
    np.testing.assert_array_equal(backend.asnumpy(b.params["W"]), backend.asnumpy(wb))
    np.testing.assert_array_equal(backend.asnumpy(a.params["b"]), backend.asnumpy(bias_a))  # biases never decay


def test_adam_matches_formula(device, rng):
    model, layer = one_layer_model(device, rng)
    w = backend.asnumpy(layer.params["W"]).copy()
    g = backend.asnumpy(layer.grads["W"])
    opt = Adam(model, lr=0.01)
    m = v = 0
    for t in range(1, 4):
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(backend.asnumpy(layer.params["W"]), w, rtol=1e-10)


def test_optimizer_state_round_trip(device, rng):
    model, layer = one_layer_model(device, rng)
    opt = SGD(model, lr=0.1, momentum=0.9)
    opt.step()
    state = opt.state_dict()
    opt2 = SGD(model, lr=0.5, momentum=0.9)
    opt2.load_state_dict(state)
    assert opt2.lr == 0.1 and opt2.steps == 1
    np.testing.assert_array_equal(backend.asnumpy(opt2.state["fc.W"]["v"]), backend.asnumpy(opt.state["fc.W"]["v"]))


def test_schedules():
    assert step_lr(1.0, 10, 0.5)(9.9) == 1.0 and step_lr(1.0, 10, 0.5)(10) == 0.5
    c = cosine_lr(2.0, 10)
    assert c(0) == 2.0 and abs(c(5) - 1.0) < 1e-12 and abs(c(10)) < 1e-12
    w = warmup(lambda t: 1.0, 2.0)
    assert abs(w(1.0) - 0.5) < 1e-9 and w(3.0) == 1.0
    s = make_schedule("cosine", 0.1, 10, warmup_epochs=1)
    assert s(0.5) < s(1.0) and math.isclose(s(1.0), cosine_lr(0.1, 10)(1.0))
    with pytest.raises(ValueError, match="unknown lr schedule"):
        make_schedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="learning rate must be positive"):
        SGD(Sequential([]), lr=0)
