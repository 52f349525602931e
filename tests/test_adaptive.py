"""Reuse strategies (fixed, schedule, adaptive) and reuse statistics in training runs."""
import json

import pytest

from minireuse.models import cifarnet
from minireuse.reuse import ReuseConfig
from minireuse.training.adaptive import (AdaptiveStrategy, FixedStrategy, ScheduleStrategy, load_settings,
                                         make_strategy)
from minireuse.training.probes import stage_errors
from minireuse.training.trainer import Trainer

from cli_helpers import config, learnable_data

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


def started(ladder=LADDER, **options):
    """An adaptive strategy attached to a CifarNet that has already started reusing."""
    model = cifarnet()
    s = AdaptiveStrategy(ladder, start_after=0.0, steady_drop=None, **options)
    s.attach(model)
    s.on_step(0.0)
    return model, s


def test_adaptive_waits_for_the_warm_up_and_a_falling_loss():
    model = cifarnet()
    s = AdaptiveStrategy(LADDER, steady_drop=0.02)
    s.configure(0.125)                                   # warm-up ends after 1 epoch of 8
    s.attach(model)
    s.on_step(0.0)
    assert model.layer("conv2").reuse is None and "waiting" in s.describe()
    assert not s.measure_error_now(0)
    s.on_epoch_end(0.125, 2.0, {})                      # the warm-up epoch itself: never
    assert model.layer("conv2").reuse is None
    s.on_epoch_end(0.25, 1.99, {})                      # fell 0.5 % < 2 %: not steadily
    assert model.layer("conv2").reuse is None
    s.on_epoch_end(0.375, 1.80, {})                     # fell 9.5 %: reuse starts
    assert model.layer("conv2").reuse == ReuseConfig(L=32, H=8)
    assert "reuse starts" in s.events[-1]["reason"] and s.measure_error_now(0)


def test_adaptive_harm_moves_the_layer_towards_exact():
    model, s = started(harm_bound=0.03)
    s.on_epoch_end(0.3, 1.5, {"conv2": {"rel_error": 0.2}}, harm=0.01)   # under the bound: stay
    assert s.stage["conv2"] == 0
    s.on_epoch_end(0.4, 1.4, {"conv2": {"rel_error": 0.2}}, harm=0.05)
    assert s.stage["conv2"] == 1 and model.layer("conv2").reuse.L == 16
    assert "raised the sampled loss" in s.events[-1]["reason"]


def test_a_loss_rising_under_reuse_moves_towards_exact_never_further():
    model, s = started()
    s.on_epoch_end(0.3, 1.5, {})
    s.on_epoch_end(0.4, 1.6, {})                        # rose: less approximation, not more
    assert s.stage["conv2"] == 1 and "loss rose" in s.events[-1]["reason"]
    s.on_epoch_end(0.5, 1.7, {})
    assert model.layer("conv2").reuse is None


def test_error_cap_is_off_by_default():
    _, s = started()
    s.on_epoch_end(0.5, 1.0, {"conv2": {"rel_error": 0.9}})
    assert s.stage["conv2"] == 0
    _, s = started(error_bound=0.3)
    s.on_epoch_end(0.5, 1.0, {"conv2": {"rel_error": 0.4}})
    assert s.stage["conv2"] == 1 and "sampled error" in s.events[-1]["reason"]


def test_ladders_are_put_in_order_of_decreasing_error():
    model, s = started()
    assert s.wants_ladder_order() == ["conv2"]
    s.set_ladder_order({"conv2": [0.1, 0.3]})           # the second stage is the rougher one
    assert [c.L for c in s.ladders["conv2"]] == [16, 32] and s.wants_ladder_order() == []
    s.apply()
    assert model.layer("conv2").reuse.L == 16 and "ordered by measured error" in s.events[-1]["reason"]


def test_stage_errors_fall_with_more_bits_and_leave_the_layer_alone():
    import numpy as np
    model = cifarnet()
    conv2 = model.layer("conv2")
    conv2.set_reuse(dict(L=16, H=6))
    state = conv2.reuse_state
    x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    errs = stage_errors(model, x, "conv2", [ReuseConfig(L=16, H=4), ReuseConfig(L=16, H=24)])
    assert errs[0] > errs[1] > 0
    assert conv2.reuse == ReuseConfig(L=16, H=6) and conv2.reuse_state is state and state.stats == []


