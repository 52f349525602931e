"""Fused kernels (minireuse.kernels.step_kernels) against their twins, the layers' and optimizers' array code.

Each test body runs twice: on the GPU (CuPy arrays, the real kernels), and on the
kernels' host build (the same CUDA source run by minireuse.kernels.runtime's host runner:
blocks of real threads, fed NumPy arrays through the launch the GPU uses), so the
kernels are checked on machines without a GPU too. Data is asymmetric and random, with ties
where ties matter (pooling, argmax), and holds no float32 subnormals: CuPy compiles with
-ftz=true, so the GPU flushes them where NumPy keeps them, and the exact comparisons
below hold only without them.
"""
import shutil
import subprocess

import numpy as np
import pytest

from minireuse import backend
from minireuse.kernels import step_kernels, runtime
from minireuse.layers import Dense, Dropout, LocalResponseNorm, MaxPool2D, ReLU, col2im, im2col
from minireuse.layers.simple import call_key
from minireuse.models import Sequential
from minireuse.optim import SGD, Adam
from minireuse.training.step import StepTotals


def _runners():
    return [pytest.param("host", marks=pytest.mark.skipif(
                runtime.host_compiler() is None, reason="no host C++ compiler for the kernels' host build")),
            pytest.param("gpu", marks=pytest.mark.skipif(
                not backend.gpu_available(), reason="no usable GPU/cupy on this machine"))]


class On:
    """Moves test data to the runner's arrays and back."""

    def __init__(self, xp):
        self.xp = xp

    def __call__(self, a):
        return self.xp.asarray(a)

    @staticmethod
    def back(a):
        return backend.asnumpy(a)


@pytest.fixture(params=_runners())
def on(request):
    old = backend._state["device"]
    backend.set_device("gpu" if request.param == "gpu" else "cpu")
    yield On(backend.xp())
    backend._state["device"] = old


def tol(dtype):
    return dict(rtol=2e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


DTYPES = [np.float32, np.float64]


# ---------------------------------------------------------------- optimizers

def reference_optimizer(cls, w, grads, lrs, weight_decay, **kw):
    """The optimizer's array code (NumPy) over len(lrs) steps; returns (W, state)."""
    layer = Dense(w.shape[0], w.shape[1], name="fc", rng=np.random.default_rng(0))
    layer.params = {"W": w.copy()}
    layer.decay = {"W": True}
    opt = cls(Sequential([layer]), lr=lrs[0], weight_decay=weight_decay, **kw)
    for g, lr in zip(grads, lrs):
        layer.grads = {"W": g}
        opt.lr = lr
        opt.step()
    return layer.params["W"], opt.state["fc.W"] if opt.state else {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, True, 0.004), (0.9, False, 0.0), (0.0, False, 0.01)])
def test_sgd_kernel_matches_sgd_update(on, rng, dtype, momentum, nesterov, wd):
    w = (rng.standard_normal((7, 5)) + 0.2).astype(dtype)
    grads = [(rng.standard_normal((7, 5)) * (k + 1)).astype(dtype) for k in range(3)]
    lrs = [0.05, 0.03, 0.011]
    want, state = reference_optimizer(SGD, w, grads, lrs, wd, momentum=momentum, nesterov=nesterov)
    p, v = on(w), on(np.full_like(w, np.nan))
    hyper = backend.DeviceScalars(3, np.float64, xp=on.xp)
    for k, (g, lr) in enumerate(zip(grads, lrs)):
        hyper.set((lr, 1.0, 1.0))
        step_kernels.sgd_update(p, on(g), v if momentum else None, hyper.array, momentum, nesterov, wd, k == 0)
    np.testing.assert_allclose(on.back(p), want, **tol(dtype))
    if momentum:
        np.testing.assert_allclose(on.back(v), state["v"], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_kernel_matches_adam_update(on, rng, dtype, wd):
    w = (rng.standard_normal((4, 9)) - 0.1).astype(dtype)
    grads = [(rng.standard_normal((4, 9)) + k).astype(dtype) for k in range(3)]
    lrs = [0.01, 0.004, 0.002]
    want, state = reference_optimizer(Adam, w, grads, lrs, wd)
    p, m, v = on(w), on(np.zeros_like(w)), on(np.zeros_like(w))
    hyper = backend.DeviceScalars(3, np.float64, xp=on.xp)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        hyper.set((lr, 1 - 0.9 ** t, 1 - 0.999 ** t))
        step_kernels.adam_update(p, on(g), m, v, hyper.array, 0.9, 0.999, 1e-8, wd)
    np.testing.assert_allclose(on.back(p), want, **tol(dtype))
    np.testing.assert_allclose(on.back(m), state["m"], **tol(dtype))
    np.testing.assert_allclose(on.back(v), state["v"], **tol(dtype))


# ---------------------------------------------------------------- layers

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,bias,alpha,beta", [(4, 1.0, 0.001 / 9, 0.75), (2, 2.0, 0.3, 0.5), (0, 1.0, 1.0, 1.0)])
def test_lrn_kernels_match_the_layer(on, rng, dtype, r, bias, alpha, beta):
    x = (rng.standard_normal((2, 3, 5, 11)) * 2 + 0.3).astype(dtype)
    dy = (rng.standard_normal(x.shape) - 0.2).astype(dtype)
    layer = LocalResponseNorm(r, bias, alpha, beta)
    y_want = layer.forward(x)
    dx_want = layer.backward(dy)
    y, scale, denom = step_kernels.lrn_forward(on(x), r, bias, alpha, beta)
    dx = step_kernels.lrn_backward(on(dy), on(x), scale, denom, r, alpha, beta)
    np.testing.assert_allclose(on.back(y), y_want, **tol(dtype))
    np.testing.assert_allclose(on.back(dx), dx_want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride,padding,shape", [(2, 2, "valid", (2, 8, 6, 3)), (2, 2, "valid", (3, 7, 9, 2)),
                                                    (3, 3, "same", (2, 7, 8, 3)), (2, 3, "valid", (2, 8, 7, 4))])
