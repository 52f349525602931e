"""The parity protocol: exact and reuse runs per seed, re-used and resumed, with the spread."""
import importlib.util
import json
import os
import signal
import statistics

import pytest

from minireuse.tools import parity
from minireuse.training.trainer import Trainer

from cifar_fixture import write_cifar_fixture
from cli_helpers import learnable_data, run_cli

REUSE = {"layers": {"conv2": {"L": 16, "H": 8}}}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    """A tiny CIFAR copy (40 training, 16 test images) and a fixed-reuse settings file."""
    root = tmp_path_factory.mktemp("parity")
    write_cifar_fixture(str(root / "data"), n_per_batch=8, n_test=16)
    (root / "reuse.json").write_text(json.dumps(REUSE))
    (root / "reuse4.json").write_text(json.dumps({"layers": {"conv2": {"L": 16, "H": 4}}}))
    return root


def parity_cli(root, out, *extra, reuse_config="reuse.json", seeds="0,1"):
    return run_cli("parity", "--seeds", seeds, "--data", str(root / "data"), "--epochs", "1",
                   "--batch-size", "20", "--device", "cpu", "--reuse", "fixed",
                   "--reuse-config", str(root / reuse_config), "--out", str(out), "--quiet", *extra)


def mtimes(out):
    """{relative path: mtime in ns} of every history.json and checkpoint.npz under out."""
    found = {}
    for folder, _, files in os.walk(out):
        for name in files:
            if name in ("history.json", "checkpoint.npz"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, out)] = os.stat(path).st_mtime_ns
    return found


@pytest.fixture(scope="module")
def first_run(fixture_dir):
    out = fixture_dir / "par"
    r = parity_cli(fixture_dir, out)
    assert r.returncode == 0, r.stderr
    return out, r


def test_cli_prints_the_table_and_writes_per_seed_and_aggregate(first_run):
    out, r = first_run
    for row in ("test images: 16 (whole test set)", "mean +- std", "min / max", "conv2 exact/reuse",
                "time exact/reuse", "reuse stages", "L16H8 offset"):
        assert row in r.stdout, row
    lines = r.stdout.splitlines()
    assert any(l.startswith("0 ") and "trained/trained" in l for l in lines)
    assert any(l.startswith("1 ") and "trained/trained" in l for l in lines)

    saved = json.load(open(out / "parity.json"))
    assert saved["seeds"] == [0, 1] and saved["strategy"] == "fixed" and saved["test_images"] == 16
    assert saved["table"] in r.stdout
    per_seed = saved["per_seed"]
    assert [p["seed"] for p in per_seed] == [0, 1]
    for p in per_seed:
        s = p["seed"]
        for kind in ("exact", "reuse"):
            d = out / f"seed{s}" / kind
            assert sorted(os.listdir(d)) == ["checkpoint.npz", "history.json", "model.npz"]
            settings = json.load(open(d / "history.json"))["settings"]
            assert settings["seed"] == s and settings["reuse"] == ("off" if kind == "exact" else "fixed")
            assert p[f"{kind}_run"] == dict(dir=str(d), source="trained")
        e, re_ = p["exact"], p["reuse"]
        assert p["diff_final_pts"] == pytest.approx(100 * (re_["final_test_acc"] - e["final_test_acc"]))
        assert p["diff_best_pts"] == pytest.approx(100 * (re_["best_test_acc"] - e["best_test_acc"]))
        assert p["time_ratio"] == pytest.approx(e["train_seconds"] / re_["train_seconds"])
        conv2 = p["reuse_layers"]["conv2"]
        assert list(p["reuse_layers"]) == ["conv2"]       # the only layer with reuse
        assert conv2["exact_seconds"] == e["layers"]["conv2"]["seconds"] > 0
        assert conv2["ratio"] == pytest.approx(conv2["exact_seconds"] / conv2["reuse_seconds"])
        [stage] = p["stages"]["conv2"]
        assert stage["label"] == "L16H8 offset" and stage["epochs"] == 1 and stage["epoch_numbers"] == [1]
        assert 0 < stage["mean_r_c"] < 1 and stage["setting"]["L"] == 16
    # the two seeds are different runs
    assert per_seed[0]["exact"]["layers"]["conv2"]["seconds"] != per_seed[1]["exact"]["layers"]["conv2"]["seconds"]

    agg = saved["aggregate"]
    for key in ("diff_final_pts", "diff_best_pts"):
        vals = [p[key] for p in per_seed]
        assert agg[key] == pytest.approx(dict(mean=statistics.mean(vals), std=statistics.stdev(vals),
                                              min=min(vals), max=max(vals), n=2))
    assert agg["mean_exact_final_acc"] == pytest.approx(statistics.mean(p["exact"]["final_test_acc"]
                                                                        for p in per_seed))
    ex = sum(p["exact"]["train_seconds"] for p in per_seed)
    re_ = sum(p["reuse"]["train_seconds"] for p in per_seed)
    assert agg["train_seconds"] == pytest.approx(dict(exact=ex, reuse=re_, ratio=ex / re_))
    ex2 = sum(p["reuse_layers"]["conv2"]["exact_seconds"] for p in per_seed)
    re2 = sum(p["reuse_layers"]["conv2"]["reuse_seconds"] for p in per_seed)
    assert agg["layers"]["conv2"]["ratio"] == pytest.approx(ex2 / re2)


