"""The CPU fast path (minireuse.cpu) against the layers' array code, on asymmetric random data.

Every case runs the same layer twice, once with the fast path switched off (the
array code: the oracle) and once with it on, and at one and two threads.
"""
import warnings

import numpy as np
import pytest

from minireuse import cpu
from minireuse.conv_geometry import col2im, im2col, pad_nhwc
from minireuse.cpu import conv as cpu_conv
from minireuse.cpu import ops as cpu_ops
from minireuse.cpu import sparse as cpu_sparse
from minireuse.layers import Conv2D, LocalResponseNorm, MaxPool2D, ReLU
from minireuse.losses import SoftmaxCrossEntropy
from minireuse.models.sequential import Sequential
from minireuse.layers import Dense, Flatten
from minireuse.optim import SGD

from gradcheck import check_layer_backward, numerical_directional


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = cpu.threads()
    cpu.set_threads(request.param)
    yield request.param
    cpu.set_threads(before)


def both_paths(fn):
    """(fn() on the array code, fn() on the fast path)."""
    with cpu.fast_path(False):
        ref = fn()
    with cpu.fast_path(True):
        fast = fn()
    return ref, fast


GEOMETRIES = [  # (batch, h, w, c, kh, kw, stride, pads)
    (5, 7, 6, 3, 3, 2, 1, (1, 1, 0, 1)),
    (9, 8, 8, 4, 5, 5, 1, (2, 2, 2, 2)),
    (3, 9, 7, 2, 3, 3, 2, (1, 2, 0, 1)),
    (1, 6, 5, 3, 4, 3, 1, (0, 0, 0, 0)),
    (6, 10, 10, 2, 5, 5, 3, (2, 3, 1, 0)),
]


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pad_im2col_col2im_are_the_array_code_bit_for_bit(threads, rng, geo, dtype):
    b, h, w, c, kh, kw, stride, pads = geo
    x = rng.standard_normal((b, h, w, c)).astype(dtype)
    (ref_pad, ref_cols), (fast_pad, fast_cols) = both_paths(
        lambda: (pad_nhwc(x, pads), im2col(x, kh, kw, stride, pads)))
    np.testing.assert_array_equal(fast_pad, ref_pad)
    assert fast_cols[1] == ref_cols[1]
    np.testing.assert_array_equal(fast_cols[0], ref_cols[0])
    dcols = rng.standard_normal(ref_cols[0].shape).astype(dtype)
    ref_dx, fast_dx = both_paths(lambda: col2im(dcols, x.shape, kh, kw, stride, pads))
    np.testing.assert_array_equal(fast_dx, ref_dx)


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_conv_input_grad_equals_col2im_of_the_product(threads, rng, geo):
    b, h, w, c, kh, kw, stride, pads = geo
    m = 3
    W = rng.standard_normal((kh, kw, c, m))
    with cpu.fast_path(False):
        _, (oh, ow) = im2col(np.zeros((b, h, w, c)), kh, kw, stride, pads)
        dy = rng.standard_normal((b, oh, ow, m))
        expected = col2im(dy.reshape(-1, m) @ W.reshape(-1, m).T, (b, h, w, c), kh, kw, stride, pads)
    flipped = cpu_conv.flipped_pads((b, h, w, c), kh, kw, stride, pads)
    assert (flipped is None) == (stride != 1)
    np.testing.assert_allclose(cpu_conv.input_grad(dy, W, (b, h, w, c), stride, pads), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geo", GEOMETRIES[:3])
def test_widened_columns_hold_the_columns_then_ones_then_zeros(threads, rng, geo, empty_pool):
    b, h, w, c, kh, kw, stride, pads = geo
    k = kh * kw * c
    width = cpu_conv.column_width(k, True)
    assert width % cpu_conv.WIDTH_MULTIPLE == 0 and width > k
    empty_pool.append(np.full(b * h * w * kh * kw * (c + 9), np.nan))   # dirty pooled memory
    x = rng.standard_normal((b, h, w, c))
    with cpu.fast_path(False):
        ref, _ = im2col(x, kh, kw, stride, pads)
    cols, _ = cpu_conv.im2col(x, kh, kw, stride, pads, width)
    assert cols.shape == (ref.shape[0], width)
    np.testing.assert_array_equal(cols[:, :k], ref)
    np.testing.assert_array_equal(cols[:, k], 1)
    np.testing.assert_array_equal(cols[:, k + 1:], 0)
    dy2 = rng.standard_normal((ref.shape[0], 4))
    dW, db = cpu_conv.weight_grads(cols, dy2, k)
    assert dW.shape == (k, 4) and db.shape == (4,)
    np.testing.assert_allclose(dW, ref.T @ dy2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dy2.sum(axis=0), rtol=1e-12, atol=1e-12)


def test_column_widths():
    assert cpu_conv.column_width(75, True) == 80 and cpu_conv.column_width(79, True) == 80
    assert cpu_conv.column_width(80, True) == 80 and cpu_conv.column_width(1600, False) == 1600
    assert cpu_conv.column_width(64 + 15, False) == 80 and cpu_conv.column_width(95, True) == 96


def test_a_pad_of_the_kernel_size_or_more_takes_col2im():
    assert cpu_conv.flipped_pads((1, 6, 6, 1), 3, 3, 1, (3, 0, 0, 0)) is None
    assert cpu_conv.flipped_pads((1, 6, 6, 1), 3, 3, 1, (2, 2, 2, 2)) == (0, 0, 0, 0)


def conv_step(layer, x, dy):
    y = layer.forward(x, True)
    dx = layer.backward(dy)
    return y, dx, {k: v.copy() for k, v in layer.grads.items()}


@pytest.mark.parametrize("stride,padding", [(1, "same"), (2, "same"), (1, "valid"), (1, 1)])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("c_in,bias", [(3, True), (3, False), (16, True)],
                         ids=["K 45 widened with bias", "K 45 widened", "K 240 as it is"])
def test_conv2d_layer_matches_the_array_code(threads, rng, stride, padding, first, c_in, bias):
    layer = Conv2D(c_in, 5, (5, 3), stride=stride, padding=padding, bias=bias, dtype=np.float32, rng=rng)
    layer.params.get("b", np.zeros(1))[...] = rng.standard_normal(5 if bias else 1)   # not the zero init
    layer.needs_input_grad = not first
    x = rng.standard_normal((6, 9, 8, c_in)).astype(np.float32)
    dy = rng.standard_normal(layer.output_shape(x.shape)).astype(np.float32)
    ref, fast = both_paths(lambda: conv_step(layer, x, dy))

    def close(a, b):            # float32 sums of K terms: rounding grows with the largest term
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * np.abs(b).max())
    close(fast[0], ref[0])
    if first:
        assert ref[1] is None and fast[1] is None
    else:
        close(fast[1], ref[1])
    assert fast[2].keys() == ref[2].keys() == ({"W", "b"} if bias else {"W"})
    for k in ref[2]:
        close(fast[2][k], ref[2][k])


