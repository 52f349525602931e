"""Training runs through the command line that must not be lost or silently changed.

Each case runs ``python -m minireuse train`` (in-process through ``main`` where a
fault is injected, as a subprocess otherwise) on a small CIFAR-10 fixture: resume
restores the saved run's settings and refuses contradicting ones, the output
directory is checked and locked up front, Ctrl-C at any point leaves a resumable
state and says so, bad values are refused before any work starts.
"""
import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from minireuse.training import checkpoint as checkpoint_mod
from minireuse.training import trainer as train_mod
from minireuse.__main__ import main
from minireuse.models import Sequential
from minireuse.layers import Dense
from minireuse.optim import SGD

from cli_helpers import base, history, run_cli


def reuse_file(tmp_path):
    path = tmp_path / "reuse.json"
    path.write_text(json.dumps({"layers": {"conv2": {"L": 16, "H": 12}}}))
    return str(path)


# ---------------------------------------------------------------- resume

def test_resume_restores_the_runs_settings(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(base(data, out, "--epochs", "1", "--batch-size", "16", "--lr", "0.03", "--reuse", "fixed",
                     "--reuse-config", reuse_file(tmp_path), "--seed", "3")) == 0
    ckpt = str(out / "checkpoint.npz")
    assert main(["train", "--resume", ckpt, "--epochs", "2", "--quiet"]) == 0      # only what may change
    h = history(out)
    s = h["settings"]
    assert (s["reuse"], s["batch_size"], s["lr"], s["seed"], s["limit_train"]) == ("fixed", 16, 0.03, 3, 64)
    assert s["reuse_layers"] == {"conv2": {"L": 16, "H": 12}}
    assert len(h["epochs"]) == 2 and h["epochs"][1]["layers"]["conv2"]["reuse"]["H"] == 12


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "8", "batch_size: checkpoint 16, this run 8"),
    ("--reuse", "off", "reuse: checkpoint 'fixed', this run 'off'"),
    ("--lr", "0.5", "lr: checkpoint 0.03, this run 0.5"),
])
def test_resume_refuses_contradicting_flags(tmp_path, data, capsys, flag, value, message):
    out = tmp_path / "run"
    assert main(base(data, out, "--epochs", "1", "--batch-size", "16", "--lr", "0.03", "--reuse", "fixed",
                     "--reuse-config", reuse_file(tmp_path))) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--epochs", "2", flag, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and message in err
    assert len(history(out)["epochs"]) == 1                       # nothing was changed


