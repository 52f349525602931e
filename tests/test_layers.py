"""Layers against explicit Python loops, and their gradients against central differences."""
import numpy as np
import pytest

from minireuse import backend
from minireuse.layers import (Conv2D, Dense, Dropout, Flatten, LocalResponseNorm, MaxPool2D, ReLU,
                              col2im, im2col)
from minireuse.layers.conv import conv_padding
from minireuse.losses import SoftmaxCrossEntropy

from gradcheck import check_layer_backward, numerical_directional


def loop_conv(x, w, b, stride, pads):
    """Direct convolution by Python loops (the oracle)."""
    bsz, h, wd, c = x.shape
    kh, kw, _, m = w.shape
    xpad = np.pad(x, ((0, 0), (pads[0], pads[1]), (pads[2], pads[3]), (0, 0)))
    oh = (h + pads[0] + pads[1] - kh) // stride + 1
    ow = (wd + pads[2] + pads[3] - kw) // stride + 1
    y = np.zeros((bsz, oh, ow, m))
    for n in range(bsz):
        for i in range(oh):
            for j in range(ow):
                patch = xpad[n, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
                y[n, i, j] = np.tensordot(patch, w, axes=3) + b
    return y


@pytest.mark.parametrize("stride,padding,size,k", [(1, "same", 7, 3), (2, "same", 8, 3), (1, "valid", 6, 5),
                                                    (2, 1, 7, 3), (3, "same", 10, 5), (1, "same", 6, 4)])
def test_conv_matches_loops(device, rng, stride, padding, size, k):
    conv = Conv2D(3, 4, (k, k - 1 if k > 3 else k), stride=stride, padding=padding, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, size, size + 1, 3))
    W, b = backend.asnumpy(conv.params["W"]), backend.asnumpy(conv.params["b"]) + rng.standard_normal(4)
    conv.params["b"] = device.asarray(b)
    t, bo, oh = conv_padding(padding, size, conv.kh, stride)
    l, r, ow = conv_padding(padding, size + 1, conv.kw, stride)
    y = conv.forward(device.asarray(x))
    assert y.shape == (2, oh, ow, 4)
    np.testing.assert_allclose(backend.asnumpy(y), loop_conv(x, W, b, stride, (t, bo, l, r)), rtol=1e-10, atol=1e-10)


def test_same_padding_follows_tensorflow():
    # TF: out = ceil(in / stride); the odd pixel of padding goes after
    assert conv_padding("same", 32, 5, 1) == (2, 2, 32)
    assert conv_padding("same", 8, 3, 2) == (0, 1, 4)
    assert conv_padding("same", 7, 4, 1) == (1, 2, 7)


def test_im2col_col2im_against_loops(device, rng):
    x = rng.standard_normal((2, 5, 6, 3))
    pads = (1, 2, 0, 1)
    cols, (oh, ow) = im2col(device.asarray(x), 3, 2, 2, pads)
    cols = backend.asnumpy(cols)
    xpad = np.pad(x, ((0, 0), (1, 2), (0, 1), (0, 0)))
    row = 0
    for n in range(2):
        for i in range(oh):
            for j in range(ow):
                np.testing.assert_array_equal(cols[row], xpad[n, 2 * i:2 * i + 3, 2 * j:2 * j + 2, :].ravel())
                row += 1
    # col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)>
    c = rng.standard_normal(cols.shape)
    back = backend.asnumpy(col2im(device.asarray(c), x.shape, 3, 2, 2, pads))
    np.testing.assert_allclose((cols * c).sum(), (x * back).sum(), rtol=1e-12)


def test_conv_geometry_gives_the_sizes_im2col_makes(rng):
    from minireuse.geometry import ConvGeometry
    x = rng.standard_normal((2, 7, 6, 3))
    for kh, kw, stride, pads in ((3, 2, 2, (1, 2, 0, 1)), (5, 5, 1, (2, 2, 2, 2)), (2, 3, 3, (0, 1, 2, 0))):
        geo = ConvGeometry.of(x.shape, kh, kw, stride, pads, M=4)
        cols, (oh, ow) = im2col(x, kh, kw, stride, pads)
        assert (geo.oh, geo.ow) == (oh, ow) and cols.shape == (geo.outputs, geo.K)
        assert (geo.hp, geo.wp) == (7 + pads[0] + pads[1], 6 + pads[2] + pads[3])
        assert (geo.top, geo.left, geo.pads, geo.M) == (pads[0], pads[2], pads, 4)


