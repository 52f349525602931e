import os

import numpy as np
import pytest

from minireuse import backend
from minireuse.losses import SoftmaxCrossEntropy
from minireuse.models import Sequential, cifarnet, mlp


def test_cifarnet_summary_and_shapes(device, rng):
    model = cifarnet(seed=0)
    text = model.summary((32, 32, 3))
    assert "(None, 8, 8, 64)" in text and "(None, 10)" in text
    # conv1 4864 + conv2 102464 + fc3 1573248 + fc4 73920 + logits 1930
    assert model.num_parameters() == 1756426
    assert f"{1756426:,}" in text
    # FLOPs per image: conv2 = 2 * 16*16 * 5*5*64*64 = 52.43 M, 80 % of the forward
    conv2 = next(line for line in text.splitlines() if line.startswith("conv2"))
    assert "52.43" in conv2 and "80.0%" in conv2
    assert text.splitlines()[-1] == "forward: 65.6 MFLOPs per image"
    y = model.forward(device.asarray(rng.standard_normal((2, 32, 32, 3)).astype(np.float32)), train=False)
    assert y.shape == (2, 10)


def test_cifarnet_gradient_in_float64(device, rng):
    model = cifarnet(seed=1, dropout=0.0, dtype=np.float64)
    x = device.asarray(rng.standard_normal((2, 32, 32, 3)))
    labels = device.asarray(np.array([3, 7]))
    loss = SoftmaxCrossEntropy()
    loss(model.forward(x), labels)
    model.backward(loss.backward())
    conv2 = model.layer("conv2")
    g = conv2.grads["W"].copy()
    v = device.asarray(rng.standard_normal(g.shape))
    w = conv2.params["W"]
    eps = 1e-6
    w += eps * v
    lp = float(loss(model.forward(x), labels))
    w -= 2 * eps * v
    lm = float(loss(model.forward(x), labels))
    w += eps * v
    num = (lp - lm) / (2 * eps)
    assert abs(num - float((g * v).sum())) < 1e-6 + 1e-5 * abs(num)


def test_save_load_round_trip(tmp_path, device):
    a, b = mlp([4, 5, 3], seed=0), mlp([4, 5, 3], seed=1)
    path = str(tmp_path / "m.npz")
    a.save(path)
    assert os.listdir(tmp_path) == ["m.npz"]  # no temporary left behind
    b.load(path)
    for (k, la, na), (_, lb, nb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(backend.asnumpy(la.params[na]), backend.asnumpy(lb.params[nb]))


def test_load_refuses_mismatched_parameters(tmp_path):
    mlp([4, 5, 3]).save(str(tmp_path / "m.npz"))
    with pytest.raises(ValueError, match="shape"):
        mlp([4, 6, 3]).load(str(tmp_path / "m.npz"))
    with pytest.raises(ValueError, match="missing"):
        mlp([4, 5, 5, 3]).load(str(tmp_path / "m.npz"))


def test_duplicate_layer_names_refused():
    from minireuse.layers import ReLU
    with pytest.raises(ValueError, match="unique"):
        Sequential([ReLU(name="r"), ReLU(name="r")])


def test_reuse_settings_swaps_the_layers_and_puts_their_own_back():
    model = cifarnet()
    model.layer("conv2").set_reuse(dict(L=16, H=12))
    before = {l.name: l.reuse for l in model.reuse_layers()}
    with model.reuse_settings(None) as swapped:
        assert [l.name for l in swapped] == list(before) and all(l.reuse is None for l in swapped)
    assert {l.name: l.reuse for l in model.reuse_layers()} == before
    with pytest.raises(RuntimeError):
        with model.reuse_settings(dict(L=8, H=4), names={"conv1"}):
            assert model.layer("conv1").reuse.L == 8 and model.layer("conv2").reuse.L == 16
            raise RuntimeError("the settings come back all the same")
    assert {l.name: l.reuse for l in model.reuse_layers()} == before


def test_input_of_applies_the_layers_before_the_named_one():
    model = cifarnet(seed=0)
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    h = x
    for layer in model.layers[:4]:            # conv1, relu1, pool1, norm1
        h = layer.forward(h, train=False)
    np.testing.assert_array_equal(model.input_of("conv2", x), h)
    assert model.input_of("conv1", x) is x
    with pytest.raises(KeyError, match="no layer named"):
        model.input_of("conv9", x)


@pytest.mark.parametrize("name,params,flops,shapes", [
    ("alexnet", 7706442, "451.3", ["(None, 4, 4, 256)", "(None, 1024)"]),
    ("vgg19", 20560330, "797.3", ["(None, 1, 1, 512)", "(None, 2, 2, 512)"]),
])
def test_alexnet_and_vgg19_for_32x32(name, params, flops, shapes, rng):
    from minireuse.models import MODELS
    model = MODELS[name](seed=0)
    text = model.summary((32, 32, 3))
    assert model.num_parameters() == params and f"{params:,}" in text
    assert text.splitlines()[-1] == f"forward: {flops} MFLOPs per image"
    for s in shapes:
        assert s in text
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    y = model.forward(x, train=True)
    assert y.shape == (2, 10) and np.isfinite(y).all()
    model.backward(np.ones_like(y) / 2)
    for key, layer, pname in model.named_parameters():
        g = layer.grads[pname]
        assert g.shape == layer.params[pname].shape and np.isfinite(g).all(), key
    convs = [l for l in model.layers if type(l).__name__ == "Conv2D"]
    assert len(convs) == (5 if name == "alexnet" else 16)