def test_maxpool_kernels_match_the_layer(on, rng, dtype, k, stride, padding, shape):
    x = rng.integers(-3, 4, size=shape).astype(dtype)       # small integers: many ties
    x[0, 1, 2, 0] = np.nan                                   # a NaN maximum gets no gradient
    layer = MaxPool2D(k, stride, padding=padding)
    y_want = layer.forward(x)
    dy = (rng.standard_normal(y_want.shape) + 0.5).astype(dtype)
    dx_want = layer.backward(dy)
    pads, oh, ow = layer._geometry(shape[1], shape[2])
    y, arg = step_kernels.maxpool_forward(on(x), k, stride, pads, (oh, ow))
    dx = step_kernels.maxpool_backward(on(dy), arg, shape, k, stride, pads)
    np.testing.assert_array_equal(on.back(y), y_want)
    np.testing.assert_array_equal(on.back(dx), dx_want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_kernel_matches_the_layer(on, rng, dtype):
    x = rng.standard_normal((6, 13)).astype(dtype)
    x[0, :4] = 0.0
    dy = (rng.standard_normal(x.shape) + 1).astype(dtype)
    layer = ReLU()
    y = layer.forward(x)
    want = layer.backward(dy)
    np.testing.assert_array_equal(on.back(step_kernels.relu_backward(on(dy), on(y))), want)


def splitmix_uniform(key, n):
    """u_i of the dropout kernel, in NumPy uint64 arithmetic (wraps mod 2**64)."""
    z = np.uint64(key) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_kernel_draws_splitmix_masks(on, rng, dtype):
    x = (rng.standard_normal((37, 29)) + 0.1).astype(dtype)
    keep = 0.7
    key = call_key((3, 1, 4), 1)
    key_words = on(np.array([key & 0xFFFFFFFF, key >> 32], dtype=np.uint32))
    mask, y = step_kernels.dropout_forward(on(x), keep, key_words)
    mask, y = on.back(mask), on.back(y)
    scale = np.dtype(dtype).type(1) / np.dtype(dtype).type(keep)
    want = np.where(splitmix_uniform(key, x.size) < np.float32(keep), scale, 0).astype(dtype).reshape(x.shape)
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(y, x * want)
    assert 0.6 < (mask != 0).mean() < 0.8
    other, _ = step_kernels.dropout_forward(on(x), keep, on(np.array([key & 0xFFFFFFFF, (key >> 32) ^ 1], np.uint32)))
    assert (on.back(other) != mask).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_kernel_matches_the_array_sums(on, rng, dtype):
    logits = rng.integers(-2, 3, size=(50, 7)).astype(dtype)   # ties: the first maximum wins
    logits[3, 5] = np.nan                                        # NaN: argmax is the NaN
    labels = rng.integers(0, 7, size=50)
    labels[3] = 5
    loss = np.asarray(rng.random() * 3, dtype=dtype)
    want = np.array([1.25, 3.0])
    want[0] += loss * len(labels)
    want[1] += (logits.argmax(axis=1) == labels).sum()
    sums = on(np.array([1.25, 3.0]))
    step_kernels.accumulate_step(sums, on(loss), on(logits), on(labels))
    np.testing.assert_array_equal(on.back(sums), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k,stride,pads", [((2, 5, 6, 3), (3, 2), 2, (1, 2, 0, 1)),
                                                 ((3, 8, 8, 4), (5, 5), 1, (2, 2, 2, 2)),
                                                 ((1, 7, 9, 2), (3, 3), 3, (0, 2, 1, 1))])
