"""The options beyond the published method: H up to 64, the 'centred' family, forward 'exact',
dw_sample (validation, which implementation runs them, statistics, the layer benchmark's grid)."""
import argparse
import json
import types

import numpy as np
import pytest

from minireuse import backend
from minireuse.tools import bench
from minireuse.reuse import ReuseConfig, ReuseState, dense_forward, dispatch


@pytest.mark.parametrize("field, value", [("H", 65), ("H", 0), ("family", "centered"),
                                          ("forward", "approx"), ("forward", None)])
def test_bad_values_name_the_field_and_the_value(field, value):
    with pytest.raises(ValueError, match=rf"ReuseConfig\.{field}: got {value!r}"):
        ReuseConfig(**{field: value})


def test_new_values_are_accepted_and_the_defaults_unchanged():
    c = ReuseConfig.coerce({"H": 64, "family": "centred", "forward": "exact"})
    assert (c.H, c.family, c.forward) == (64, "centred", "exact")
    assert ReuseConfig().forward == "reuse" and ReuseConfig(H=33).H == 33
    assert c.replace(forward="reuse").as_dict()["forward"] == "reuse"


@pytest.fixture
def fake_cupy(monkeypatch):
    """resolve_impl sees a non-NumPy array module and a CUDA module that imported."""
    monkeypatch.setattr(backend, "get_array_module", lambda *arrays: types.SimpleNamespace(__name__="fake"))
    monkeypatch.setattr(dispatch, "_cuda_import", {"module": object(), "error": None})


@pytest.mark.parametrize("option", [dict(H=40), dict(H=64), dict(family="centred"), dict(forward="exact"),
                                    dict(dw_sample=0.25), dict(family="pca")])
def test_every_option_runs_the_cuda_kernels_on_gpu_arrays(fake_cupy, option):
    x = np.ones((2, 3), dtype=np.float32)
    assert dispatch.resolve_impl(ReuseConfig(**option), x) == "cuda"
    assert dispatch.resolve_impl(ReuseConfig(impl="cuda", **option), x) == "cuda"
    assert dispatch.resolve_impl(ReuseConfig(impl="reference", **option), x) == "reference"


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.5", None])
def test_bad_dw_sample_is_refused(value):
    with pytest.raises(ValueError, match=rf"ReuseConfig\.dw_sample: got {value!r}, expected a number in \[0, 1\]"):
        ReuseConfig(dw_sample=value)


@pytest.mark.parametrize("option", [dict(H=40), dict(family="centred"), dict(forward="exact"),
                                    dict(family="pca")])
def test_cuda_impl_on_numpy_arrays_keeps_the_numpy_error(option):
    x, W = np.ones((4, 8)), np.ones((8, 2))
    with pytest.raises(ValueError, match="with NumPy arrays"):
        dense_forward(x, W, None, ReuseConfig(L=4, impl="cuda", **option), ReuseState())


def test_pop_stats_averages_dw_cos_over_the_calls_that_measured_it():
    state = ReuseState()
    for dw_cos in (0.5, None, 0.75):
        entry = state.record(r_c=np.float64(0.5), n_clusters=np.array([2, 4]), impl="numpy-reference")
        if dw_cos is not None:
            entry["dw_cos"] = np.asarray(dw_cos)
    assert state.pop_stats()["dw_cos"] == pytest.approx(0.625)
    state.record(r_c=0.5, n_clusters=np.array([2]), impl="numpy-reference")
    assert state.pop_stats()["dw_cos"] is None


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_grid_takes_the_new_options_and_labels_them():
    args = bench_args("--L", "16", "--H", "12,64", "--family", "centred", "--paths", "pixel",
                      "--forward", "reuse,exact")
    grid = bench.modes("conv2", types.SimpleNamespace(c_in=64), args)
    assert [label for label, _ in grid] == [
        "exact", "pixel L=16 H=12 centred dx=cluster", "pixel L=16 H=12 centred dx=cluster forward=exact",
        "pixel L=16 H=64 centred dx=cluster", "pixel L=16 H=64 centred dx=cluster forward=exact"]
    assert grid[2][1]["forward"] == "exact" and grid[1][1]["forward"] == "reuse"
    with pytest.raises(ValueError, match="ReuseConfig.H"):
        bench.modes("conv2", types.SimpleNamespace(c_in=64), bench_args("--L", "16", "--H", "65"))
    with pytest.raises(ValueError, match="ReuseConfig.forward"):
        bench.modes("fc3", types.SimpleNamespace(), bench_args("--L", "16", "--forward", "backward"))
    grid = bench.modes("conv2", types.SimpleNamespace(c_in=64),
                       bench_args("--L", "64", "--H", "32", "--family", "offset", "--paths", "pixel",
                                  "--dw-sample", "0,0.125"))
    assert [label for label, _ in grid][1:] == ["pixel L=64 H=32 offset dx=cluster",
                                                "pixel L=64 H=32 offset dx=cluster dw_sample=0.125"]
    with pytest.raises(ValueError, match="ReuseConfig.dw_sample"):
        bench.modes("conv2", types.SimpleNamespace(c_in=64), bench_args("--L", "64", "--dw-sample", "2"))


