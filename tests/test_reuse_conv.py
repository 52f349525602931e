"""Deep-reuse convolution: general and pixel-aligned paths, against the exact layer and each other."""
import numpy as np
import pytest

from gradcheck import numerical_directional
from minireuse import backend
from minireuse.layers import Conv2D, Dense, col2im, im2col
from minireuse.layers.conv import pad_nhwc
from minireuse.reuse import (ReuseConfig, ReuseState, assign_clusters, conv2d_backward, conv2d_forward,
                             general_conv_backward, general_conv_forward_assigned, pixel_conv_backward,
                             pixel_conv_forward_assigned, use_pixel_aligned)
from minireuse.reuse import lsh
from minireuse.reuse.matmul import hash_groups


@pytest.fixture
def xp(device):
    """The array module of the device under test (conftest parametrizes cpu/gpu)."""
    return device


def conv_operands(xp, b=2, h=7, w=6, c_in=8, c_out=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c_in)) + np.linspace(-0.5, 1.0, c_in)
    W = rng.standard_normal((k, k, c_in, c_out)) * 0.3
    bias = rng.standard_normal(c_out)
    return xp.asarray(x), xp.asarray(W), xp.asarray(bias)


def exact_layer(x, W, b, stride, padding):
    layer = Conv2D(W.shape[2], W.shape[3], W.shape[:2], stride=stride, padding=padding, dtype=x.dtype)
    layer.params["W"], layer.params["b"] = W, b
    return layer


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(backend.asnumpy(a), backend.asnumpy(b), rtol=tol, atol=tol)