def sparse_dy(rng, shape, dtype, density=0.08):
    """A dY as a conv sees it behind ReLU, LRN and max pooling: mostly zeros, and some pixels
    with none at all."""
    dy = rng.standard_normal(shape) * (rng.random(shape) < density)
    dy[:, ::3] = 0
    return dy.astype(dtype)


@pytest.fixture
def kernels():
    pytest.importorskip("numba", reason="the kernels need numba (the fast extra; the test extra has it)")
    cpu.use_compiled(True)
    return cpu.compiled_kernels()


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_sparse_backward_kernels_equal_the_products_of_the_array_code(threads, kernels, rng, geo, dtype, tol):
    b, h, w, c, kh, kw, stride, pads = geo
    m = 5
    x = rng.standard_normal((b, h, w, c)).astype(dtype)
    W = rng.standard_normal((kh, kw, c, m)).astype(dtype)
    cols, (oh, ow) = im2col(x, kh, kw, stride, pads)
    dy = sparse_dy(rng, (b, oh, ow, m), dtype)
    dy2 = dy.reshape(-1, m)
    assert 0 < np.count_nonzero(dy) <= cpu_conv.SPARSE_DENSITY * dy.size
    want_dw = cols.T @ dy2
    want_dx = col2im(dy2 @ W.reshape(-1, m).T, x.shape, kh, kw, stride, pads)
    got_dw = kernels.sparse_weight_grads(cols, dy2, threads)
    got_dx = kernels.sparse_input_grad(dy, W, x.shape, stride, pads, threads)
    assert got_dw.shape == want_dw.shape and got_dx.shape == want_dx.shape
    np.testing.assert_allclose(got_dw, want_dw, rtol=tol, atol=tol * np.abs(want_dw).max())
    np.testing.assert_allclose(got_dx, want_dx, rtol=tol, atol=tol * np.abs(want_dx).max())