def test_resume_of_something_else(tmp_path, data, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert main(["train", "--resume", str(text), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt is not a minireuse checkpoint" in err and "pickle" not in err
    other = Sequential([Dense(4, 3, name="fc", rng=np.random.default_rng(0))])
    ckpt = str(tmp_path / "other.npz")
    checkpoint_mod.save_checkpoint(ckpt, other, SGD(other, lr=0.1), 1, 0, [], {"model": "cifarnet"})
    assert main(base(data, tmp_path / "o", "--resume", ckpt, "--batch-size", "16")) == 2
    err = capsys.readouterr().err
    assert "was saved for model 'cifarnet' with parameters fc.W" in err and "this run builds" in err


# ---------------------------------------------------------------- the output directory

def test_a_live_run_holds_the_output_directory(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        r = run_cli(*base(data, out, "--epochs", "1"))
        assert r.returncode == 2
        assert f"another run (process {holder.pid}) is writing to" in r.stderr and len(r.stderr.splitlines()) == 1
        assert not (out / "history.json").exists()
    finally:
        holder.kill()
        holder.wait()
    r = run_cli(*base(data, out, "--epochs", "1"))               # its process is gone: a stale lock
    assert r.returncode == 0, r.stderr
    assert not (out / ".lock").exists()                          # released at the end


def test_an_unwritable_output_directory_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # the data directory does not exist either: the output is checked first
    r = run_cli("train", "--data", str(tmp_path / "nodata"), "--no-download", "--device", "cpu", "--quiet",
                "--out", str(blocker / "run"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: cannot write to the output directory") and "nodata" not in r.stderr


def test_a_write_that_fails_later_keeps_the_last_checkpoint(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "run"
    real, saves = checkpoint_mod.atomic_savez, []

    def save_then_fill_the_disk(path, arrays):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arrays)
    monkeypatch.setattr(checkpoint_mod, "atomic_savez", save_then_fill_the_disk)
    assert main(base(data, out, "--epochs", "3", "--batch-size", "32")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert "The last checkpoint is" in err and "the end of epoch 1" in err
    meta = checkpoint_mod.read_checkpoint(str(out / "checkpoint.npz"))[0]
    assert (meta["epoch"], meta["step"]) == (1, 0)


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_during_the_evaluation_saves_and_resumes_exactly(tmp_path, data, capsys, monkeypatch):
    full = tmp_path / "full"
    assert main(base(data, full, "--epochs", "2", "--batch-size", "16")) == 0
    out = tmp_path / "run"
    real = train_mod.evaluate
    calls = []

    def interrupted_evaluation(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)
    monkeypatch.setattr(train_mod, "evaluate", interrupted_evaluation)
    assert main(base(data, out, "--epochs", "2", "--batch-size", "16")) == 130
    err = capsys.readouterr().err
    assert "interrupted in epoch 1 during its evaluation; state saved to" in err and "--resume" in err
    monkeypatch.setattr(train_mod, "evaluate", real)
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--quiet"]) == 0
    a, b = history(full)["epochs"], history(out)["epochs"]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert [e[key] for e in a] == [e[key] for e in b], key


def test_a_second_ctrl_c_stops_at_once_and_says_what_is_left(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step = train_mod.Trainer.run_step
    calls = []

    def step(self, *args):
        calls.append(1)
        if len(calls) == 6:               # the 2nd step of epoch 2 (4 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args)
    monkeypatch.setattr(train_mod.Trainer, "run_step", step)
    assert main(base(data, out, "--epochs", "2", "--batch-size", "16")) == 130
    err = capsys.readouterr().err
    assert "interrupted again: stopped at once without saving" in err
    assert "The last checkpoint is" in err and "(the end of epoch 1)" in err
    assert not (out / ".lock").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, data, capsys):
    with np.errstate(all="ignore"):
        code = main(base(data, tmp_path / "run", "--epochs", "1", "--lr", "1e30", "--warmup-epochs", "0",
                         "--batch-size", "8"))
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "Nothing to resume from" in err and "checkpoint is" not in err


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--momentum", "nan"),
                                        ("--momentum", "1"), ("--weight-decay", "-5"),
                                        ("--warmup-epochs", "-3"), ("--seed", "-1")])
def test_numeric_flags_are_checked_when_parsed(tmp_path, flag, value):
    r = run_cli("train", "--data", str(tmp_path), flag, value)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith("usage:")
    assert f"argument {flag}: expected" in r.stderr.splitlines()[-1] and repr(value) in r.stderr


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("minireuse ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--epochs EPOCHS default: 30", "(default: 0.05)", "(default: runs/cifarnet)",
                  "(default: off)"):
        assert shown in text, shown
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: adaptive)" in text and "--resume" not in text and "(default: runs/compare)" in text


def test_bench_says_what_it_times(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "cifarnet"])
    assert e.value.code == 2
    assert "bench needs what to time first: 'bench layers ...'" in capsys.readouterr().err
    for what in ("layers", "step"):
        with pytest.raises(SystemExit):
            main(["bench", what, "--help"])
        assert "--device" in capsys.readouterr().out


def test_weight_decay_layers_follow_the_model(tmp_path):
    from minireuse.training.trainer import Trainer
    from cli_helpers import config, learnable_data
    t = Trainer(config(tmp_path, model="alexnet", epochs=1), data=learnable_data(n_train=8, n_test=8), quiet=True)
    assert t.cfg["decay_layers"] is None                     # CifarNet's fc3, fc4 do not exist here
    assert Trainer(config(tmp_path), data=learnable_data(8, 8), quiet=True).cfg["decay_layers"] == ["fc3", "fc4"]
    with pytest.raises(ValueError, match=r"decay_layers: \['fc9'\] are not layers with weights of cifarnet"):
        Trainer(config(tmp_path, decay_layers=["fc9"]), data=learnable_data(8, 8), quiet=True)
