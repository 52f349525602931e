"""CUDA-graph training steps (minireuse.training.graphs) and the sync-free host <-> device scalars.

On the CPU: mode resolution and its errors, what may be recorded, the graph keys,
and the NumPy side of DeviceScalars/AsyncReader. On a GPU: a run replaying
recorded steps trains exactly like the eager run (learning rate, Adam's bias
corrections and dropout keys advance on the device), recording proves the exact
step free of host synchronisation, and 'on' refuses what cannot be recorded.
"""
import json

import numpy as np
import pytest

from minireuse import backend
from minireuse.training.graphs import (GraphError, resolve_mode, reuse_capturable, settings_key,
                                      uncapturable_layers)
from minireuse.training.step import begin_step, end_step
from minireuse.models import cifarnet
from minireuse.reuse import ReuseConfig
from minireuse.training.trainer import Trainer

from cli_helpers import config, learnable_data, params, run_cli

needs_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="no usable GPU/cupy on this machine")


# ---------------------------------------------------------------- CPU

def test_modes_resolve_per_device():
    assert resolve_mode("auto", "cpu") == "off"
    assert resolve_mode("off", "gpu") == "off"
    assert resolve_mode("auto", "gpu") == "auto"
    with pytest.raises(backend.DeviceError, match="needs a GPU"):
        resolve_mode("on", "cpu")
    with pytest.raises(ValueError, match="graph must be one of"):
        resolve_mode("sometimes", "gpu")


def test_graph_on_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(backend.DeviceError, match="CUDA graph, which needs a GPU"):
        Trainer(config(tmp_path, graph="on"), data=learnable_data(), quiet=True)
    r = run_cli("train", "--data", str(tmp_path), "--device", "cpu", "--graph", "on", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "needs a GPU" in r.stderr


def test_auto_on_the_cpu_runs_eagerly(tmp_path):
    t = Trainer(config(tmp_path, epochs=1), data=learnable_data(), quiet=True)
    assert t.step.graph_mode == "off"
    t.fit()
    assert t.step.graphs is None


def test_evaluation_statistics_stay_apart_from_training(tmp_path):
    """Test-set forwards (train=False) record into their own statistics: a training epoch
    reports one call per step, and the evaluation apart ('eval')."""
    cfg = config(tmp_path, epochs=1, reuse="fixed", reuse_layers={"conv2": dict(L=16, H=12)})
    hist = Trainer(cfg, data=learnable_data(), quiet=True).fit()
    rec = hist[0]["layers"]["conv2"]
    assert rec["calls"] == 192 // 32
    assert rec["eval"]["calls"] == 64 // 32 and 0 < rec["eval"]["r_c"] <= 1


def test_what_may_be_recorded():
    model = cifarnet()
    assert uncapturable_layers(model) == []
    conv2 = model.layer("conv2")
    setting = ReuseConfig(L=16, H=12)
    conv2.set_reuse(setting)
    assert uncapturable_layers(model)[0].startswith("conv2")        # nothing ran yet
    conv2.reuse_state.record(r_c=0.1, n_clusters=np.ones(4), impl="cupy-reference")
    assert not reuse_capturable(conv2)                                # the reference path syncs
    conv2.reuse_state.record(r_c=0.1, n_clusters=np.ones(4), impl="cuda")
    assert reuse_capturable(conv2)                                    # the CUDA path does not
    conv2.reuse_state.capturable = setting.replace(H=20)              # an explicit flag wins...
    assert not reuse_capturable(conv2)
    conv2.reuse_state.capturable = setting                            # ...for the setting it names
    assert reuse_capturable(conv2) and uncapturable_layers(model) == []
    conv2.set_reuse(setting.replace(dw_sample=0.125))                 # a sample drawn on the host per step
    conv2.reuse_state.capturable = True
    assert not reuse_capturable(conv2)
    assert "dw_sample rows are drawn on the host" in uncapturable_layers(model)[0]
    conv2.set_reuse(setting.replace(family="pca"))                    # planes fitted by eigh every step
    conv2.reuse_state.capturable = True
    assert not reuse_capturable(conv2)
    assert "'pca' planes are fitted" in uncapturable_layers(model)[0]


def test_graph_keys_follow_settings_and_error_sampling():
    model = cifarnet()
    exact = settings_key(model)
    conv2 = model.layer("conv2")
    conv2.set_reuse(dict(L=16, H=12))
    sampling = settings_key(model)
    conv2.set_reuse(conv2.reuse.replace(measure_error=True))
    assert len({exact, sampling, settings_key(model)}) == 3
    conv2.reuse_state.capture_key = lambda batch=None: ("capacity", 4096)
    assert settings_key(model) != sampling


def test_host_scalars_and_reader_on_numpy():
    s = backend.DeviceScalars(3)
    s.set((0.5, 2.0, 3.0))
    np.testing.assert_array_equal(s.array, [0.5, 2.0, 3.0])
    r = backend.AsyncReader(2)
    assert r.latest() is None
    r.request(np.array([4.0, 1.0]), tag=(8, 1))
    values, tag = r.latest()
    np.testing.assert_array_equal(values, [4.0, 1.0])
    assert tag == (8, 1) and r.wait()[1] == (8, 1)
    r.clear()
    assert r.latest() is None
    with backend.capturing():
        assert backend.is_capturing()
        with backend.capturing():
            assert backend.is_capturing()
        assert backend.is_capturing()
    assert not backend.is_capturing()


# ---------------------------------------------------------------- GPU

def gpu_pair(tmp_path, **kw):
    """The same run twice on the GPU, eager and with graphs; returns both trainers after fit."""
    runs = []
    for graph in ("off", "on"):
        cfg = config(tmp_path, device="gpu", out=str(tmp_path / graph), graph=graph, **kw)
        t = Trainer(cfg, data=learnable_data(), quiet=True)
        t.fit()
        runs.append(t)
    return runs


@needs_gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_replayed_steps_train_like_eager_steps(tmp_path, optimizer):
    # a cosine schedule changes the learning rate every step, dropout needs a new key
    # every step and Adam new bias corrections: a replay that froze any would drift
    eager, graphed = gpu_pair(tmp_path, epochs=2, optimizer=optimizer, lr=0.02 if optimizer == "sgd" else 1e-3,
                              schedule="cosine")
    assert graphed.step.graphs.recordings == 1 and graphed.step.graphs.replays >= 6
    a, b = params(eager.model), params(graphed.model)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for e, g in zip(eager.history, graphed.history):
        assert abs(e["train_loss"] - g["train_loss"]) < 1e-5 and e["train_acc"] == g["train_acc"]
    assert graphed.history[0]["layers"]["conv1"]["forward_ms"] > 0    # from the eager, timed steps


@needs_gpu
def test_replayed_reuse_steps_train_like_eager_steps(tmp_path):
    """Deep reuse on (the CUDA fast path): graphs replay it, and training matches the eager
    run up to the order of the float atomics (cluster sums), which differs between runs."""
    eager, graphed = gpu_pair(tmp_path, epochs=2, reuse="fixed", reuse_layers={"conv2": dict(L=16, H=12)})
    assert graphed.step.graphs.replays >= 6 and len(graphed.step.graphs.graphs) <= graphed.step.graphs.max_graphs
    a, b = params(eager.model), params(graphed.model)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=2e-2, atol=2e-3, err_msg=k)
    for e, g in zip(eager.history, graphed.history):
        assert abs(e["train_loss"] - g["train_loss"]) < 2e-2
        assert e["layers"]["conv2"]["calls"] == g["layers"]["conv2"]["calls"]


