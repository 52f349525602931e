"""Trainer and CLI: learning, checkpoints, exact resume, clear errors."""
import json
import os
import signal

import numpy as np
import pytest

from minireuse.training.trainer import Trainer, TrainingError, load_checkpoint

from cifar_fixture import write_cifar_fixture
from cli_helpers import config, learnable_data, params, run_cli


def test_short_run_lowers_the_loss(tmp_path):
    t = Trainer(config(tmp_path, epochs=3, augment=False), data=learnable_data(), quiet=True)
    hist = t.fit()
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.2
    assert hist[-1]["test_acc"] > 0.5  # chance is 0.25
    saved = json.load(open(tmp_path / "run" / "history.json"))
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2, 3]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_s"):
        assert key in saved["epochs"][0]
    assert saved["settings"]["batch_size"] == 32 and saved["device"].startswith("cpu")
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.npz", "history.json", "model.npz"]


def test_resume_continues_exactly(tmp_path):
    # a constant rate, so that a 1-epoch run is the first epoch of the 2-epoch one
    data = learnable_data()
    full = Trainer(config(tmp_path, out=str(tmp_path / "a"), schedule="constant"), data=data, quiet=True)
    full.fit()
    first = Trainer(config(tmp_path, out=str(tmp_path / "b"), epochs=1, schedule="constant"), data=data, quiet=True)
    first.fit()
    second = Trainer(config(tmp_path, out=str(tmp_path / "b"), schedule="constant"), data=data, quiet=True)
    second.resume(str(tmp_path / "b" / "checkpoint.npz"))
    second.fit()
    a, b = params(full.model), params(second.model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [e["train_loss"] for e in full.history] == [e["train_loss"] for e in second.history]


def test_ctrl_c_saves_and_resume_is_exact(tmp_path, monkeypatch):
    data = learnable_data()
    full = Trainer(config(tmp_path, out=str(tmp_path / "a")), data=data, quiet=True)
    full.fit()

    t = Trainer(config(tmp_path, out=str(tmp_path / "b")), data=data, quiet=True)
    real_step, calls = t.run_step, []

    def step_then_interrupt(*args):
        calls.append(1)
        out = real_step(*args)
        if len(calls) == 9:  # the 3rd step of epoch 2 (6 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(t, "run_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="after step 3"):
        t.fit()
    meta = load_checkpoint(str(tmp_path / "b" / "checkpoint.npz"), t.model, t.opt)
    assert (meta["epoch"], meta["step"]) == (1, 3)

    resumed = Trainer(config(tmp_path, out=str(tmp_path / "b")), data=data, quiet=True)
    resumed.resume(str(tmp_path / "b" / "checkpoint.npz"))
    resumed.fit()
    a, b = params(full.model), params(resumed.model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the interrupted epoch reports all its steps, those before the checkpoint too
    for key in ("train_loss", "train_acc", "test_acc"):
        assert [e[key] for e in resumed.history] == [e[key] for e in full.history], key


def test_mid_epoch_evaluations_change_nothing_trained_and_survive_a_ctrl_c(tmp_path, monkeypatch):
    """eval_every 0.5: the test set is evaluated after 3 of the 6 steps too, with the epoch's
    training seconds so far; a Ctrl-C during that evaluation in epoch 2 saves the run before
    it, the resumed run evaluates there again, and the parameters end as without evaluations."""
    import minireuse.training.trainer
    data = learnable_data()
    plain = Trainer(config(tmp_path, out=str(tmp_path / "a")), data=data, quiet=True)
    plain.fit()
    t = Trainer(config(tmp_path, out=str(tmp_path / "b"), eval_every=0.5), data=data, quiet=True)
    real_evaluate, calls = minireuse.training.trainer.evaluate, []

    def evaluate_interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:                       # epoch 2's evaluation after step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kw)
    monkeypatch.setattr(minireuse.training.trainer, "evaluate", evaluate_interrupted)
    with pytest.raises(KeyboardInterrupt, match="during an evaluation"):
        t.fit()
    monkeypatch.setattr(minireuse.training.trainer, "evaluate", real_evaluate)
    resumed = Trainer(config(tmp_path, out=str(tmp_path / "b"), eval_every=0.5), data=data, quiet=True)
    assert resumed.resume(str(tmp_path / "b" / "checkpoint.npz"))["step"] == 3
    resumed.fit()
    a, b = params(plain.model), params(resumed.model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [e["train_loss"] for e in plain.history] == [e["train_loss"] for e in resumed.history]
    assert [e["mid_evals"] for e in plain.history] == [[], []]
    for record in resumed.history:
        (mid,) = record["mid_evals"]
        assert mid["step"] == 3 and mid["epoch"] == record["epoch"] - 0.5
        assert 0 < mid["seconds"] < record["seconds"] and 0 <= mid["test_acc"] <= 1
    with pytest.raises(ValueError, match="eval_every must be a finite number in \\(0, 1\\]"):
        Trainer(config(tmp_path, eval_every=0), data=data, quiet=True)


def test_mid_epoch_evaluations_change_nothing_a_reuse_run_trains(tmp_path):
    data = learnable_data(n_train=64, n_test=16)
    runs = [Trainer(config(tmp_path, epochs=1, out=str(tmp_path / str(every)), eval_every=every, reuse="fixed",
                           reuse_layers={"conv2": dict(L=16, H=8)}), data=data, quiet=True) for every in (1.0, 0.5)]
    for t in runs:
        t.fit()
    a, b = params(runs[0].model), params(runs[1].model)
    assert all(np.array_equal(a[k], b[k]) for k in a) and len(runs[1].history[0]["mid_evals"]) == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    t = Trainer(config(tmp_path, epochs=2), data=learnable_data(), quiet=True)
    t.fit()
    good = params(t.model)
    t2 = Trainer(config(tmp_path, epochs=3), data=learnable_data(), quiet=True)
    t2.resume(str(tmp_path / "run" / "checkpoint.npz"))
    t2.schedule = lambda t: 1e30                 # the rate explodes in the resumed epoch
    with pytest.raises(TrainingError, match="non-finite training loss.*The last good checkpoint is"):
        t2.fit()
    t3 = Trainer(config(tmp_path, epochs=3), data=learnable_data(), quiet=True)
    meta = t3.resume(str(tmp_path / "run" / "checkpoint.npz"))
    assert meta["epoch"] == 2
    for k, v in params(t3.model).items():
        np.testing.assert_array_equal(v, good[k])


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Trainer(config(tmp_path, batch_size=0), data=learnable_data(), quiet=True)
    with pytest.raises(ValueError, match="unknown training settings"):
        Trainer(config(tmp_path, epoch=3), data=learnable_data(), quiet=True)
    with pytest.raises(TrainingError, match="does not exist"):
        Trainer(config(tmp_path), data=learnable_data(), quiet=True).resume(str(tmp_path / "nope.npz"))


def test_cli_trains_on_fixture_data(tmp_path):
    write_cifar_fixture(str(tmp_path / "data"), n_per_batch=20, n_test=30)
    out = tmp_path / "out"
    r = run_cli("train", "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "25",
                "--device", "cpu", "--out", str(out), "--limit-train", "60", "--limit-test", "20", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    hist = json.load(open(out / "history.json"))
    assert hist["settings"]["limit_train"] == 60 and len(hist["epochs"]) == 1
    assert hist["epochs"][0]["images_per_s"] > 0


def test_cli_missing_data_names_the_directory(tmp_path):
    r = run_cli("train", "--data", str(tmp_path / "empty"), "--no-download", "--device", "cpu", "--quiet")
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and str(tmp_path / "empty") in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "expected a positive integer"),
    (["--batch-size", "x"], "expected a positive integer"),
    (["--device", "tpu"], "invalid choice"),
    (["--lr", "-1"], "expected a positive finite number"),
])
def test_cli_bad_flags(tmp_path, args, message):
    r = run_cli("train", "--data", str(tmp_path), *args)
    assert r.returncode == 2 and message in r.stderr


def test_cli_wrong_shapes_in_data(tmp_path):
    import pickle
    folder = tmp_path / "data" / "cifar-10-batches-py"
    write_cifar_fixture(str(tmp_path / "data"), n_per_batch=4)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 1000), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    r = run_cli("train", "--data", str(tmp_path / "data"), "--device", "cpu", "--quiet", "--epochs", "1")
    assert r.returncode == 2 and "data_batch_2" in r.stderr


def test_cli_resume_from_missing_checkpoint(tmp_path):
    write_cifar_fixture(str(tmp_path / "data"), n_per_batch=4)
    r = run_cli("train", "--data", str(tmp_path / "data"), "--device", "cpu", "--quiet",
                "--resume", str(tmp_path / "none.npz"))
    assert r.returncode == 2 and "none.npz" in r.stderr
