"""The reuse product: duplicates, identity assignment, gradients, settings, statistics."""
import numpy as np
import pytest

from gradcheck import numerical_directional
from minireuse import backend
from minireuse.reuse import (ReuseConfig, ReuseState, assign_clusters, dense_backward, dense_forward,
                             reuse_matmul_backward, reuse_matmul_forward, reuse_matmul_forward_assigned)
from minireuse.reuse.matmul import hash_groups, reuse_matmul_simple
from minireuse.reuse.lsh import split_groups


@pytest.fixture
def xp(device):
    """The array module of the device under test (conftest parametrizes cpu/gpu)."""
    return device


def operands(xp, n=60, k=10, m=7, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, k)) + np.linspace(-1, 2, k)    # asymmetric, no zeros
    W = rng.standard_normal((k, m)) * 0.5
    b = rng.standard_normal(m)
    return (xp.asarray(a.astype(dtype)) for a in (X, W, b))


def identity_assignment(xp, n, g):
    ids = xp.repeat(xp.arange(n, dtype=xp.int32)[:, None], g, axis=1)
    return ids, xp.full(g, n, dtype=xp.int32)


def coarse_assignment(xp, X, L, H=3):
    """A real LSH assignment with few bits: large clusters, several per group."""
    codes = hash_groups(split_groups(X, L), ReuseConfig(L=L, H=H), ReuseState(), X)
    return assign_clusters(codes, H)


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(backend.asnumpy(a), backend.asnumpy(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("L, H", [(4, 3), (3, 12), (16, 12)])
def test_the_simple_product_is_the_full_forward_with_default_options(xp, L, H):
    X, W, _ = operands(xp, n=200, k=10, m=7)
    state = ReuseState()
    y, _ = reuse_matmul_forward(X, W, None, ReuseConfig(L=L, H=H), state, train=False)
    close(reuse_matmul_simple(X, W, L, H), y)
    assert H > 3 or float(backend.asnumpy(state.last["r_c"])) < 0.1       # few bits: large clusters


def test_duplicate_rows_share_a_cluster_and_give_the_exact_product(xp):
    X, W, b = operands(xp, n=4, k=32, m=5)
    X = xp.tile(X, (25, 1))                        # 100 rows, 4 distinct
    state = ReuseState()
    y, _ = reuse_matmul_forward(X, W, b, ReuseConfig(L=8, H=24), state)
    assert backend.asnumpy(state.last["n_clusters"]).tolist() == [4, 4, 4, 4]
    close(y, X @ W + b)


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_identity_assignment_is_the_exact_product(xp, dx_mode):
    X, W, b = operands(xp, k=10)
    ids, n = identity_assignment(xp, X.shape[0], 3)        # K = 10, L = 4: G = 3 (last padded)
    y, cache = reuse_matmul_forward_assigned(X, W, b, ids, n, 4, dx_mode)
    close(y, X @ W + b)
    dy = xp.asarray(np.random.default_rng(1).standard_normal(y.shape))
    dX, dW, db = reuse_matmul_backward(dy, cache)
    close(dX, dy @ W.T)
    close(dW, X.T @ dy)
    close(db, dy.sum(axis=0))


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_gradients_with_the_assignment_fixed(xp, dx_mode):
    X, W, b = operands(xp, k=10)
    L = 4
    ids, n = coarse_assignment(xp, X, L)
    assert int(n.min()) > 1 and int(n.max()) < X.shape[0] // 3     # clusters merge rows
    rng = np.random.default_rng(2)
    dy = xp.asarray(rng.standard_normal((X.shape[0], W.shape[1])))

    def loss():
        return (reuse_matmul_forward_assigned(X, W, b, ids, n, L, dx_mode)[0] * dy).sum()

    _, cache = reuse_matmul_forward_assigned(X, W, b, ids, n, L, dx_mode)
    dX, dW, db = reuse_matmul_backward(dy, cache)
    targets = [(W, dW), (b, db)] + ([(X, dX)] if dx_mode == "cluster" else [])
    for arr, grad in targets:
        v = xp.asarray(rng.standard_normal(arr.shape))
        num = numerical_directional(loss, arr, v)
        assert abs(num - float((grad * v).sum())) <= 1e-7 * max(1.0, abs(num))
    if dx_mode == "exact":
        close(dX, dy @ W.T)


def test_cluster_dx_spreads_each_centroid_gradient_over_its_members(xp):
    X, W, b = operands(xp, k=8)
    ids = xp.zeros((X.shape[0], 2), dtype=xp.int32)                  # one cluster per group
    y, cache = reuse_matmul_forward_assigned(X, W, None, ids, xp.ones(2, dtype=xp.int32), 4, "cluster")
    close(y, xp.broadcast_to(X.mean(axis=0) @ W, y.shape))
    dy = xp.ones_like(y)
    dX, _, db = reuse_matmul_backward(dy, cache)
    assert db is None
    close(dX, xp.broadcast_to(W.sum(axis=1), X.shape))    # (sum of dY / N) @ W^T for every row


def test_measure_error_and_statistics(xp):
    X, W, b = operands(xp, n=200, k=32, m=6)
    state = ReuseState()
    config = ReuseConfig(L=8, H=4, measure_error=True)
    for _ in range(3):
        y, _ = reuse_matmul_forward(X, W, b, config, state)
    exact = X @ W + b
    expected = float(xp.linalg.norm(y - exact) / xp.linalg.norm(exact))
    assert len(state.stats) == 3
    summary = state.pop_stats()
    assert summary["calls"] == 3 and state.stats == [] and state.pop_stats() == {}
    assert summary["rel_error"] == pytest.approx(expected)
    n = backend.asnumpy(state.last["n_clusters"])
    assert summary["r_c"] == pytest.approx(n.sum() / (200 * 4))
    assert summary["clusters_per_group"] == pytest.approx(n.mean())
    assert summary["impl"] == ("numpy-reference" if xp is np else "cupy-reference")
    assert summary["pixel_aligned"] == 0.0


def test_dense_dispatch_runs_the_reference_path_and_train_false_keeps_no_cache(xp):
    X, W, b = operands(xp, dtype=np.float32)
    config = ReuseConfig(L=4, impl="reference")
    y, cache = dense_forward(X, W, b, config, ReuseState())
    assert y.dtype == np.float32 and cache[0] == "reference"
    dX, dW, db = dense_backward(xp.ones_like(y), cache)
    assert dX.shape == X.shape and dW.shape == W.shape and db.shape == b.shape
    _, cache = dense_forward(X, W, b, config, ReuseState(), train=False)
    with pytest.raises(RuntimeError, match="train=False"):
        dense_backward(xp.ones_like(y), cache)


def test_cuda_impl_on_numpy_arrays_is_refused():
    X, W, b = operands(np)
    with pytest.raises(ValueError, match="impl"):
        dense_forward(X, W, b, ReuseConfig(impl="cuda"), ReuseState())
    with pytest.raises(ValueError, match="enabled"):
        dense_forward(X, W, b, ReuseConfig(enabled=False), ReuseState())


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_exact_forward_gives_the_exact_product_and_the_reuse_backward(xp, dx_mode):
    X, W, b = operands(xp, k=10)
    L = 4
    ids, n = coarse_assignment(xp, X, L)
    y, cache = reuse_matmul_forward_assigned(X, W, b, ids, n, L, dx_mode, forward="exact")
    y_reuse, cache_reuse = reuse_matmul_forward_assigned(X, W, b, ids, n, L, dx_mode)
    close(y, X @ W + b)
    assert float(xp.abs(y_reuse - y).max()) > 0.1                   # the clusters do merge rows
    dy = xp.asarray(np.random.default_rng(3).standard_normal(y.shape))
    for got, expected in zip(reuse_matmul_backward(dy, cache), reuse_matmul_backward(dy, cache_reuse)):
        close(got, expected)


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_exact_forward_through_the_config_hashes_and_clusters_like_reuse(xp, dx_mode):
    X, W, b = operands(xp, k=10)
    state = ReuseState()
    config = ReuseConfig(L=4, H=3, dx_mode=dx_mode, forward="exact", measure_error=True)
    y, (impl, cache) = dense_forward(X, W, b, config, state)
    assert impl == "reference"
    close(y, X @ W + b)
    ids, n = coarse_assignment(xp, X, 4, H=3)
    np.testing.assert_array_equal(backend.asnumpy(state.last["n_clusters"]), backend.asnumpy(n))
    assert float(state.last["rel_error"]) == 0.0
    assert state.last["r_c"] == pytest.approx(float(n.sum()) / ids.size)
    dy = xp.asarray(np.random.default_rng(4).standard_normal(y.shape))
    _, reuse_cache = reuse_matmul_forward_assigned(X, W, b, ids, n, 4, dx_mode)
    for got, expected in zip(dense_backward(dy, ("reference", cache)), reuse_matmul_backward(dy, reuse_cache)):
        close(got, expected)


def test_exact_forward_with_exact_dx_gives_the_true_input_and_bias_gradients(xp):
    X, W, b = operands(xp, k=10)                    # float64
    config = ReuseConfig(L=4, H=3, forward="exact")
    rng = np.random.default_rng(5)
    dy = xp.asarray(rng.standard_normal((X.shape[0], W.shape[1])))

    def loss():
        return (reuse_matmul_forward(X, W, b, config, ReuseState())[0] * dy).sum()

    _, cache = reuse_matmul_forward(X, W, b, config, ReuseState())
    dX, dW, db = reuse_matmul_backward(dy, cache)
    for arr, grad in [(X, dX), (b, db)]:
        v = xp.asarray(rng.standard_normal(arr.shape))
        num = numerical_directional(loss, arr, v)
        assert abs(num - float((grad * v).sum())) <= 1e-7 * max(1.0, abs(num))
    close(dX, dy @ W.T)
    assert float(xp.abs(dW - X.T @ dy).max()) > 1e-3      # dW is still the clustered one


@pytest.mark.parametrize("forward", ["reuse", "exact"])
def test_dw_cos_is_one_with_singleton_clusters_and_below_one_otherwise(xp, forward):
    X, W, b = operands(xp, n=20, k=16, m=5)
    dy = xp.asarray(np.random.default_rng(6).standard_normal((20, 5)))
    cos = {}
    for H in (64, 2):
        state = ReuseState()
        config = ReuseConfig(L=8, H=H, family="centred", forward=forward, measure_error=True,
                             impl="reference")
        y, cache = dense_forward(X, W, b, config, state)
        assert cache[1].X is X and cache[1].stats is state.last
        dense_backward(dy, cache)
        assert state.last["dw_cos"].shape == ()
        if H == 64:
            assert backend.asnumpy(state.last["n_clusters"]).tolist() == [20, 20]    # singletons
        cos[H] = state.pop_stats()["dw_cos"]
    assert cos[64] == pytest.approx(1.0, abs=1e-12)
    assert 0 < cos[2] < 0.999


@pytest.mark.parametrize("forward", ["reuse", "exact"])
def test_dense_records_how_its_dx_and_dw_compare_with_the_exact_ones(xp, forward):
    X, W, b = operands(xp, n=20, k=16, m=5)
    dy = xp.asarray(np.random.default_rng(7).standard_normal((20, 5)))
    state = ReuseState()
    config = ReuseConfig(L=8, H=2, family="centred", forward=forward, dx_mode="cluster", measure_error=True,
                         impl="reference")
    dX, dW, _ = dense_backward(dy, dense_forward(X, W, b, config, state)[1])
    rec = state.pop_stats()
    for name, got, exact in (("dx", dX, dy @ W.T), ("dw", dW, X.T @ dy)):
        a, e = backend.asnumpy(got).ravel(), backend.asnumpy(exact).ravel()
        assert rec[f"{name}_cos"] == pytest.approx(a @ e / (np.linalg.norm(a) * np.linalg.norm(e)), rel=1e-12)
        assert rec[f"{name}_gain"] == pytest.approx(a @ e / (e @ e), rel=1e-12)
    assert rec["dx_cos"] < 0.999


def test_no_input_is_kept_and_no_dw_cos_without_measure_error(xp):
    X, W, b = operands(xp)
    state = ReuseState()
    y, cache = dense_forward(X, W, b, ReuseConfig(L=4, H=3), state)
    assert cache[1].X is None and cache[1].stats is None
    dense_backward(xp.ones_like(y), cache)
    rec = state.pop_stats()
    assert "dw_cos" not in state.last and rec["dw_cos"] is None and rec["dx_cos"] is None and rec["dx_gain"] is None


@pytest.mark.parametrize("H", [40, 64])
@pytest.mark.parametrize("family", ["offset", "centred"])
def test_more_than_32_bits_through_the_config(xp, H, family):
    X, W, b = operands(xp, n=5, k=32, m=5)
    X = xp.tile(X, (20, 1))                        # 100 rows, 5 distinct
    state = ReuseState()
    y, _ = reuse_matmul_forward(X, W, b, ReuseConfig(L=8, H=H, family=family), state)
    assert backend.asnumpy(state.last["n_clusters"]).tolist() == [5, 5, 5, 5]
    close(y, X @ W + b)