def test_second_invocation_reuses_the_complete_runs(first_run, fixture_dir):
    out, _ = first_run
    before = mtimes(out)
    assert len(before) == 8
    first = json.load(open(out / "parity.json"))
    r = parity_cli(fixture_dir, out)
    assert r.returncode == 0, r.stderr
    assert mtimes(out) == before                     # nothing trained again
    assert r.stderr.count("using the complete run") == 4 and "training into" not in r.stderr
    saved = json.load(open(out / "parity.json"))
    assert [p["exact_run"]["source"] for p in saved["per_seed"]] == ["reused", "reused"]
    assert [p["diff_final_pts"] for p in saved["per_seed"]] == [p["diff_final_pts"] for p in first["per_seed"]]
    assert saved["aggregate"] == first["aggregate"]
    assert "reused/reused" in r.stdout and saved["test_images"] == 16   # counted from the data


def test_run_dir_with_other_settings_is_refused(first_run, fixture_dir):
    out, _ = first_run
    before = mtimes(out)
    r = parity_cli(fixture_dir, out, "--lr", "0.1")
    assert r.returncode == 2 and r.stderr.startswith("error:")
    assert "lr: 0.05 there, 0.1 asked" in r.stderr and "seed0" in r.stderr
    assert mtimes(out) == before
    # another reuse setting: the exact runs would match, the reuse runs do not; refused before training
    r = parity_cli(fixture_dir, out, reuse_config="reuse4.json")
    assert r.returncode == 2 and "reuse_layers" in r.stderr and "'H': 8" in r.stderr and "'H': 4" in r.stderr
    assert "training into" not in r.stderr and mtimes(out) == before


def test_exact_from_reuses_the_exact_runs_of_another_out(first_run, fixture_dir):
    out, _ = first_run
    out2 = fixture_dir / "par_h4"
    before = mtimes(out)
    r = parity_cli(fixture_dir, out2, "--exact-from", str(out), reuse_config="reuse4.json")
    assert r.returncode == 0, r.stderr
    assert mtimes(out) == before
    assert not os.path.exists(out2 / "seed0" / "exact") and os.path.exists(out2 / "seed1" / "reuse" / "model.npz")
    assert f"exact runs from {out}" in r.stdout
    saved, first = json.load(open(out2 / "parity.json")), json.load(open(out / "parity.json"))
    assert saved["exact_from"] == str(out)
    for p, q in zip(saved["per_seed"], first["per_seed"]):
        assert p["exact_run"] == dict(dir=str(out / f"seed{p['seed']}" / "exact"), source="exact-from")
        assert p["reuse_run"]["source"] == "trained"
        assert p["exact"] == q["exact"]
        assert p["stages"]["conv2"][0]["label"] == "L16H4 offset"

    # exact runs with other settings, or a seed DIR does not have: refused before training
    r = parity_cli(fixture_dir, fixture_dir / "par_lr", "--exact-from", str(out), "--lr", "0.1")
    assert r.returncode == 2 and "lr: 0.05 there, 0.1 asked" in r.stderr
    r = parity_cli(fixture_dir, fixture_dir / "par_s5", "--exact-from", str(out), seeds="0,5")
    assert r.returncode == 2 and "--exact-from" in r.stderr and "seed5" in r.stderr
    assert not os.path.exists(fixture_dir / "par_s5") and not os.path.exists(fixture_dir / "par_lr")


