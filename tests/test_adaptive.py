"""Reuse strategies (fixed, schedule, adaptive) and reuse statistics in training runs."""
import json

import pytest

from minireuse.models import cifarnet
from minireuse.reuse import ReuseConfig
from minireuse.reuse.adaptive import (AdaptiveStrategy, FixedStrategy, ScheduleStrategy, load_settings,
                                      make_strategy)
from minireuse.train import Trainer

from test_train import config, learnable_data

LADDER = {"conv2": [dict(L=32, H=8), dict(L=16, H=12)]}


def test_fixed_strategy_sets_the_layer_and_never_moves():
    model = cifarnet()
    s = FixedStrategy({"conv2": dict(L=16, H=10)})
    s.attach(model)
    assert model.layer("conv2").reuse == ReuseConfig(L=16, H=10)
    assert model.layer("conv1").reuse is None
    for t in (0.0, 0.5, 0.99):
        s.on_step(t)
    assert s.on_epoch_end(0.99, 1.0, {"conv2": {"rel_error": 5.0}}) is False
    assert model.layer("conv2").reuse == ReuseConfig(L=16, H=10)


def test_schedule_walks_the_ladder_then_exact():
    model = cifarnet()
    s = ScheduleStrategy(LADDER, boundaries=[0.0, 0.3, 0.8])
    s.attach(model)
    seen = []
    for t in (0.0, 0.29, 0.3, 0.79, 0.8, 0.95):
        s.on_step(t)
        r = model.layer("conv2").reuse
        seen.append(None if r is None else (r.L, r.H))
    assert seen == [(32, 8), (32, 8), (16, 12), (16, 12), None, None]
    with pytest.raises(ValueError, match="boundaries"):
        ScheduleStrategy(LADDER, boundaries=[0.0, 0.9, 0.5])


def test_adaptive_error_bound_tightens_and_advances():
    model = cifarnet()
    s = AdaptiveStrategy(LADDER, error_start=0.5, error_end=0.1, exact_tail=0.2)
    s.attach(model)
    assert s.bound(0.0) == 0.5 and abs(s.bound(1.0) - 0.1) < 1e-12
    s.on_epoch_end(0.1, 2.0, {"conv2": {"rel_error": 0.4}})         # 0.4 < bound 0.46: stay
    assert s.stage["conv2"] == 0
    s.on_epoch_end(0.5, 1.5, {"conv2": {"rel_error": 0.4}})         # 0.4 > bound 0.3: next stage
    assert s.stage["conv2"] == 1 and model.layer("conv2").reuse.L == 16
    assert "sampled error" in s.events[-1]["reason"]
    s.on_step(0.85)                                                  # exact tail
    assert model.layer("conv2").reuse is None


def test_adaptive_loss_plateau_advances():
    model = cifarnet()
    s = AdaptiveStrategy(LADDER, plateau=0.05)
    s.attach(model)
    s.on_epoch_end(0.1, 2.0, {})
    s.on_epoch_end(0.2, 1.5, {})      # fell 25%: stays
    assert s.stage["conv2"] == 0
    s.on_epoch_end(0.3, 1.48, {})     # fell 1.3% < 5%: plateau
    assert s.stage["conv2"] == 1 and "plateau" in s.events[-1]["reason"]


def test_adaptive_never_keeps_reuse_slower_than_exact():
    model = cifarnet()
    s = AdaptiveStrategy(LADDER)
    s.attach(model)
    s.exact_ms = {"conv2": 10.0}
    s.on_epoch_end(0.1, 2.0, {"conv2": {"step_ms": 12.0, "rel_error": 0.01}})
    assert model.layer("conv2").reuse is None and "slower than exact" in s.events[-1]["reason"]