def test_describe_shows_a_disabled_stage_as_exact():
    model = cifarnet()
    s = ScheduleStrategy({"conv2": [dict(L=16, H=8, enabled=False), dict(L=64, H=32, dx_mode="cluster")]},
                         boundaries=[0.0, 0.5, 0.9])
    s.attach(model)
    s.on_step(0.1)
    assert s.describe() == "conv2:exact"
    s.on_step(0.6)
    assert s.describe() == "conv2:L64H32,offset,dx=cluster"


def test_adaptive_never_keeps_reuse_slower_than_exact():
    model, s = started()
    s.on_epoch_end(0.1, 2.0, {"conv2": {"step_ms": 12.0, "exact_probe_ms": 10.0, "rel_error": 0.01}})
    assert model.layer("conv2").reuse is not None                  # one slow epoch may be noise
    s.on_epoch_end(0.2, 1.9, {"conv2": {"step_ms": 12.0, "exact_probe_ms": 10.0, "rel_error": 0.01}})
    assert model.layer("conv2").reuse is None and "slower than exact" in s.events[-1]["reason"]
    assert "for 2 epochs" in s.events[-1]["reason"]


def test_speed_guard_needs_slow_epochs_in_a_row_beyond_the_margin():
    model, s = started()
    for ms in (10.4, 10.4, 10.4, 12.0, 9.0, 12.0):                # within 5 %, or not in a row
        s.on_epoch_end(0.1, 2.0, {"conv2": {"step_ms": ms, "exact_probe_ms": 10.0}})
        assert model.layer("conv2").reuse is not None
    s.on_epoch_end(0.1, 2.0, {"conv2": {"step_ms": 12.0}})        # no exact time this epoch: no verdict
    assert model.layer("conv2").reuse is not None
    restored = AdaptiveStrategy(LADDER)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.slow_epochs == {"conv2": 1}                    # the count survives a resume
    _, strict = started(speed_patience=1, speed_margin=0.0)
    strict.on_epoch_end(0.1, 2.0, {"conv2": {"step_ms": 10.1, "exact_probe_ms": 10.0}})
    assert "slower than exact" in strict.events[-1]["reason"]
    with pytest.raises(ValueError, match="adaptive option speed_patience must be a positive integer, got 0"):
        AdaptiveStrategy(LADDER, speed_patience=0)
    with pytest.raises(ValueError, match="adaptive option speed_margin must be a finite number >= 0, got -0.1"):
        AdaptiveStrategy(LADDER, speed_margin=-0.1)


def test_a_checkpoint_from_before_the_paired_speed_guard_still_loads():
    """Strategy state saved when exact was timed once, on the first batch (exact_ms), and
    before probe_every existed: it loads, and the guard waits for this epoch's exact times."""
    old = {"stage": {"conv2": 0}, "events": [], "prev_loss": 1.9, "exact_ms": {"conv2": 394.3},
           "slow_epochs": {"conv2": 1}, "rising_epochs": 0, "started": True, "ordered": True,
           "start_after": 0.125, "ladders": {"conv2": [ReuseConfig(L=32, H=8).as_dict()]}}
    model = cifarnet()
    s = AdaptiveStrategy(LADDER)
    s.attach(model)
    s.load_state_dict(old)
    s.apply()
    s.on_epoch_end(0.5, 1.8, {"conv2": {"step_ms": 693.5}})
    assert model.layer("conv2").reuse is not None and s.slow_epochs == {"conv2": 1}
    assert s.probe_now(49, 50) == ["conv2"] and s.probe_now(1, 50) == []