@pytest.mark.parametrize("stride,padding", [(1, "same"), (2, "same"), (1, "valid"), (2, 1)])
def test_conv_gradients(device, rng, stride, padding):
    conv = Conv2D(3, 4, 3, stride=stride, padding=padding, dtype=np.float64, rng=rng)
    check_layer_backward(conv, device.asarray(rng.standard_normal((2, 6, 5, 3))), rng)


def test_dense_gradients(device, rng):
    check_layer_backward(Dense(7, 5, dtype=np.float64, rng=rng), device.asarray(rng.standard_normal((4, 7))), rng)


def test_relu_and_flatten_gradients(device, rng):
    x = rng.standard_normal((3, 4, 5, 2))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_layer_backward(ReLU(), device.asarray(x), rng)
    check_layer_backward(Flatten(), device.asarray(x), rng)


def loop_maxpool(x, k, s):
    n, h, w, c = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = np.empty((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            y[:, i, j] = x[:, i * s:i * s + k, j * s:j * s + k].max(axis=(1, 2))
    return y


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 1)])
def test_maxpool_matches_loops_and_gradient(device, rng, k, s):
    x = rng.permutation(2 * 7 * 6 * 3).reshape(2, 7, 6, 3) / 10.0  # distinct values: no ties
    pool = MaxPool2D(k, s)
    y = pool.forward(device.asarray(x))
    np.testing.assert_array_equal(backend.asnumpy(y), loop_maxpool(x, k, s))
    check_layer_backward(pool, device.asarray(x), rng)


def test_maxpool_same_padding_shape(device, rng):
    pool = MaxPool2D(3, 2, padding="same")
    y = pool.forward(device.asarray(rng.standard_normal((1, 7, 7, 2))))
    assert y.shape == pool.output_shape((1, 7, 7, 2)) == (1, 4, 4, 2)


def loop_lrn(x, r, bias, alpha, beta):
    y = np.empty_like(x)
    c = x.shape[-1]
    for d in range(c):
        s = (x[..., max(0, d - r):min(c, d + r + 1)] ** 2).sum(axis=-1)
        y[..., d] = x[..., d] / (bias + alpha * s) ** beta
    return y


def test_lrn_matches_loops_and_gradient(device, rng):
    x = rng.standard_normal((2, 3, 4, 11)) * 2
    for r, bias, alpha, beta in [(4, 1.0, 0.001 / 9, 0.75), (2, 2.0, 0.3, 0.5), (0, 1.0, 1.0, 1.0)]:
        lrn = LocalResponseNorm(r, bias, alpha, beta)
        np.testing.assert_allclose(backend.asnumpy(lrn.forward(device.asarray(x))),
                                   loop_lrn(x, r, bias, alpha, beta), rtol=1e-12)
        check_layer_backward(lrn, device.asarray(x), rng)


def test_dropout(device, rng):
    d = Dropout(0.3)
    x = device.asarray(rng.standard_normal((200, 50)))
    d.reseed(7)
    y = backend.asnumpy(d.forward(x, train=True))
    kept = y != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], backend.asnumpy(x)[kept] / 0.7)
    assert d.forward(x, train=False) is x
    check_layer_backward(d, x, rng, before=lambda: d.reseed(7))


def test_softmax_cross_entropy_value_and_gradient(device, rng):
    logits = device.asarray(rng.standard_normal((5, 4)) * 3)
    labels = device.asarray(np.array([0, 3, 1, 1, 2]))
    loss = SoftmaxCrossEntropy()
    z = backend.asnumpy(logits)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = -np.log(p[np.arange(5), [0, 3, 1, 1, 2]]).mean()
    assert abs(float(loss(logits, labels)) - expected) < 1e-12
    loss(logits, labels)
    g = loss.backward()
    for _ in range(3):
        v = device.asarray(rng.standard_normal(logits.shape))
        num = numerical_directional(lambda: loss.forward(logits, labels), logits, v)
        assert abs(num - float((g * v).sum())) < 1e-7


def test_loss_rejects_bad_shapes(device):
    loss = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="labels must be"):
        loss(device.zeros((4, 3)), device.zeros((5,), dtype=np.int64))