def test_strategy_state_round_trip():
    a = AdaptiveStrategy(LADDER)
    a.attach(cifarnet())
    a.on_epoch_end(0.5, 1.0, {"conv2": {"rel_error": 0.9}})
    b = AdaptiveStrategy(LADDER)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.stage == a.stage and b.prev_loss == a.prev_loss and b.events == a.events


def test_settings_validation(tmp_path):
    with pytest.raises(ValueError, match="does not have"):
        make_strategy("fixed", {"conv9": dict(L=4)}).attach(cifarnet())
    with pytest.raises(ValueError, match="ReuseConfig.H"):
        make_strategy("schedule", {"conv2": [dict(L=16, H=40)]})
    with pytest.raises(ValueError, match="unknown reuse strategy"):
        make_strategy("sometimes")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"layers": {"conv2": [{"L": 16, "H": 8}]}, "options": {"plateau": 0.02}}))
    layers, options = load_settings(str(path))
    assert layers == {"conv2": [{"L": 16, "H": 8}]} and options == {"plateau": 0.02}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read reuse settings"):
        load_settings(str(path))


def test_training_records_reuse_statistics_per_layer(tmp_path):
    cfg = config(tmp_path, epochs=2, reuse="adaptive",
                 reuse_layers={"conv2": [dict(L=16, H=10), dict(L=16, H=16)]},
                 reuse_options=dict(error_every=2, exact_tail=0.5, speed_guard=False))
    t = Trainer(cfg, data=learnable_data(), quiet=True)
    hist = t.fit()
    first, last = hist[0]["layers"]["conv2"], hist[1]["layers"]["conv2"]
    assert first["reuse"]["L"] == 16 and 0 < first["r_c"] < 1
    assert first["rel_error"] is not None and first["rel_error"] > 0
    assert first["forward_ms"] > 0 and first["backward_ms"] > 0
    assert last["reuse"] is None                          # exact tail: the second half is exact
    assert hist[0]["layers"]["conv1"]["reuse"] is None and hist[0]["layers"]["conv1"]["forward_ms"] > 0
    assert any(e["reason"] == "exact tail" for e in hist[1]["reuse_events"])
    saved = json.load(open(tmp_path / "run" / "history.json"))
    assert saved["epochs"][0]["layers"]["conv2"]["r_c"] == first["r_c"]


def test_resume_restores_the_strategy(tmp_path):
    layers = {"conv2": [dict(L=16, H=10), dict(L=16, H=14)]}
    cfg = config(tmp_path, epochs=1, reuse="schedule", reuse_layers=layers,
                 reuse_options=dict(boundaries=[0.0, 0.25, 0.9]), schedule="constant")
    Trainer(cfg, data=learnable_data(), quiet=True).fit()
    t = Trainer(dict(cfg, epochs=2), data=learnable_data(), quiet=True)
    t.resume(str(tmp_path / "run" / "checkpoint.npz"))
    assert t.strategy.stage["conv2"] == 1 and t.model.layer("conv2").reuse.H == 14


def test_cli_compare_prints_side_by_side_table(tmp_path):
    from cifar_fixture import write_cifar_fixture
    from test_train import run_cli
    write_cifar_fixture(str(tmp_path / "data"), n_per_batch=8, n_test=16)
    settings = tmp_path / "reuse.json"
    settings.write_text(json.dumps({"layers": {"conv2": {"L": 16, "H": 8}}}))
    r = run_cli("compare", "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "20",
                "--device", "cpu", "--out", str(tmp_path / "cmp"), "--reuse", "fixed",
                "--reuse-config", str(settings), "--quiet")
    assert r.returncode == 0, r.stderr
    for row in ("final test accuracy", "training time", "conv layers time", "conv2 mean r_c"):
        assert row in r.stdout
    saved = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert saved["reuse"]["layers"]["conv2"]["reuse_epochs"] == 1
    assert 0 < saved["reuse"]["layers"]["conv2"]["mean_r_c"] < 1
    assert saved["exact"]["layers"]["conv2"]["mean_r_c"] is None