def counting(monkeypatch, kernels):
    """Counts the calls of the sparse kernels."""
    calls = []
    for name in ("sparse_weight_grads", "sparse_input_grad"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


@pytest.mark.parametrize("stride,padding", [(1, "same"), (2, "same"), (1, "valid")])
@pytest.mark.parametrize("bias", [True, False])
def test_a_mostly_zero_dy_takes_the_sparse_backward_with_the_array_codes_gradients(
        threads, kernels, rng, monkeypatch, stride, padding, bias):
    layer = Conv2D(20, 6, (5, 3), stride=stride, padding=padding, bias=bias, dtype=np.float32, rng=rng)
    assert 5 * 3 * 20 >= cpu_conv.SPARSE_MIN_K
    x = rng.standard_normal((5, 9, 8, 20)).astype(np.float32)
    dy = sparse_dy(rng, layer.output_shape(x.shape), np.float32)
    calls = counting(monkeypatch, kernels)
    ref, fast = both_paths(lambda: conv_step(layer, x, dy))
    assert calls == ["sparse_weight_grads", "sparse_input_grad"]

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * np.abs(b).max())
    close(fast[0], ref[0])
    close(fast[1], ref[1])
    assert fast[2].keys() == ref[2].keys()
    for k in ref[2]:
        close(fast[2][k], ref[2][k])


def test_a_dense_dy_a_short_k_or_an_input_with_inf_takes_the_gemms(kernels, rng, monkeypatch):
    """Above SPARSE_DENSITY, or below SPARSE_MIN_K, the GEMMs are faster; with an inf in x
    the GEMM's 0 x inf = NaN must stay what the array code gives, so no zero is skipped."""
    layer = Conv2D(32, 6, 3, dtype=np.float32, rng=rng)
    x = rng.standard_normal((3, 6, 6, 32)).astype(np.float32)
    calls = counting(monkeypatch, kernels)
    dense = rng.standard_normal(layer.output_shape(x.shape)).astype(np.float32)
    conv_step(layer, x, dense)
    short = Conv2D(3, 6, 5, dtype=np.float32, rng=rng)      # K = 75, as CifarNet's conv1
    x_short = rng.standard_normal((3, 6, 6, 3)).astype(np.float32)
    conv_step(short, x_short, sparse_dy(rng, short.output_shape(x_short.shape), np.float32))
    assert calls == []
    x[0, 2, 3, 1] = np.inf
    sparse = sparse_dy(rng, layer.output_shape(x.shape), np.float32)
    sparse[0, 2, 3] = 0                     # the outputs that read the inf get no gradient
    with np.errstate(invalid="ignore"):
        ref, fast = both_paths(lambda: conv_step(layer, x, sparse))
    assert calls == []
    assert np.isnan(ref[2]["W"]).any()
    np.testing.assert_array_equal(np.isnan(fast[2]["W"]), np.isnan(ref[2]["W"]))