@needs_gpu
def test_exact_step_records_without_host_synchronisation(tmp_path):
    # graph 'on' raises if anything in the step (layers, loss, optimizer, sums) waits on the device
    t = Trainer(config(tmp_path, device="gpu", graph="on", epochs=1), data=learnable_data(), quiet=True)
    t.fit()
    assert t.step.graphs.recordings == 1 and not t.step.graphs.failed


@needs_gpu
def test_graph_on_refuses_the_reference_reuse_path(tmp_path):
    cfg = config(tmp_path, device="gpu", graph="on", reuse="fixed",
                 reuse_layers={"conv2": dict(L=16, H=12, impl="reference")})
    with pytest.raises(GraphError, match="conv2"):
        Trainer(cfg, data=learnable_data(), quiet=True).fit()


@needs_gpu
def test_reuse_statistics_survive_graph_replays(tmp_path):
    cfg = config(tmp_path, device="gpu", graph="auto", epochs=1, reuse="fixed",
                 reuse_layers={"conv2": dict(L=16, H=12)})
    t = Trainer(cfg, data=learnable_data(), quiet=True)
    hist = t.fit()
    rec = hist[0]["layers"]["conv2"]
    assert rec["calls"] == 6 and 0 < rec["r_c"] <= 1          # one per step, replayed or not
    saved = json.load(open(tmp_path / "run" / "history.json"))
    assert saved["epochs"][0]["layers"]["conv2"]["r_c"] == rec["r_c"]


@needs_gpu
def test_device_scalars_and_reader_on_the_gpu():
    old = backend._state["device"]
    backend.set_device("gpu")
    try:
        cp = backend.require_gpu()
        s = backend.DeviceScalars(2, np.float64, xp=cp, slots=3)
        for k in range(10):                      # more sets than slots: buffers are reused safely
            s.set((k, -k))
        np.testing.assert_array_equal(backend.asnumpy(s.array), [9, -9])
        r = backend.AsyncReader(2, xp=cp)
        a = cp.asarray([1.5, 2.5])
        r.request(a, tag="first")
        a += 1                                   # later work does not change what was requested
        values, tag = r.wait()
        np.testing.assert_array_equal(values, [1.5, 2.5])
        assert tag == "first"
    finally:
        backend._state["device"] = old


def test_begin_step_advances_the_optimizer_and_every_layer_with_per_step_state():
    calls = []
    layer = lambda name, state: type(name, (), {"begin_step": (lambda self: calls.append(name)),
                                                "end_step": (lambda self: calls.append("end " + name))}
                                     if state else {})()
    model = type("M", (), {"layers": [layer("dropout1", True), layer("relu", False), layer("dropout2", True)]})()
    opt = type("O", (), {"begin_step": lambda self: calls.append("opt")})()
    begin_step(model, opt)
    end_step(model)
    assert calls == ["opt", "dropout1", "dropout2", "end dropout1", "end dropout2"]