@pytest.mark.parametrize("args,message", [
    (["--seeds", "1,1"], "listed twice"),
    (["--seeds", "a"], "comma-separated list of non-negative integers"),
    (["--seeds", "0,-1"], "non-negative"),
    (["--seeds", "0,,1"], "comma-separated"),
    (["--reuse", "off"], "argument --reuse: invalid choice: 'off'"),      # not offered by its --help
    (["--resume", "x.npz"], "unrecognized arguments: --resume"),       # parity resumes its own runs
    (["--seed", "3"], "error: parity trains one pair of runs per seed"),
])
def test_cli_bad_input_is_refused_before_training(tmp_path, args, message):
    r = run_cli("parity", "--data", str(tmp_path / "nothing"), "--device", "cpu", "--out", str(tmp_path / "o"),
                "--quiet", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    if "--seeds" in args:
        assert r.stderr.startswith("usage:")
    assert not os.path.exists(tmp_path / "o")


def small_config(out, **kw):
    cfg = dict(epochs=2, batch_size=16, lr=0.02, warmup_epochs=0.0, device="cpu", out=str(out),
               reuse="fixed", reuse_layers=REUSE["layers"])
    cfg.update(kw)
    return cfg


def test_interrupted_run_is_resumed_and_complete_ones_not_retrained(tmp_path, monkeypatch):
    data = learnable_data(n_train=64, n_test=32)
    real_step, steps = Trainer.run_step, []

    def step_then_interrupt(self, *args):
        steps.append(1)
        out = real_step(self, *args)
        if len(steps) == 6:          # seed 0's exact run, epoch 2 (4 steps an epoch), after step 2
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(Trainer, "run_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        parity.run(small_config(tmp_path / "p"), [0, 1], quiet=True, data=data)
    exact0 = tmp_path / "p" / "seed0" / "exact"
    assert len(json.load(open(exact0 / "history.json"))["epochs"]) == 1
    assert not os.path.exists(tmp_path / "p" / "seed0" / "reuse")
    monkeypatch.setattr(Trainer, "run_step", real_step)

    calls = {"fit": 0, "resume": []}
    real_fit, real_resume = Trainer.fit, Trainer.resume

    def fit(self):
        calls["fit"] += 1
        return real_fit(self)

    def resume(self, path):
        calls["resume"].append(path)
        return real_resume(self, path)
    monkeypatch.setattr(Trainer, "fit", fit)
    monkeypatch.setattr(Trainer, "resume", resume)
    res = parity.run(small_config(tmp_path / "p"), [0, 1], quiet=True, data=data)
    assert calls == {"fit": 4, "resume": [str(exact0 / "checkpoint.npz")]}
    assert [(p["exact_run"]["source"], p["reuse_run"]["source"]) for p in res["per_seed"]] == \
        [("resumed", "trained"), ("trained", "trained")]
    assert len(json.load(open(exact0 / "history.json"))["epochs"]) == 2
    assert res["test_images"] == 32 and res["train_images"] == 64

    # the resumed run is the uninterrupted one
    whole = parity.run(small_config(tmp_path / "q"), [0], quiet=True, data=data)
    assert whole["per_seed"][0]["exact"]["final_test_acc"] == res["per_seed"][0]["exact"]["final_test_acc"]
    hist = [json.load(open(tmp_path / d / "seed0" / "exact" / "history.json"))["epochs"] for d in ("p", "q")]
    # (the resumed epoch's train_loss and seconds cover only the steps after the resume: Trainer's records)
    assert hist[0][0]["train_loss"] == pytest.approx(hist[1][0]["train_loss"], rel=1e-9)
    assert [e["test_loss"] for e in hist[0]] == pytest.approx([e["test_loss"] for e in hist[1]], rel=1e-9)

    calls["fit"] = 0
    again = parity.run(small_config(tmp_path / "p"), [0, 1], quiet=True, data=data)
    assert calls["fit"] == 0
    assert again["aggregate"] == res["aggregate"]


def test_settings_rule():
    a = dict(Trainer.DEFAULTS, seed=1)
    same = dict(a, out="elsewhere", data="/other", device="gpu", graph="on", download=False, log_every=3)
    assert parity.settings_differences(a, same) == []
    diffs = parity.settings_differences(a, dict(a, lr=0.1, seed=2))
    assert [(k, s, w) for k, s, w in diffs] == [("lr", 0.05, 0.1), ("seed", 1, 2)]
    # a key a run saved before it existed is its default there; one Trainer does not know is absent
    older = {k: v for k, v in a.items() if k not in ("epochs", "eval_every")}
    assert parity.settings_differences(older, a) == []
    assert parity.settings_differences(older, dict(a, epochs=8, eval_every=0.5)) == [("epochs", 30, 8)]
    [(k, s, w)] = parity.settings_differences(a, dict(a, framework="pytorch"))
    assert k == "framework" and s is parity.ABSENT and w == "pytorch"
    # tuples and lists are the same once in JSON; reuse options ignored only when asked
    b = dict(a, decay_layers=("fc3", "fc4"), reuse_layers={"conv2": {"L": 8}})
    assert [d[0] for d in parity.settings_differences(a, b)] == ["reuse_layers"]
    assert parity.settings_differences(a, b, ignore=parity.REUSE_OPTION_SETTINGS) == []


def test_a_run_records_the_default_settings_it_ran(tmp_path):
    """reuse_layers null (the default) is saved as the ladder that ran, so a later default
    does not count as the same settings; an old checkpoint that saved null still resumes."""
    from minireuse.training.adaptive import DEFAULT_LADDERS, resolved_layers
    assert resolved_layers("adaptive", None) == json.loads(json.dumps(DEFAULT_LADDERS))
    assert resolved_layers("off", {"conv2": {"L": 8}}) is None
    assert resolved_layers("fixed", {"conv2": {"L": 8}}) == {"conv2": {"L": 8}}
    t = Trainer(dict(reuse="adaptive", out=str(tmp_path / "run")), data=learnable_data(), quiet=True)
    assert t.cfg["reuse_layers"] == resolved_layers("adaptive", None)
    older = {"conv2": [{"L": 32, "H": 32, "dx_mode": "cluster"}]}
    diffs = parity.settings_differences(dict(t.cfg, reuse_layers=older), t.cfg)
    assert [d[0] for d in diffs] == ["reuse_layers"]


def test_stages_group_epochs_by_setting_and_average_their_statistics():
    s1 = dict(L=64, H=32, family="offset", dx_mode="cluster", measure_error=False)
    s2 = dict(L=32, H=32, family="origin", shared_planes=False)
    hist = [dict(epoch=1, layers={"conv2": dict(reuse=s1, r_c=0.2, rel_error=0.1)}),
            dict(epoch=2, layers={"conv2": dict(reuse=s1, r_c=0.4, rel_error=None, dw_cos=0.9, dx_gain=0.3)}),
            dict(epoch=3, layers={"conv2": dict(reuse=s2, r_c=0.5, rel_error=0.3)}),
            dict(epoch=4, layers={"conv2": dict(reuse=None)})]
    st = parity.reuse_stages(hist, "conv2")
    assert [(s["label"], s["epochs"], s["epoch_numbers"]) for s in st] == [
        ("L64H32 offset dx=cluster", 2, [1, 2]), ("L32H32 origin shared=false", 1, [3]), ("exact", 1, [4])]
    assert st[0]["mean_r_c"] == pytest.approx(0.3) and st[0]["mean_rel_error"] == pytest.approx(0.1)
    assert st[0]["mean_dw_cos"] == pytest.approx(0.9) and st[1]["mean_dw_cos"] is None
    assert st[0]["mean_dx_gain"] == pytest.approx(0.3) and st[0]["mean_dx_cos"] is None
    assert st[2]["mean_r_c"] is None and st[2]["setting"] is None


def test_aggregate_from_per_seed_numbers():
    def entry(seed, ea, ra, es, rs, e2, r2):
        run = lambda acc, sec, c2: dict(final_test_acc=acc, best_test_acc=acc + 0.01, train_seconds=sec,
                                        layers={"conv2": dict(seconds=c2)})
        return dict(seed=seed, exact=run(ea, es, e2), reuse=run(ra, rs, r2),
                    diff_final_pts=100 * (ra - ea), diff_best_pts=100 * (ra - ea),
                    reuse_layers={"conv2": dict(exact_seconds=e2, reuse_seconds=r2)})
    per_seed = [entry(0, 0.70, 0.71, 10.0, 8.0, 4.0, 2.0), entry(1, 0.72, 0.69, 12.0, 9.0, 5.0, 2.0),
                entry(2, 0.71, 0.73, 11.0, 7.0, 3.0, 1.0)]
    agg = parity.aggregate(per_seed)
    d = agg["diff_final_pts"]
    assert d["mean"] == pytest.approx(0.0) and d["min"] == pytest.approx(-3.0) and d["max"] == pytest.approx(2.0)
    assert d["std"] == pytest.approx(statistics.stdev([1.0, -3.0, 2.0])) and d["n"] == 3
    assert agg["mean_reuse_final_acc"] == pytest.approx(0.71)
    assert agg["mean_exact_best_acc"] == pytest.approx(0.72)
    assert agg["train_seconds"]["ratio"] == pytest.approx(33.0 / 24.0)
    assert agg["layers"]["conv2"]["ratio"] == pytest.approx(12.0 / 5.0)
    assert parity.spread([1.5])["std"] == 0.0


def test_control_layers_keep_the_hashing_and_take_the_exact_gradients():
    got = parity.control_layers({"conv2": [{"L": 64, "H": 32, "dx_mode": "cluster", "forward": "reuse"},
                                           {"L": 32, "H": 8}],
                                 "fc3": {"L": 16, "H": 12, "family": "pca", "enabled": False}})
    assert got == {"conv2": [{"L": 64, "H": 32, "dx_mode": "exact", "forward": "exact", "dw_sample": 1.0,
                              "enabled": True}],
                   "fc3": [{"L": 16, "H": 12, "family": "pca", "dx_mode": "exact", "forward": "exact",
                            "dw_sample": 1.0, "enabled": True}]}


def test_control_runs_beside_the_pairs_and_report_the_noise_floor(first_run, fixture_dir):
    out, _ = first_run
    out2 = fixture_dir / "par_control"
    r = parity_cli(fixture_dir, out2, "--control", "--exact-from", str(out))
    assert r.returncode == 0, r.stderr
    assert "control (exact gradients through the reuse code" in r.stdout
    saved = json.load(open(out2 / "parity.json"))
    assert saved["control"] is True
    for p in saved["per_seed"]:
        d = out2 / f"seed{p['seed']}" / "control"
        settings = json.load(open(d / "history.json"))["settings"]
        assert settings["reuse"] == "fixed" and settings["reuse_layers"] == {
            "conv2": [{"L": 16, "H": 8, "forward": "exact", "dx_mode": "exact", "dw_sample": 1.0, "enabled": True}]}
        assert p["control_run"] == dict(dir=str(d), source="trained")
        e, re_, co = p["exact"], p["reuse"], p["control"]
        assert p["control_diff_pts"] == pytest.approx(100 * (co["final_test_acc"] - e["final_test_acc"]))
        assert p["reuse_vs_control_pts"] == pytest.approx(100 * (re_["final_test_acc"] - co["final_test_acc"]))
        # the control computes what exact computes, up to rounding: the same test accuracy on this fixture
        assert abs(co["final_test_acc"] - e["final_test_acc"]) <= 1 / 16 + 1e-9
    vals = [p["control_diff_pts"] for p in saved["per_seed"]]
    assert saved["aggregate"]["control_diff_pts"]["mean"] == pytest.approx(statistics.mean(vals))
    r = parity_cli(fixture_dir, out2, "--control", "--exact-from", str(out))     # complete: nothing retrained
    assert r.returncode == 0 and r.stderr.count("using the complete run") == 6
    assert "control - exact" in r.stdout


def test_time_to_accuracy_from_the_evaluations_of_each_run():
    """Mid-epoch evaluations count with the epoch's seconds so far; targets are exact's final
    minus 0.3 and 1.0 points and the levels given; sums over seeds only where every seed got there."""
    def history(points):          # [(mid acc or None, end acc)] per epoch of 10 s
        return [dict(epoch=i + 1, seconds=10.0, test_acc=end, mid_evals=[] if mid is None else
                     [dict(epoch=i + 0.5, step=5, seconds=4.0, test_acc=mid)]) for i, (mid, end) in enumerate(points)]
    exact = history([(0.30, 0.50), (0.55, 0.600)])
    reuse = history([(0.40, 0.598), (None, 0.599)])
    curve = parity.accuracy_curve(exact)
    assert curve == [(0.5, 4.0, 0.30), (1, 10.0, 0.50), (1.5, 14.0, 0.55), (2, 20.0, 0.60)]
    targets = parity.seed_targets(0.60, [50])
    assert [label for label, _ in targets] == ["exact - 0.3 pts", "exact - 1 pts", "50 %"]
    got = parity.time_to_targets({"exact": curve, "reuse": parity.accuracy_curve(reuse)}, targets)
    assert [t["seconds"] for t in got] == [{"exact": 20.0, "reuse": 10.0}, {"exact": 20.0, "reuse": 10.0},
                                           {"exact": 10.0, "reuse": 10.0}]
    assert got[0]["ratio_vs_exact"] == {"exact": 1.0, "reuse": 2.0}
    assert parity.time_to(curve, 0.61) is None
    late = parity.time_to_targets({"exact": curve, "reuse": [(1, 30.0, 0.2)]}, targets)
    agg = parity.aggregate_targets([dict(time_to_targets=got), dict(time_to_targets=late)])
    assert agg[0]["reached"] == {"exact": 2, "reuse": 1} and agg[0]["seconds"] == {"exact": 40.0, "reuse": None}


def test_step_time_curves_time_each_epoch_by_the_steps_of_its_setting():
    """--step-ms: an epoch costs steps x the milliseconds of exact, or of reuse where a layer
    reused at its end; a mid-epoch evaluation its share of that."""
    def epoch(i, reused, acc, mid=None):
        return dict(epoch=i, seconds=999.0, test_acc=acc, layers={"conv2": {"reuse": {"L": 64} if reused else None},
                                                                  "fc3": {"reuse": None}},
                    mid_evals=[] if mid is None else [dict(epoch=i - 0.5, step=5, seconds=1.0, test_acc=mid)])
    history = [epoch(1, False, 0.3), epoch(2, True, 0.5, mid=0.4), epoch(3, False, 0.6)]
    curve = parity.step_time_curve(history, 10, 100.0, 40.0)
    assert [c[0] for c in curve] == [1, 1.5, 2, 3] and [c[2] for c in curve] == [0.3, 0.4, 0.5, 0.6]
    assert [c[1] for c in curve] == pytest.approx([1.0, 1.2, 1.4, 2.4])
    # without reuse_ms (exact, PyTorch) every epoch is timed alike
    assert [t for _, t, _ in parity.step_time_curve(history, 10, 100.0)] == pytest.approx([1.0, 1.5, 2.0, 3.0])


def test_parity_times_the_curves_by_steps_with_step_ms(first_run, fixture_dir):
    out, _ = first_run
    before = mtimes(out)
    r = parity_cli(fixture_dir, out, "--step-ms", "exact=100,reuse=40")
    assert r.returncode == 0, r.stderr
    assert mtimes(out) == before                         # nothing trained again
    assert "steps x exact 100, reuse 40 ms per step" in r.stdout
    saved = json.load(open(out / "parity.json"))
    assert saved["step_ms"] == {"exact": 100.0, "reuse": 40.0}
    for seed in saved["per_seed"]:                       # 40 images, batch 20: 2 steps; reuse fixed from step 0
        assert [t for _, t, _ in seed["curves"]["exact"]] == pytest.approx([0.2])
        assert [t for _, t, _ in seed["curves"]["reuse"]] == pytest.approx([0.08])
    r = parity_cli(fixture_dir, out, "--step-ms", "exact=100", "--pytorch", "0")
    assert r.returncode == 2 and "expected at least exact=MS,reuse=MS" in r.stderr
    r = parity_cli(fixture_dir, out, "--step-ms", "exact=100,reuse=40", "--pytorch", "0")
    assert r.returncode == 2 and "--step-ms needs pytorch=MS too" in r.stderr


def test_eval_every_targets_and_pytorch_reuse_the_runs_made_without_them(first_run, fixture_dir, monkeypatch):
    """A protocol started before --eval-every existed (no eval_every in its settings) is reused
    as it is; --pytorch adds the PyTorch run of one seed as a row of the table and the figure,
    or says why it was skipped."""
    out, _ = first_run
    for hist in out.glob("seed*/*/history.json"):       # runs saved before the setting existed
        saved = json.load(open(hist))
        del saved["settings"]["eval_every"]
        hist.write_text(json.dumps(saved))
    before = mtimes(out)
    r = parity_cli(fixture_dir, out, "--eval-every", "0.5", "--targets", "10,90", "--pytorch", "0")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("using the complete run") == 4
    assert {k: v for k, v in mtimes(out).items() if "pytorch" not in k} == before
    assert "time to accuracy" in r.stdout and "90 % (90.00%)" in r.stdout and "figure: " in r.stdout
    saved = json.load(open(out / "parity.json"))
    seed0, seed1 = saved["per_seed"]
    assert [t["label"] for t in seed0["time_to_targets"]] == ["exact - 0.3 pts", "exact - 1 pts", "10 %", "90 %"]
    assert len(seed0["curves"]["exact"]) == 1 and (out / parity.FIGURE).exists()
    if importlib.util.find_spec("torch") is None:      # the optional extra is not installed here
        assert "pytorch: skipped: " in r.stdout and saved["pytorch"]["skipped"]
        assert set(seed0["curves"]) == {"exact", "reuse"}
    else:
        assert "seed 0 pytorch: training into" in r.stderr and "the same recipe in PyTorch" in r.stdout
        assert set(seed0["curves"]) == {"exact", "reuse", "pytorch"} and set(seed1["curves"]) == {"exact", "reuse"}
        assert len(seed0["curves"]["pytorch"]) == 2                 # mid and end of its epoch
        assert saved["pytorch"] == {"seeds": [0]}
    monkeypatch.setattr("minireuse.tools.pytorch_run.torch_missing", lambda: "PyTorch does not import (test)")
    res = parity.run(dict(Trainer.DEFAULTS, data=str(fixture_dir / "data"), epochs=1, batch_size=20, device="cpu",
                          reuse="fixed", reuse_layers=REUSE["layers"], reuse_options={}, out=str(out)), [0, 1], quiet=True,
                     pytorch=True)
    assert res["pytorch"] == {"skipped": "PyTorch does not import (test)"}
    assert "pytorch: skipped: PyTorch does not import (test)" in res["table"]


def test_step_ms_times_the_reuse_runs_exact_epochs_at_exacts_milliseconds():
    """The reuse run's warm-up and exact tail cost exact's step time, not reuse's."""
    def epoch(i, reused):
        return dict(epoch=i, seconds=999.0, test_acc=0.1 * i, mid_evals=[],
                    layers={"conv2": {"reuse": {"L": 64} if reused else None}})
    history = [epoch(1, False), epoch(2, True), epoch(3, True), epoch(4, False)]
    step_ms = {"exact": 100.0, "reuse": 40.0, "pytorch": 300.0}
    times = {kind: [t for _, t, _ in parity.run_step_curve(kind, history, 10, step_ms)]
             for kind in ("exact", "reuse", "control", "pytorch")}
    assert times["reuse"] == pytest.approx([1.0, 1.4, 1.8, 2.8])
    assert times["exact"] == times["control"] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert times["pytorch"] == pytest.approx([3.0, 6.0, 9.0, 12.0])