def test_bench_times_the_exact_forward_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench_args("--layers", "conv2", "--L", "64", "--H", "40", "--family", "centred", "--paths", "pixel",
                      "--forward", "exact", "--batch", "2", "--repeats", "1", "--warmup", "0", "--device",
                      "cpu", "--data", str(tmp_path / "no-cifar"), "--json", str(out), "--quiet")
    assert bench.run(args) == 0
    assert "pixel L=64 H=40 centred dx=cluster forward=exact" in capsys.readouterr().out
    row = json.loads(out.read_text())["rows"][1]
    assert row["config"]["forward"] == "exact" and row["rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < row["r_c"] <= 1


def test_bench_runs_on_the_activations_of_given_weights(tmp_path, capsys, monkeypatch):
    trained = bench.build_model("cifarnet", seed=3)
    trained.save(tmp_path / "model.npz")
    seen = {}

    def bench_layer(name, layer, x, grid, args, progress):
        seen[name] = layer.params["W"].copy()
        return []
    monkeypatch.setattr(bench, "bench_layer", bench_layer)
    args = bench_args("--layers", "conv2", "--L", "64", "--H", "16", "--family", "pca", "--paths", "pixel",
                      "--batch", "2", "--device", "cpu", "--data", str(tmp_path / "no-cifar"), "--quiet",
                      "--weights", str(tmp_path / "model.npz"))
    assert bench.run(args) == 0
    np.testing.assert_array_equal(seen["conv2"], trained.layer("conv2").params["W"])
    assert f"weights: {tmp_path / 'model.npz'}" in capsys.readouterr().out
    assert not np.array_equal(seen["conv2"], bench.build_model("cifarnet", seed=0).layer("conv2").params["W"])
    with pytest.raises(Exception, match="no-such.npz"):
        bench.run(bench_args("--layers", "conv2", "--device", "cpu", "--data", str(tmp_path / "no-cifar"),
                             "--quiet", "--weights", str(tmp_path / "no-such.npz")))


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_evaluation_of_a_backward_only_layer_takes_the_exact_path(kind, monkeypatch):
    """forward 'exact' reuses in the backward only: a forward without a backward (evaluation)
    gives the exact output without hashing or clustering anything; a training forward does cluster."""
    from minireuse import reuse as deep_reuse
    from minireuse.layers import Conv2D, Dense
    rng = np.random.default_rng(3)
    if kind == "conv":
        layer = Conv2D(6, 8, 3, rng=np.random.default_rng(1), name="c")
        x = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    else:
        layer = Dense(6, 5, rng=np.random.default_rng(1), name="d")
        x = rng.standard_normal((9, 6)).astype(np.float32)
    want = layer.forward(x, train=False)
    calls = []
    for name in ("conv2d_forward", "dense_forward"):
        real = getattr(deep_reuse, name)
        monkeypatch.setattr(deep_reuse, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    layer.set_reuse(dict(L=2, H=4, forward="exact"))
    np.testing.assert_array_equal(layer.forward(x, train=False), want)
    assert calls == [] and layer.reuse_state.pop_stats(train=False) in ({}, None)
    np.testing.assert_allclose(layer.forward(x, train=True), want, rtol=1e-5, atol=1e-5)
    assert calls == [1]
    layer.set_reuse(dict(L=2, H=4))                 # reuse in the forward: evaluation reuses too
    layer.forward(x, train=False)
    assert calls == [1, 1]