def test_the_sparse_backward_passes_the_gradient_check(kernels, rng, monkeypatch):
    layer = Conv2D(32, 4, 3, stride=2, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 7, 6, 32))
    g = sparse_dy(rng, layer.output_shape(x.shape), np.float64, density=0.1)
    calls = counting(monkeypatch, kernels)
    with cpu.fast_path(True):
        layer.forward(x, True)
        dx = layer.backward(g)
        grads = {k: v.copy() for k, v in layer.grads.items()}
        loss = lambda: (layer.forward(x, False) * g).sum()
        for arr, grad in [(x, dx), (layer.params["W"], grads["W"]), (layer.params["b"], grads["b"])]:
            v = rng.standard_normal(arr.shape)
            num = numerical_directional(loss, arr, v)
            assert abs(num - float((grad * v).sum())) <= 1e-7 * max(1.0, abs(num))
    assert calls == ["sparse_weight_grads", "sparse_input_grad"]


@pytest.mark.parametrize("r,c,beta", [(4, 64, 0.75), (2, 7, 0.5), (5, 3, 0.6), (0, 4, 0.75)])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_lrn_matches_the_array_code(threads, compiled, rng, r, c, beta, dtype, tol):
    layer = LocalResponseNorm(depth_radius=r, bias=1.5, alpha=0.3, beta=beta)
    x = (2.0 * rng.standard_normal((4, 5, 3, c)) + 0.5).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    ref, fast = both_paths(lambda: (layer.forward(x, True), layer.backward(dy)))
    for a, b in zip(fast, ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_maxpool_matches_the_array_code_with_ties_and_nan(threads, compiled, rng):
    layer = MaxPool2D(2, 2)
    x = rng.integers(-2, 3, (5, 6, 8, 3)).astype(np.float32)   # many ties, within windows too
    x[0, 0, 0, 0] = x[0, 1, 1, 0] = np.nan                      # a NaN maximum: no gradient
    x[1, 2, 3, 1] = np.nan
    dy = rng.standard_normal((5, 3, 4, 3)).astype(np.float32)
    ref, fast = both_paths(lambda: (layer.forward(x, True), layer.backward(dy)))
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_array_equal(fast[1], ref[1])
    assert np.isnan(fast[0][0, 0, 0, 0]) and not fast[1][0, :2, :2, 0].any()
    assert (fast[1] != 0).sum() == (dy != 0).sum() - 2     # one position per window, but the NaN ones


@pytest.mark.parametrize("k,stride,padding,shape", [(3, 2, "valid", (2, 7, 7, 2)), (2, 2, "same", (2, 5, 6, 2)),
                                                     (2, 1, "valid", (2, 4, 4, 2))])
def test_pools_that_do_not_tile_take_the_array_code(k, stride, padding, shape):
    layer = MaxPool2D(k, stride, padding=padding)
    pads = layer._geometry(*shape[1:3])[0]
    assert not cpu_ops.tiles_input(shape, k, stride, pads)


def test_relu_matches_the_array_code(threads, rng):
    layer = ReLU()
    x = rng.standard_normal((3, 70, 70, 5)).astype(np.float32)   # large enough for two shards
    x[0, 0, 0, :2] = (0.0, -0.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    ref, fast = both_paths(lambda: (layer.forward(x, True), layer.backward(dy)))
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_array_equal(fast[1], ref[1])


def test_fast_layers_pass_the_gradient_check(rng):
    x = rng.standard_normal((2, 6, 6, 3))
    for layer in (Conv2D(3, 4, 3, dtype=np.float64, rng=rng), LocalResponseNorm(2, 1.0, 0.5, 0.75)):
        with cpu.fast_path(True):
            check_layer_backward(layer, x, rng)


def uneven_csr(rng, n_rows, n_cols, dtype):
    """A 0/1 CSR matrix whose rows hold very different numbers of ones: empty rows, and one
    row with about half of them (as a row of R^T is one cluster, and one cluster can be large)."""
    import scipy.sparse
    per_row = rng.integers(0, 4, n_rows)
    per_row[n_rows // 3] = per_row.sum() + 5
    per_row[: n_rows // 5] = 0
    cols = np.concatenate([rng.choice(n_cols, k, replace=False) for k in per_row]).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return scipy.sparse.csr_matrix((np.ones(len(cols), dtype), cols, indptr), shape=(n_rows, n_cols))


@pytest.fixture(params=["numba kernels", "numpy"])
def compiled(request):
    """The fast path with its numba kernels (kernels.py) and without them."""
    if request.param == "numba kernels":
        pytest.importorskip("numba", reason="the kernels need numba (the fast extra; the test extra has it)")
    cpu.use_compiled(request.param == "numba kernels")
    assert (cpu.compiled_kernels() is not None) == (request.param == "numba kernels")
    yield request.param
    cpu.use_compiled(True)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_product_is_scipys_bit_for_bit(rng, compiled, n_threads, dtype):
    before = cpu.threads()
    cpu.set_threads(n_threads)
    try:
        for n_rows in (2, 37, 200):
            R = uneven_csr(rng, n_rows, 700, dtype)
            B = rng.standard_normal((700, 5)).astype(dtype)
            got = cpu_sparse.product(R, B)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, R @ B)
            RT, dY = R.T.tocsr(), rng.standard_normal((n_rows, 4)).astype(dtype)   # cluster sums' shape
            np.testing.assert_array_equal(cpu_sparse.product(RT, dY), RT @ dY)
    finally:
        cpu.set_threads(before)


def test_shards_cover_the_range_once():
    cpu.set_threads(3)
    try:
        for n, per in [(1, 10 ** 6), (7, 10 ** 6), (128, 10 ** 5), (5, 1)]:
            parts = cpu.shards(n, per)
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert len(parts) <= 3
        assert len(cpu.shards(5, 1)) == 1          # too little work for a second thread
    finally:
        cpu.set_threads(None)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_threads_refuses_what_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        cpu.set_threads(bad)


def small_cifarnet(seed):
    rng = np.random.default_rng(seed)
    lrn = dict(depth_radius=2, bias=1.0, alpha=0.001 / 9.0, beta=0.75)
    return Sequential([
        Conv2D(3, 8, 5, padding="same", rng=rng, name="conv1"), ReLU(name="relu1"), MaxPool2D(2, 2, name="pool1"),
        LocalResponseNorm(**lrn, name="norm1"),
        Conv2D(8, 8, 5, padding="same", rng=rng, name="conv2"), ReLU(name="relu2"),
        LocalResponseNorm(**lrn, name="norm2"), MaxPool2D(2, 2, name="pool2"),
        Flatten(), Dense(4 * 4 * 8, 10, rng=rng, name="fc")])


def test_fifty_training_steps_have_the_array_codes_losses():
    """The fast path computes the same function: 50 SGD steps on a fixed batch sequence
    give the array code's losses within float32 rounding."""
    data = np.random.default_rng(7)
    batches = [(data.standard_normal((8, 16, 16, 3)).astype(np.float32), data.integers(0, 10, 8))
               for _ in range(5)]

    def losses():
        model = small_cifarnet(3)
        opt, loss = SGD(model, lr=0.01, momentum=0.9), SoftmaxCrossEntropy()
        out = []
        for step in range(50):
            x, y = batches[step % len(batches)]
            out.append(loss.forward(model.forward(x, True), y))
            model.backward(loss.backward())
            opt.step()
        return np.array(out)

    ref, fast = both_paths(losses)
    assert ref[-1] < ref[0] - 2.0                 # it learned the batches
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture
def empty_pool():
    before = list(cpu_conv._idle)
    cpu_conv._idle.clear()
    yield cpu_conv._idle
    cpu_conv._idle[:] = before


def test_conv_columns_reuse_memory_only_once_their_backward_is_done(rng, empty_pool):
    layer = Conv2D(3, 4, 3, dtype=np.float32, rng=rng)
    x1, x2 = (rng.standard_normal((4, 6, 6, 3)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((4, 6, 6, 4)).astype(np.float32)
    with cpu.fast_path(False):
        layer.forward(x1, True)
        layer.backward(dy)
        expected = {k: v.copy() for k, v in layer.grads.items()}
        expected_cols = im2col(x1, 3, 3, 1, (1, 1, 1, 1))[0]
    layer.forward(x1, True)
    pending = layer._cache[1][0]
    layer.forward(x2, False)              # an evaluation before the backward: a pool user too
    np.testing.assert_array_equal(pending[:, :27], expected_cols)     # K = 27, widened by the bias column
    layer.backward(dy)
    for k in expected:
        np.testing.assert_allclose(layer.grads[k], expected[k], rtol=1e-5, atol=1e-5)
    layer.forward(x2, True)               # backward done: the next step writes into that memory
    assert np.shares_memory(layer._cache[1][0], pending)


def test_the_column_pool_keeps_the_largest_idle_memory(empty_pool):
    big = np.empty(1000, np.float32)
    cpu_conv.release(big.reshape(10, 100)[:5])         # a view: its root memory goes back
    cpu_conv.release(np.empty(10, np.float32))
    cpu_conv.release(np.empty(100, np.float32))
    assert [m.size for m in empty_pool] == [100, 1000]          # the largest IDLE_KEPT
    a = cpu_conv._pooled((3, 30), np.float32)                     # the smallest that fits
    assert a.shape == (3, 30) and [m.size for m in empty_pool] == [1000]
    b = cpu_conv._pooled((4,), np.float64)                         # no float64 memory: new
    assert b.dtype == np.float64 and len(empty_pool) == 1
    assert np.shares_memory(cpu_conv._pooled((20, 50), np.float32), big) and not empty_pool


def test_the_workers_follow_the_callers_floating_point_error_handling():
    x = np.full((4, 80, 80, 8), 3e38, dtype=np.float32)    # x^2 overflows in both shards
    layer = LocalResponseNorm(2, 1.0, 0.5, 0.75)
    cpu.set_threads(2)
    try:
        assert len(cpu.shards(x.size // 8, 8)) == 2
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            layer.forward(x)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("error")
            layer.forward(x)
    finally:
        cpu.set_threads(None)


def test_minireuse_numba_0_keeps_the_kernels_off():
    import os
    import subprocess
    import sys
    code = "from minireuse import cpu; print(cpu.compiled_kernels() is None, cpu.describe())"
    env = dict(os.environ, MINIREUSE_NUMBA="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "numpy,", "fast", "path,"] + out.split()[4:] and "numba" not in out


@pytest.mark.parametrize("forward", ["reuse", "exact"])
def test_a_reuse_conv_with_exact_dx_takes_the_fast_paths_dx(kernels, rng, monkeypatch, forward):
    """dx_mode 'exact' needs nothing of the clusters: the layer takes the fast path's (here
    sparse) dX, equal to the reference reuse path's, with the reuse path's dW unchanged."""
    from minireuse.reuse import ReuseConfig
    setting = ReuseConfig(L=16, H=6, dx_mode="exact", forward=forward)
    layer = Conv2D(32, 6, 3, dtype=np.float32, rng=rng, reuse=setting)
    x = np.abs(rng.standard_normal((4, 7, 6, 32))).astype(np.float32)
    dy = sparse_dy(rng, layer.output_shape(x.shape), np.float32)
    calls = counting(monkeypatch, kernels)

    def step():
        layer.reuse_state = type(layer.reuse_state)()       # the same clusters both times
        return conv_step(layer, x, dy)
    ref, fast = both_paths(step)
    assert calls == ["sparse_input_grad"]
    np.testing.assert_array_equal(fast[0], ref[0])
    np.testing.assert_allclose(fast[1], ref[1], rtol=1e-5, atol=2e-6 * np.abs(ref[1]).max())
    for k in ref[2]:
        np.testing.assert_array_equal(fast[2][k], ref[2][k])