def test_probes_of_the_speed_guard_change_nothing_trained(tmp_path):
    """A reuse run whose exact layers are timed on every step trains bit for bit like the same
    run without the speed guard (the margin keeps the guard from acting)."""
    import numpy as np
    from cli_helpers import params
    data = learnable_data(n_train=64, n_test=16)
    runs = []
    for name, guard in (("guarded", True), ("unguarded", False)):
        t = Trainer(config(tmp_path, epochs=1, out=str(tmp_path / name), reuse="adaptive",
                           reuse_layers={"conv2": dict(L=16, H=8)},
                           reuse_options=dict(start_after=0.0, steady_drop=None, speed_guard=guard,
                                              probe_every=1, speed_margin=1e6)), data=data, quiet=True)
        t.fit()
        runs.append(t)
    rec = runs[0].history[-1]["layers"]["conv2"]
    assert rec["paired_probes"] == 2 and rec["exact_probes"] == 4      # 2 steps, exact twice per probe
    a, b = params(runs[0].model), params(runs[1].model)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_strategy_state_round_trip():
    _, a = started()
    a.set_ladder_order({"conv2": [0.1, 0.3]})
    a.on_epoch_end(0.5, 1.0, {"conv2": {"rel_error": 0.9}}, harm=0.5)
    b = AdaptiveStrategy(LADDER)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.stage == a.stage and b.prev_loss == a.prev_loss and b.events == a.events
    assert b.started and b.ladders == a.ladders and b.wants_ladder_order() == []


def test_settings_validation(tmp_path):
    with pytest.raises(ValueError, match="does not have"):
        make_strategy("fixed", {"conv9": dict(L=4)}).attach(cifarnet())
    with pytest.raises(ValueError, match="ReuseConfig.H"):
        make_strategy("schedule", {"conv2": [dict(L=16, H=80)]})
    with pytest.raises(ValueError, match="unknown reuse strategy"):
        make_strategy("sometimes")
    with pytest.raises(ValueError, match=r"\['plateau'\] are not options of the 'adaptive' strategy"):
        make_strategy("adaptive", None, {"plateau": 0.01})
    with pytest.raises(ValueError, match="harm_bound"):
        make_strategy("adaptive", None, {"harm_bound": float("nan")})
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"layers": {"conv2": [{"L": 16, "H": 8}]}, "options": {"harm_bound": 0.02}}))
    layers, options = load_settings(str(path))
    assert layers == {"conv2": [{"L": 16, "H": 8}]} and options == {"harm_bound": 0.02}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read reuse settings"):
        load_settings(str(path))


def test_training_records_reuse_statistics_per_layer(tmp_path):
    cfg = config(tmp_path, epochs=2, reuse="adaptive",
                 reuse_layers={"conv2": [dict(L=16, H=10), dict(L=16, H=16)]},
                 reuse_options=dict(sample_every=2, exact_tail=0.5, speed_guard=False, start_after=0.0,
                                    steady_drop=None))
    t = Trainer(cfg, data=learnable_data(), quiet=True)
    hist = t.fit()
    first, last = hist[0]["layers"]["conv2"], hist[1]["layers"]["conv2"]
    assert first["reuse"]["L"] == 16 and 0 < first["r_c"] < 1
    assert first["rel_error"] is not None and first["rel_error"] > 0
    assert first["forward_ms"] > 0 and first["backward_ms"] > 0
    assert last["reuse"] is None                          # exact tail: the second half is exact
    assert hist[0]["layers"]["conv1"]["reuse"] is None and hist[0]["layers"]["conv1"]["forward_ms"] > 0
    assert any(e["reason"] == "exact tail" for e in hist[1]["reuse_events"])
    assert hist[0]["reuse_harm"] is not None and abs(hist[0]["reuse_harm"]) < 1.0
    assert hist[1]["reuse_harm"] is None                 # exact: nothing sampled
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
    from cli_helpers import run_cli
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