def test_im2col_col2im_kernels_match_the_conv_code(on, rng, dtype, shape, k, stride, pads):
    x = (rng.standard_normal(shape) + 0.1).astype(dtype)
    cols_want, ohw = im2col(x, k[0], k[1], stride, pads)
    cols, ohw_fused = step_kernels.im2col(on(x), k[0], k[1], stride, pads)
    assert ohw_fused == ohw
    np.testing.assert_array_equal(on.back(cols), cols_want)
    d = (rng.standard_normal(cols_want.shape) - 0.3).astype(dtype)
    np.testing.assert_array_equal(on.back(step_kernels.col2im(on(d), shape, k[0], k[1], stride, pads)),
                                  col2im(d, shape, k[0], k[1], stride, pads))


# ---------------------------------------------------------------- dispatch

def test_numpy_arrays_take_the_array_code(rng, monkeypatch):
    """On NumPy arrays no layer, optimizer or sum reaches a kernel launch."""
    def no_launch(*args):
        raise AssertionError("a fused kernel was launched for NumPy arrays")
    monkeypatch.setattr(step_kernels, "_launch", no_launch)
    old = backend._state["device"]
    backend.set_device("cpu")
    try:
        x = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
        for layer in (LocalResponseNorm(2), MaxPool2D(2), ReLU(), Dropout(0.5)):
            y = layer.forward(x)
            layer.backward(np.ones_like(y))
        dense = Dense(3, 2, rng=rng)
        for opt in (SGD(Sequential([dense]), lr=0.1, momentum=0.9), Adam(Sequential([dense]))):
            dense.grads = {k: np.ones_like(v) for k, v in dense.params.items()}
            opt.step()
        StepTotals(np).add(np.float32(1.0), rng.standard_normal((4, 3)).astype(np.float32), np.arange(4) % 3)
    finally:
        backend._state["device"] = old


@pytest.mark.skipif(not backend.gpu_available(), reason="no usable GPU/cupy on this machine")
def test_cupy_arrays_take_the_kernels(rng, monkeypatch):
    launched = []
    real = step_kernels._launch
    monkeypatch.setattr(step_kernels, "_launch", lambda name, *a: (launched.append(name), real(name, *a)))
    old = backend._state["device"]
    backend.set_device("gpu")
    try:
        x = backend.to_device(rng.standard_normal((2, 4, 4, 6)), np.float32)
        for layer in (LocalResponseNorm(2), MaxPool2D(2), ReLU(), Dropout(0.5)):
            y = layer.forward(x)
            layer.backward(backend.xp().ones_like(y))
        dense = Dense(3, 2, rng=rng)
        dense.grads = {k: backend.xp().ones_like(v) for k, v in dense.params.items()}
        SGD(Sequential([dense]), lr=0.1, momentum=0.9).step()
    finally:
        backend._state["device"] = old
    for name in ("lrn_forward", "lrn_backward", "maxpool_forward", "maxpool_backward", "relu_backward",
                 "dropout_forward", "sgd_update"):
        assert name in launched


def _device_arch():
    """The GPU's own architecture when one is usable, else sm_80 (a datacenter GPU's)."""
    if backend.gpu_available():
        return "sm_" + backend.require_gpu().cuda.Device().compute_capability
    return "sm_80"


def _compile_ptx(tmp_path, arch, *defines):
    src = tmp_path / "step_kernels.cu"
    src.write_text(step_kernels.CUDA_SOURCE)
    r = subprocess.run(["nvcc", "--ptx", f"-arch={arch}", "--fmad=false", "-std=c++14", *defines,
                        str(src), "-o", str(tmp_path / "step_kernels.ptx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return (tmp_path / "step_kernels.ptx").read_text()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_source_compiles_for_devices_below_sm60(tmp_path):
    """accumulate_step's double sums: atomicAdd(double*) starts at sm_60 (CuPy on CUDA 12 still
    targets sm_5x). CUDA 13's nvcc targets no sm_5x, so its device pass is told it is one."""
    ptx = _compile_ptx(tmp_path, "sm_80", "-D__CUDA_ARCH__=500")
    assert "atom.global.cas.b64" in ptx


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_source_compiles_for_the_device(tmp_path):
    ptx = _compile_ptx(tmp_path, _device_arch())
    for name in ("sgd_update", "adam_update", "lrn_forward", "lrn_backward", "maxpool_forward", "maxpool_backward",
                 "relu_backward", "dropout_forward", "accumulate_step", "im2col", "col2im"):
        for suffix in ("f32", "f64"):
            assert f".entry {name}_{suffix}(" in ptx