def test_layer_input_errors(device, rng):
    conv = Conv2D(3, 4, 3, rng=rng)
    with pytest.raises(ValueError, match="expected 3 input channels"):
        conv.forward(device.zeros((1, 5, 5, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="4-d input"):
        conv.forward(device.zeros((5, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="padding"):
        Conv2D(3, 4, 3, padding="full")
    with pytest.raises(ValueError, match=r"input \(batch, 6\)"):
        Dense(6, 2).forward(device.zeros((2, 5), dtype=np.float32))


def test_maxpool_ties_send_the_gradient_to_the_first_maximum(device):
    x = np.zeros((1, 4, 4, 2))
    x[0, 1, 1, 0] = x[0, 0, 1, 0] = 1.0       # two maxima in the first window of channel 0
    pool = MaxPool2D(2, 2)
    pool.forward(device.asarray(x))
    dx = backend.asnumpy(pool.backward(device.ones((1, 2, 2, 2))))
    expected = np.zeros_like(x)
    expected[0, 0, 1, 0] = 1.0                 # (0, 1) comes before (1, 1)
    expected[0, 0, 0, 1] = 1.0                 # all-zero window: the first position
    expected[0, 0, 2, :] = expected[0, 2, 0, :] = expected[0, 2, 2, :] = 1.0
    np.testing.assert_array_equal(dx, expected)


def test_batchnorm_forward_backward_and_running_statistics(device, rng):
    from minireuse.layers import BatchNorm
    bn = BatchNorm(5, momentum=0.8, dtype=np.float64)
    bn.params["gamma"] = device.asarray(rng.uniform(0.5, 1.5, 5))
    bn.params["beta"] = device.asarray(rng.standard_normal(5))
    x = rng.standard_normal((3, 4, 2, 5)) * rng.uniform(0.5, 3, 5) + rng.uniform(-1, 1, 5)
    y = backend.asnumpy(bn.forward(device.asarray(x), train=True))
    mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    want = (x - mu) / np.sqrt(var + 1e-5) * backend.asnumpy(bn.params["gamma"]) + backend.asnumpy(bn.params["beta"])
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(backend.asnumpy(bn.buffers["running_mean"]), 0.2 * mu, rtol=1e-10)
    np.testing.assert_allclose(backend.asnumpy(bn.buffers["running_var"]), 0.8 + 0.2 * var * 24 / 23, rtol=1e-10)
    ev = backend.asnumpy(bn.forward(device.asarray(x), train=False))           # the running statistics
    rm, rv = backend.asnumpy(bn.buffers["running_mean"]), backend.asnumpy(bn.buffers["running_var"])
    np.testing.assert_allclose(ev, (x - rm) / np.sqrt(rv + 1e-5) * backend.asnumpy(bn.params["gamma"])
                               + backend.asnumpy(bn.params["beta"]), rtol=1e-10)
    saved = {k: backend.asnumpy(v).copy() for k, v in bn.buffers.items()}
    check_layer_backward(bn, device.asarray(x), rng,
                         before=lambda: bn.buffers.update({k: device.asarray(v.copy()) for k, v in saved.items()}))
    with pytest.raises(ValueError, match="expected an input with 5 channels"):
        bn.forward(device.asarray(np.ones((2, 3))))


def test_batchnorm_updates_its_running_statistics_in_place(device, rng):
    """A step recorded as a CUDA graph keeps the arrays it saw while recording: a rebound buffer
    would leave every replay updating a freed array and evaluation reading stale statistics."""
    from minireuse.layers import BatchNorm
    bn = BatchNorm(3)
    recorded = dict(bn.buffers)
    bn.forward(device.asarray(rng.standard_normal((8, 3)).astype(np.float32) + 2), train=True)
    assert all(bn.buffers[k] is recorded[k] for k in recorded)
    assert float(backend.asnumpy(recorded["running_mean"]).min()) > 0.1


def test_batchnorm_buffers_are_saved_not_trained(tmp_path, rng):
    from minireuse.layers import BatchNorm
    from minireuse.models import Sequential
    model = Sequential([Dense(4, 3, rng=rng, name="fc"), BatchNorm(3, name="bn")])
    model.forward(rng.standard_normal((8, 4)).astype(np.float32))
    state = model.state_dict()
    assert "bn.running_mean" in state and "bn.running_var" in state
    assert [k for k, _, _ in model.named_parameters()] == ["fc.W", "fc.b", "bn.gamma", "bn.beta"]
    model.save(str(tmp_path / "m.npz"))
    other = Sequential([Dense(4, 3, rng=rng, name="fc"), BatchNorm(3, name="bn")])
    other.load(str(tmp_path / "m.npz"))
    np.testing.assert_array_equal(other.layer("bn").buffers["running_mean"], state["bn.running_mean"])