def pixel_assignment(xp, x, pads, L, H):
    pixels = pad_nhwc(x, pads).reshape(-1, x.shape[3] // L, L)
    codes = hash_groups(pixels, ReuseConfig(L=L, H=H), ReuseState(), x)
    return assign_clusters(codes, H)


def general_assignment(xp, x, kh, kw, stride, pads, L, H):
    cols, _ = im2col(x, kh, kw, stride, pads)
    codes = hash_groups(lsh.split_groups(cols, L), ReuseConfig(L=L, H=H), ReuseState(), x)
    return assign_clusters(codes, H)


GEOMETRIES = [(1, "same"), (2, "same"), (1, "valid"), (2, 1)]


@pytest.mark.parametrize("stride, padding", GEOMETRIES)
@pytest.mark.parametrize("path", ["general", "pixel"])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_identity_assignment_is_the_exact_conv(xp, path, dx_mode, stride, padding):
    x, W, b = conv_operands(xp)
    layer = exact_layer(x, W, b, stride, padding)
    pads, _ = layer.pads(x.shape[1], x.shape[2])
    y_exact = layer.forward(x)
    dy = xp.asarray(np.random.default_rng(1).standard_normal(y_exact.shape))
    dx_exact = layer.backward(dy)
    L = 4
    if path == "pixel":
        n_pix = x.shape[0] * (x.shape[1] + pads[0] + pads[1]) * (x.shape[2] + pads[2] + pads[3])
        ids = xp.repeat(xp.arange(n_pix, dtype=xp.int32)[:, None], 2, axis=1)
        y, cache = pixel_conv_forward_assigned(x, W, b, stride, pads, ids, xp.full(2, n_pix, xp.int32), L,
                                               dx_mode)
        dx, dW, db = pixel_conv_backward(dy, cache)
    else:
        n = y_exact.size // W.shape[3]
        g = -(-W[..., 0].size // L)
        ids = xp.repeat(xp.arange(n, dtype=xp.int32)[:, None], g, axis=1)
        y, cache = general_conv_forward_assigned(x, W, b, stride, pads, ids, xp.full(g, n, xp.int32), L,
                                                 dx_mode)
        dx, dW, db = general_conv_backward(dy, cache)
    close(y, y_exact)
    close(dx, dx_exact)
    close(dW, layer.grads["W"])
    close(db, layer.grads["b"])


@pytest.mark.parametrize("stride, pads", [(1, (1, 1, 1, 1)), (2, (0, 1, 1, 0))])
@pytest.mark.parametrize("path", ["general", "pixel"])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_gradients_with_the_assignment_fixed(xp, path, dx_mode, stride, pads):
    x, W, b = conv_operands(xp, c_in=6, k=3)
    L, H = 3, 3
    if path == "pixel":
        ids, n = pixel_assignment(xp, x, pads, L, H)

        def forward():
            return pixel_conv_forward_assigned(x, W, b, stride, pads, ids, n, L, dx_mode)
        backward = pixel_conv_backward
    else:
        ids, n = general_assignment(xp, x, 3, 3, stride, pads, L, H)

        def forward():
            return general_conv_forward_assigned(x, W, b, stride, pads, ids, n, L, dx_mode)
        backward = general_conv_backward
    assert int(n.max()) < ids.shape[0] // 2            # real clusters with several members
    y, cache = forward()
    rng = np.random.default_rng(3)
    dy = xp.asarray(rng.standard_normal(y.shape))

    def loss():
        return (forward()[0] * dy).sum()

    dx, dW, db = backward(dy, cache)
    targets = [(W, dW), (b, db)] + ([(x, dx)] if dx_mode == "cluster" else [])
    for arr, grad in targets:
        v = xp.asarray(rng.standard_normal(arr.shape))
        num = numerical_directional(loss, arr, v)
        assert abs(num - float((grad * v).sum())) <= 1e-7 * max(1.0, abs(num))
    if dx_mode == "exact":
        cols_dx = dy.reshape(-1, W.shape[3]) @ W.reshape(-1, W.shape[3]).T
        close(dx, col2im(cols_dx, x.shape, 3, 3, stride, pads))


def test_pixel_codes_equal_general_codes_for_every_row_and_group(xp):
    x, W, b = conv_operands(xp, c_in=8, k=3)
    pads, stride, L, H = (1, 1, 1, 1), 1, 4, 16
    pixels = pad_nhwc(x, pads).reshape(-1, 2, L)
    pixel_codes = hash_groups(pixels, ReuseConfig(L=L, H=H), ReuseState(), x)
    cols, _ = im2col(x, 3, 3, stride, pads)
    general_codes = hash_groups(lsh.split_groups(cols, L), ReuseConfig(L=L, H=H), ReuseState(), x)
    # the pixel each (row, group) reads: an im2col of the pixel indices
    hp, wp = x.shape[1] + 2, x.shape[2] + 2
    index = xp.arange(x.shape[0] * hp * wp).reshape(x.shape[0], hp, wp, 1)
    pixel_of, _ = im2col(index, 3, 3, stride, (0, 0, 0, 0))                 # (N, 9)
    expected = pixel_codes[pixel_of[:, :, None], xp.arange(2)[None, None, :]].reshape(-1, 18)
    np.testing.assert_array_equal(backend.asnumpy(general_codes), backend.asnumpy(expected))


def partition_pairs(a, b):
    """Number of distinct labels in a, in b, and of (a, b) pairs: all equal iff same partition."""
    a, b = backend.asnumpy(a).ravel(), backend.asnumpy(b).ravel()
    return len(np.unique(a)), len(np.unique(b)), np.unique(np.stack([a, b]), axis=1).shape[1]


def test_kxk_partitions_agree_across_offsets(xp):
    x, W, b = conv_operands(xp, c_in=8, k=3)
    pads, L, H = (1, 1, 1, 1), 4, 6
    pixel_ids, _ = pixel_assignment(xp, x, pads, L, H)
    general_ids, _ = general_assignment(xp, x, 3, 3, 1, pads, L, H)
    hp, wp = x.shape[1] + 2, x.shape[2] + 2
    ids_by_offset, _ = im2col(pixel_ids.reshape(x.shape[0], hp, wp, 2), 3, 3, 1, (0, 0, 0, 0))
    # group g = (offset, channel group): the general clusters of g are the pixel clusters
    # of the pixels that offset reads, so a pixel keeps its cluster whichever offset reads it
    for g in range(general_ids.shape[1]):
        n_general, n_pixel, n_pairs = partition_pairs(general_ids[:, g], ids_by_offset[:, g])
        assert n_general == n_pixel == n_pairs > 1


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_1x1_pixel_aligned_equals_general(xp, dx_mode):
    x, W, b = conv_operands(xp, c_in=8, c_out=5, k=1)
    dy = xp.asarray(np.random.default_rng(5).standard_normal((2, 7, 6, 5)))
    results = []
    for pixel_aligned in (True, False):
        config = ReuseConfig(L=4, H=5, pixel_aligned=pixel_aligned, dx_mode=dx_mode)
        y, cache = conv2d_forward(x, W, b, 1, (0, 0, 0, 0), config, ReuseState())
        assert cache[0] == ("pixel" if pixel_aligned else "general")
        results.append((y,) + conv2d_backward(dy, cache))
    for a, b_ in zip(*results):
        close(a, b_)


def test_pixel_aligned_auto_needs_L_to_divide_c_in_and_shared_planes():
    assert use_pixel_aligned(ReuseConfig(L=16), 64)
    assert not use_pixel_aligned(ReuseConfig(L=5), 64)
    assert not use_pixel_aligned(ReuseConfig(L=16, shared_planes=False), 64)
    assert use_pixel_aligned(ReuseConfig(L=16, shared_planes=False, pixel_aligned=True), 64)
    with pytest.raises(ValueError, match="pixel_aligned"):
        use_pixel_aligned(ReuseConfig(L=5, pixel_aligned=True), 64)


@pytest.mark.parametrize("reuse", [dict(L=4, H=6), dict(L=5, H=6, dx_mode="cluster"),
                                   dict(L=4, H=6, pixel_aligned=False, family="origin"),
                                   dict(L=4, H=10, family="centred"), dict(L=5, H=40, family="centred"),
                                   dict(L=4, H=10, family="pca"), dict(L=5, H=20, family="pca")])
def test_conv_layer_end_to_end_and_back_to_exact(device, reuse):
    xp = device
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((3, 8, 8, 8)).astype(np.float32))
    layer = Conv2D(8, 6, 3, stride=1, padding="same", rng=np.random.default_rng(1))
    y_exact = layer.forward(x)
    dx_exact = layer.backward(xp.ones_like(y_exact))
    layer.set_reuse(dict(reuse, measure_error=True))
    y = layer.forward(x)
    dx = layer.backward(xp.ones_like(y))
    assert y.shape == y_exact.shape and y.dtype == np.float32 and dx.shape == x.shape
    assert set(layer.grads) == {"W", "b"} and layer.grads["W"].shape == layer.params["W"].shape
    stats = layer.reuse_state.pop_stats()
    assert 0 < stats["r_c"] < 1 and 0 < stats["rel_error"] < 1
    assert stats["pixel_aligned"] == (1.0 if reuse["L"] == 4 and "pixel_aligned" not in reuse else 0.0)
    layer.set_reuse(None)
    assert bool((layer.forward(x) == y_exact).all())
    assert bool((layer.backward(xp.ones_like(y_exact)) == dx_exact).all())


def test_dense_layer_end_to_end_and_back_to_exact(device):
    xp = device
    x = xp.asarray(np.random.default_rng(0).standard_normal((16, 30)).astype(np.float32))
    layer = Dense(30, 4, reuse=dict(L=8, H=4, dx_mode="cluster"), rng=np.random.default_rng(1))
    y = layer.forward(x)
    dx = layer.backward(xp.ones_like(y))
    assert y.shape == (16, 4) and dx.shape == x.shape and layer.grads["W"].shape == (30, 4)
    assert layer.reuse_state.pop_stats()["calls"] == 1
    layer.set_reuse(None)
    y_exact = layer.forward(x)
    assert bool((y_exact == x @ layer.params["W"] + layer.params["b"]).all())


def assigned_forward(xp, path, x, W, b, stride, pads, L, H, dx_mode, forward):
    """(forward() -> (y, cache), backward) of one path under a real LSH assignment of (L, H)."""
    if path == "pixel":
        ids, n = pixel_assignment(xp, x, pads, L, H)
        return (lambda: pixel_conv_forward_assigned(x, W, b, stride, pads, ids, n, L, dx_mode,
                                                    forward=forward)), pixel_conv_backward
    ids, n = general_assignment(xp, x, W.shape[0], W.shape[1], stride, pads, L, H)
    return (lambda: general_conv_forward_assigned(x, W, b, stride, pads, ids, n, L, dx_mode, forward)), \
        general_conv_backward


@pytest.mark.parametrize("stride, padding", [(1, "same"), (2, 1)])
@pytest.mark.parametrize("path", ["general", "pixel"])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_exact_forward_is_the_exact_conv_with_the_reuse_backward(xp, path, dx_mode, stride, padding):
    x, W, b = conv_operands(xp, c_in=6)
    layer = exact_layer(x, W, b, stride, padding)
    pads, _ = layer.pads(x.shape[1], x.shape[2])
    exact_forward, backward = assigned_forward(xp, path, x, W, b, stride, pads, 3, 3, dx_mode, "exact")
    reuse_forward, _ = assigned_forward(xp, path, x, W, b, stride, pads, 3, 3, dx_mode, "reuse")
    y, cache = exact_forward()
    y_reuse, reuse_cache = reuse_forward()
    close(y, layer.forward(x))
    assert float(xp.abs(y_reuse - y).max()) > 0.1
    dy = xp.asarray(np.random.default_rng(7).standard_normal(y.shape))
    for got, expected in zip(backward(dy, cache), backward(dy, reuse_cache)):
        close(got, expected)


@pytest.mark.parametrize("pixel_aligned", [True, False])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_exact_forward_through_the_config(xp, pixel_aligned, dx_mode):
    x, W, b = conv_operands(xp, c_in=6)
    pads, stride, L, H = (1, 1, 1, 1), 1, 3, 3
    config = ReuseConfig(L=L, H=H, dx_mode=dx_mode, forward="exact", pixel_aligned=pixel_aligned,
                         measure_error=True)
    state = ReuseState()
    y, cache = conv2d_forward(x, W, b, stride, pads, config, state)
    assert cache[0] == ("pixel" if pixel_aligned else "general")
    path = cache[0]
    reuse_forward, backward = assigned_forward(xp, path, x, W, b, stride, pads, L, H, dx_mode, "reuse")
    y_reuse, reuse_cache = reuse_forward()
    close(y, exact_layer(x, W, b, stride, 1).forward(x))
    assert float(state.last["rel_error"]) == 0.0 and 0 < float(state.last["r_c"]) < 0.5
    dy = xp.asarray(np.random.default_rng(8).standard_normal(y.shape))
    for got, expected in zip(conv2d_backward(dy, cache), backward(dy, reuse_cache)):
        close(got, expected)
    assert 0 < float(state.last["dw_cos"]) < 1


@pytest.mark.parametrize("pixel_aligned", [True, False])
def test_exact_forward_with_exact_dx_gives_the_true_input_and_bias_gradients(xp, pixel_aligned):
    x, W, b = conv_operands(xp, c_in=6)                       # float64
    pads, stride = (1, 0, 0, 1), 2
    config = ReuseConfig(L=3, H=3, forward="exact", pixel_aligned=pixel_aligned)
    y, cache = conv2d_forward(x, W, b, stride, pads, config, ReuseState())
    rng = np.random.default_rng(9)
    dy = xp.asarray(rng.standard_normal(y.shape))

    def loss():
        return (conv2d_forward(x, W, b, stride, pads, config, ReuseState())[0] * dy).sum()

    dx, dW, db = conv2d_backward(dy, cache)
    for arr, grad in [(x, dx), (b, db)]:
        v = xp.asarray(rng.standard_normal(arr.shape))
        num = numerical_directional(loss, arr, v)
        assert abs(num - float((grad * v).sum())) <= 1e-7 * max(1.0, abs(num))
    m = W.shape[3]
    close(dx, col2im(dy.reshape(-1, m) @ W.reshape(-1, m).T, x.shape, 3, 3, stride, pads))


@pytest.mark.parametrize("pixel_aligned", [True, False])
@pytest.mark.parametrize("forward", ["reuse", "exact"])
def test_conv_dw_cos_is_one_with_singleton_clusters_and_below_one_otherwise(xp, pixel_aligned, forward):
    x, W, b = conv_operands(xp, h=5, w=5, c_in=8, c_out=3)
    pads = (0, 0, 0, 0)                              # no padding pixels: H=64 leaves singletons only
    dy = xp.asarray(np.random.default_rng(10).standard_normal((2, 3, 3, 3)))
    cos = {}
    for H in (64, 2):
        config = ReuseConfig(L=4, H=H, family="centred", forward=forward, pixel_aligned=pixel_aligned,
                             measure_error=True)
        state = ReuseState()
        _, cache = conv2d_forward(x, W, b, 1, pads, config, state)
        conv2d_backward(dy, cache)
        if H == 64:
            rows = 2 * 5 * 5 if pixel_aligned else 2 * 3 * 3
            assert (backend.asnumpy(state.last["n_clusters"]) == rows).all()
        cos[H] = state.pop_stats()["dw_cos"]
    assert cos[64] == pytest.approx(1.0, abs=1e-12)
    assert 0 < cos[2] < 0.999


def agreement(approx, exact):
    a, e = backend.asnumpy(approx).ravel(), backend.asnumpy(exact).ravel()
    return a @ e / (np.linalg.norm(a) * np.linalg.norm(e)), a @ e / (e @ e)


@pytest.mark.parametrize("pixel_aligned", [True, False])
@pytest.mark.parametrize("forward", ["reuse", "exact"])
def test_conv_records_how_its_dx_and_dw_compare_with_the_exact_ones(xp, pixel_aligned, forward):
    """dx_cos, dx_gain (dx clustered) and dw_gain are the cosine and <reuse, exact> / |exact|^2
    of the gradients the backward returned against the exact conv's; 1 with singleton clusters."""
    x, W, b = conv_operands(xp, h=5, w=5, c_in=8, c_out=3)
    pads = (0, 0, 0, 0)
    dy = xp.asarray(np.random.default_rng(11).standard_normal((2, 3, 3, 3)))
    exact_dx = col2im(dy.reshape(-1, 3) @ W.reshape(-1, 3).T, x.shape, 3, 3, 1, pads)
    exact_dw = (im2col(x, 3, 3, 1, pads)[0].T @ dy.reshape(-1, 3)).reshape(W.shape)
    for H in (64, 2):
        config = ReuseConfig(L=4, H=H, family="centred", forward=forward, pixel_aligned=pixel_aligned,
                             dx_mode="cluster", measure_error=True)
        state = ReuseState()
        _, cache = conv2d_forward(x, W, b, 1, pads, config, state)
        dx, dW, _ = conv2d_backward(dy, cache)
        rec = state.pop_stats()
        if H == 64:
            assert [rec[k] for k in ("dx_cos", "dx_gain", "dw_cos", "dw_gain")] == pytest.approx([1.0] * 4, abs=1e-12)
            continue
        assert (rec["dx_cos"], rec["dx_gain"]) == pytest.approx(agreement(dx, exact_dx), rel=1e-12)
        assert (rec["dw_cos"], rec["dw_gain"]) == pytest.approx(agreement(dW, exact_dw), rel=1e-12)
        assert rec["dx_cos"] < 0.999 and rec["dx_gain"] != pytest.approx(1.0, abs=1e-3)
    config = ReuseConfig(L=4, H=2, family="centred", forward=forward, pixel_aligned=pixel_aligned,
                         dx_mode="exact", measure_error=True)
    state = ReuseState()
    conv2d_backward(dy, conv2d_forward(x, W, b, 1, pads, config, state)[1])
    rec = state.pop_stats()
    assert rec["dx_cos"] is None and rec["dx_gain"] is None and rec["dw_gain"] is not None


def test_pixel_path_centres_on_the_real_pixels_not_the_padding(xp):
    x, W, b = conv_operands(xp, c_in=8)
    x = x + 2.0                                              # far from the zero padding
    pads, L, H = (1, 1, 2, 0), 4, 10
    config = ReuseConfig(L=L, H=H, family="centred", pixel_aligned=True)
    y, _ = conv2d_forward(x, W, b, 1, pads, config, ReuseState())
    planes, unit = ReuseState().hash_params(L, H, 2, "centred", 0, True, xp, x.dtype)
    pixels = pad_nhwc(x, pads).reshape(-1, 2, L)

    def thresholds(vectors):
        proj = backend.asnumpy(vectors).reshape(-1, L) @ backend.asnumpy(planes[0])   # every (pixel, group)
        return proj.mean(axis=0) + backend.asnumpy(unit[0]) * proj.std(axis=0)

    real = thresholds(x.reshape(-1, 2, L))
    assert np.abs(real - thresholds(pixels)).max() > 0.1      # the padding would move them
    codes = lsh.hash_codes(pixels, planes, xp.asarray(real[None]))
    ids, n = assign_clusters(codes, H)
    close(y, pixel_conv_forward_assigned(x, W, b, 1, pads, ids, n, L)[0])