def test_strategy_probes_draw_no_training_randomness(tmp_path):
    """An adaptive run that never starts reusing (its speed probe and exact timing run on
    step 0) trains bit for bit like the exact run: the comparison is paired."""
    import numpy as np
    from cli_helpers import params
    data = learnable_data()
    exact = Trainer(config(tmp_path, out=str(tmp_path / "e")), data=data, quiet=True)
    exact.fit()
    waiting = Trainer(config(tmp_path, out=str(tmp_path / "w"), reuse="adaptive",
                             reuse_layers={"conv2": dict(L=16, H=8)}, reuse_options=dict(steady_drop=0.99)),
                      data=data, quiet=True)
    waiting.fit()
    assert not waiting.strategy.started
    a, b = params(exact.model), params(waiting.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_default_ladder_trains_with_reuse_in_conv2s_backward(tmp_path):
    """The ladder `make cifar` uses, end to end: conv2 hashed and clustered for dW, its output and dX exact."""
    cfg = config(tmp_path, epochs=1, reuse="adaptive",
                 reuse_options=dict(start_after=0.0, steady_drop=None, speed_guard=False, exact_tail=0.0,
                                    sample_every=2))
    t = Trainer(cfg, data=learnable_data(), quiet=True)
    epoch = t.fit()[0]
    rec = epoch["layers"]["conv2"]
    assert rec["reuse"]["forward"] == "exact" and rec["reuse"]["dx_mode"] == "exact"
    assert epoch["reuse_harm"] is None              # the forward is exact: no exact forward to compare
    assert 0 < rec["r_c"] < 1 and rec["pixel_aligned"] == 1.0
    assert rec["rel_error"] == 0.0 and 0 < rec["dw_cos"] < 1


def test_each_model_has_reuse_defaults_on_its_own_layers():
    from minireuse.models import MODELS
    from minireuse.training.adaptive import make_strategy
    for name in ("cifarnet", "alexnet", "vgg19"):
        model = MODELS[name](seed=0)
        for kind in ("fixed", "adaptive"):
            strategy = make_strategy(kind, model=name)
            for layer in strategy.ladders:
                model.layer(layer)                  # every default names a layer of the model
    assert set(make_strategy("adaptive", model="vgg19").ladders) == {"conv1_2", "conv2_1"}


def test_rise_patience_waits_for_rising_epochs_in_a_row():
    model, s = started(rise_patience=2)
    s.on_epoch_end(0.3, 1.5, {})
    s.on_epoch_end(0.4, 1.6, {})                        # one rise: wait
    assert s.stage["conv2"] == 0
    s.on_epoch_end(0.5, 1.4, {})                        # fell: the count starts again
    s.on_epoch_end(0.55, 1.45, {})
    restored = AdaptiveStrategy(LADDER, rise_patience=2)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.rising_epochs == 1                  # the count survives a resume
    s.on_epoch_end(0.6, 1.5, {})                        # the second rise in a row
    assert s.stage["conv2"] == 1 and "2 epochs in a row" in s.events[-1]["reason"]
    assert s.rising_epochs == 0
    with pytest.raises(ValueError, match="adaptive option rise_patience must be a positive integer, got 0"):
        AdaptiveStrategy(LADDER, rise_patience=0)


class FakeClock:
    """What minireuse.timing reads as ``time``: a clock that moves only while conv2 computes,
    by its cost (exact or reuse, in ms) times the machine's load of the current epoch."""

    def __init__(self, reuse_cost, loads):
        self.now, self.reuse_cost, self.loads, self.load = 0.0, reuse_cost, loads, loads[0]

    def perf_counter(self):
        return self.now

    def run(self, layer, fn, *args, **kw):
        self.now += 1e-3 * self.load * (self.reuse_cost if layer.reuse is not None else 1.0)
        return fn(*args, **kw)


def run_under_clock(tmp_path, monkeypatch, reuse_cost, loads, step_load=None, batch_size=32, **options):
    """An adaptive run of len(loads) epochs reusing conv2's forward from the first step, only
    the speed guard able to end it, conv2 timed by a FakeClock; returns the trainer.
    step_load(step): the load of a step, times its epoch's."""
    import minireuse.timing
    clock = FakeClock(reuse_cost, loads)
    monkeypatch.setattr(minireuse.timing, "time", clock)
    cfg = config(tmp_path, epochs=len(loads), batch_size=batch_size, reuse="adaptive",
                 reuse_layers={"conv2": dict(L=16, H=8)},
                 reuse_options=dict(start_after=0.0, steady_drop=None, exact_tail=0.0, harm_bound=None,
                                    rise_patience=100, **options))
    t = Trainer(cfg, data=learnable_data(n_train=64, n_test=16), quiet=True)
    conv2 = t.model.layer("conv2")
    for name in ("forward", "backward"):
        monkeypatch.setattr(conv2, name, lambda *a, fn=getattr(conv2, name), **kw: clock.run(conv2, fn, *a, **kw))
    run_step = t.run_step

    def loaded_step(xb, yb, epoch, step, steps):
        clock.load = loads[epoch] * (step_load(step) if step_load else 1.0)
        return run_step(xb, yb, epoch, step, steps)
    monkeypatch.setattr(t, "run_step", loaded_step)
    t.fit()
    return t


def test_speed_guard_ignores_a_slowdown_common_to_reuse_and_exact(tmp_path, monkeypatch):
    """The machine gets twice as slow after the first epoch (another job starts): reuse, at 0.6
    of exact's time, is still faster than exact timed under the same load, so it goes on."""
    t = run_under_clock(tmp_path, monkeypatch, reuse_cost=0.6, loads=[1.0, 2.0, 2.0])
    assert not any("slower than exact" in e["reason"] for e in t.strategy.events), t.strategy.events
    assert all(e["layers"]["conv2"]["reuse"] is not None for e in t.history)
    last = t.history[-1]["layers"]["conv2"]
    assert last["exact_probe_ms"] == pytest.approx(4.0) and last["step_ms"] < 4.0


def test_speed_guard_ignores_a_load_that_comes_and_goes_within_an_epoch(tmp_path, monkeypatch):
    """Another job runs during most steps of each epoch but not during the probes (what ended
    reuse after two epochs in a full-data run): reuse at 0.6 of exact's time is faster in every
    probe's A/B, so it goes on, though its epoch mean is far above the probes' mean."""
    t = run_under_clock(tmp_path, monkeypatch, reuse_cost=0.6, loads=[1.0, 1.0, 1.0], batch_size=8,
                        step_load=lambda step: 1.0 if step in (0, 4, 7) else 4.0, probe_every=4, sample_every=1000)
    assert not any("slower than exact" in e["reason"] for e in t.strategy.events), t.strategy.events
    assert all(e["layers"]["conv2"]["reuse"] is not None for e in t.history)
    for e in t.history:
        rec = e["layers"]["conv2"]
        assert rec["step_ms"] > 1.5 * rec["exact_probe_ms"]      # the epoch means alone would end reuse
        # probes on steps 0, 4 and 7, each timing exact and reuse in turns under its step's load
        assert rec["reuse_vs_exact"] == pytest.approx(0.6) and rec["paired_probes"] == 3


def test_speed_guard_still_ends_reuse_that_is_slower_than_exact(tmp_path, monkeypatch):
    t = run_under_clock(tmp_path, monkeypatch, reuse_cost=1.5, loads=[2.0, 2.0, 2.0])
    slow = [e for e in t.strategy.events if "slower than exact" in e["reason"]]
    assert [e["epoch"] for e in slow] == [2] and "for 2 epochs" in slow[0]["reason"]
    assert t.history[-1]["layers"]["conv2"]["reuse"] is None


def test_probes_time_the_backward_on_the_dy_of_the_previous_probes_step(tmp_path, monkeypatch):
    """The speed guard's passes take as dY what the layer received in training at the previous
    probe (as sparse as training makes it), not the layer's own output; the first probe, with
    none seen yet, takes the output."""
    import numpy as np
    from minireuse.layers import Conv2D
    from minireuse.training import probes
    received = []                   # (in a probe pass?, dY) of every conv2 backward
    in_probe = []
    real_backward, real_pass = Conv2D.backward, probes.StrategySteps._timed_pass

    def backward(layer, dy):
        if layer.name == "conv2":
            received.append((bool(in_probe), dy))
        return real_backward(layer, dy)

    def timed_pass(self, *a, **k):
        in_probe.append(1)
        try:
            return real_pass(self, *a, **k)
        finally:
            in_probe.pop()
    monkeypatch.setattr(Conv2D, "backward", backward)
    monkeypatch.setattr(probes.StrategySteps, "_timed_pass", timed_pass)
    t = Trainer(config(tmp_path, epochs=1, out=str(tmp_path / "run"), reuse="adaptive",
                       reuse_layers={"conv2": dict(L=16, H=8)},
                       reuse_options=dict(start_after=0.0, steady_drop=None, probe_every=1, speed_margin=1e6)),
                data=learnable_data(n_train=64, n_test=16), quiet=True)
    t.fit()
    # per step: 4 probe passes, then the training step's backward
    steps = [received[i:i + 5] for i in range(0, len(received), 5)]
    assert len(steps) == 2 and all([p for p, _ in s] == [True] * 4 + [False] for s in steps)
    first_probe, second_probe = steps[0][:4], steps[1][:4]
    assert all(not np.array_equal(dy, steps[0][4][1]) for _, dy in first_probe)
    assert all(dy is steps[0][4][1] for _, dy in second_probe)
    assert "backward" not in vars(t.model.layer("conv2"))      # the noting ends with the step
