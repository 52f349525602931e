"""What a new user must not meet through the command line: a run lost or overwritten
without asking, a bad value taken before work and failing late (or never said), a
setting silently ignored, a result lost to a traceback after the work.

Each case runs ``python -m minireuse`` on a small CIFAR-10 fixture (in-process through
``main`` where something is injected, as a subprocess otherwise).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from minireuse.training import batches as batches_mod
from minireuse.training import checkpoint as checkpoint_mod
from minireuse.training import trainer as train_mod
from minireuse.__main__ import main

from cifar_fixture import write_cifar_fixture
from cli_helpers import ROOT, base, history, run_cli


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------- D5: a run in --out is not replaced unasked

def test_train_refuses_an_out_that_holds_a_run(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(base(data, out, "--epochs", "1", "--seed", "1")) == 0
    before = (out / "checkpoint.npz").read_bytes(), history(out)
    capsys.readouterr()
    assert main(base(data, out, "--epochs", "1", "--seed", "2")) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "already holds a run" in err and "the end of epoch 1" in err
    assert f"--resume {out / 'checkpoint.npz'}" in err and "another --out" in err and "--overwrite" in err
    assert ((out / "checkpoint.npz").read_bytes(), history(out)) == before


def test_overwrite_starts_over_and_leaves_nothing_of_the_old_run(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(base(data, out, "--epochs", "2", "--seed", "1")) == 0
    assert main(base(data, out, "--epochs", "1", "--seed", "2", "--overwrite")) == 0
    h = history(out)
    assert h["settings"]["seed"] == 2 and len(h["epochs"]) == 1
    assert checkpoint_mod.read_checkpoint(str(out / "checkpoint.npz"), arrays=False)[0]["epoch"] == 1
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--overwrite", "--quiet"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_an_interrupted_run_is_not_started_over_by_make_cifar_again(tmp_path, data):
    """`make cifar` names itself to train; run again on an interrupted run, train says to add RESUME=1."""
    out = tmp_path / "run"
    assert main(base(data, out, "--epochs", "1")) == 0
    env = dict(os.environ, PYTHONPATH=ROOT, MINIREUSE_MAKE_COMMAND=f"make cifar OUT={out}")
    r = subprocess.run([sys.executable, "-m", "minireuse", *base(data, out, "--epochs", "2")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    err = one_line_error(r.stderr)
    assert f"continue it with make cifar OUT={out} RESUME=1" in err
    assert f"make cifar OUT={out} TRAIN_FLAGS=--overwrite" in err
    make = subprocess.run(["make", "-n", "cifar", f"OUT={out}", "PYTHON=python3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert f"MINIREUSE_MAKE_COMMAND='make cifar PYTHON=python3 OUT={out}'" in make.stdout


def test_compare_refuses_to_replace_its_runs(tmp_path, data, capsys):
    out = tmp_path / "cmp"
    assert main(base(data, out / "exact", "--epochs", "1")) == 0
    args = ["compare", "--data", data, "--device", "cpu", "--out", str(out), "--quiet", "--limit-train", "64",
            "--no-download", "--epochs", "1", "--reuse", "fixed"]
    assert main(args) == 2
    assert "exact already holds a run" in one_line_error(capsys.readouterr().err)
    assert not (out / "reuse").exists()


# ---------------------------------------------------------------- D4: the resume command works as printed

def test_ctrl_c_names_the_interpreter_that_runs(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "run"
    real_step = train_mod.Trainer.run_step
    calls = []

    def step(self, *args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args)
    monkeypatch.setattr(train_mod.Trainer, "run_step", step)
    assert main(base(data, out, "--epochs", "1", "--batch-size", "16")) == 130
    err = capsys.readouterr().err
    assert f"continue with {sys.executable} -m minireuse train --resume {out / 'checkpoint.npz'}" in err
    monkeypatch.setenv("MINIREUSE_MAKE_COMMAND", "make cifar")
    calls.clear()
    assert main(base(data, tmp_path / "made", "--epochs", "1", "--batch-size", "16")) == 130
    assert "(continue with make cifar RESUME=1)" in capsys.readouterr().err


# ---------------------------------------------------------------- D3: a resume writes where its checkpoint is

def test_resuming_a_copied_run_from_elsewhere_writes_into_the_copy(tmp_path, data):
    write_cifar_fixture(str(tmp_path / "data"), n_per_batch=16, n_test=24)
    r = run_cli("train", "--data", "data", "--device", "cpu", "--out", "run", "--quiet", "--limit-train", "64",
                "--batch-size", "32", "--no-download", "--epochs", "1", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    original = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    (tmp_path / "elsewhere").mkdir()
    r = run_cli("train", "--resume", "../copy/checkpoint.npz", "--epochs", "2", "--quiet",
                cwd=str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr
    assert len(history(tmp_path / "copy")["epochs"]) == 2 and (tmp_path / "copy" / "model.npz").exists()
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == original
    assert len(history(tmp_path / "run")["epochs"]) == 1
    assert os.listdir(tmp_path / "elsewhere") == []
    assert history(tmp_path / "copy")["settings"]["data"] == str(tmp_path / "data")


# ---------------------------------------------------------------- D1: reuse settings that cannot fit

@pytest.mark.parametrize("setting,message", [
    ({"L": 100000, "H": 12}, "layer conv2: L=100000 is wider than the layer's rows (K = 5 x 5 x 64 = 1600)"),
    ({"L": 24, "H": 12, "pixel_aligned": True}, "pixel_aligned True needs a conv layer whose input channels L "
                                                "divides (L=24, c_in=64)"),
    ({"L": 16, "H": 65}, "ReuseConfig.H: got 65, expected an int in 1..64"),
])
def test_reuse_settings_that_cannot_fit_are_refused_before_the_data(tmp_path, setting, message):
    path = tmp_path / "reuse.json"
    path.write_text(json.dumps({"layers": {"conv2": setting}}))
    r = run_cli("train", "--data", str(tmp_path / "nodata"), "--no-download", "--device", "cpu", "--quiet",
                "--out", str(tmp_path / "run"), "--reuse", "fixed", "--reuse-config", str(path))
    assert r.returncode == 2
    assert message in one_line_error(r.stderr) and "nodata" not in r.stderr


# ---------------------------------------------------------------- D2: batches that cannot fit

def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, data, capsys):
    assert main(base(data, tmp_path / "run", "--epochs", "1", "--batch-size", "100")) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "--batch-size 100 is larger than the training set (64 images)" in err
    assert not (tmp_path / "run" / "history.json").exists()


def test_a_step_that_cannot_fit_in_memory_is_refused_before_the_data(tmp_path, data, capsys, monkeypatch):
    from minireuse.models import MODELS
    limit = batches_mod.step_memory_bytes(MODELS["cifarnet"](), 16, sum(batches_mod.CIFAR_IMAGES)) + 1
    monkeypatch.setattr(batches_mod, "available_memory", lambda: limit)
    read = []
    monkeypatch.setattr(train_mod.Trainer, "_load_data", lambda self: read.append(1))
    assert main(base(data, tmp_path / "run", "--epochs", "1", "--batch-size", "32")) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "with batches of 32 needs about" in err and "lower --batch-size" in err and not read
    monkeypatch.undo()
    monkeypatch.setattr(batches_mod, "available_memory", lambda: limit)
    assert main(base(data, tmp_path / "run", "--epochs", "1", "--batch-size", "16")) == 0


def test_the_memory_estimate_grows_with_the_batch_and_reads_meminfo():
    from minireuse.models import MODELS
    model = MODELS["cifarnet"]()
    small, large = (batches_mod.step_memory_bytes(model, b, 0) for b in (128, 256))
    # conv2's im2col (128 x 16 x 16 x 1600 floats, twice) is part of a batch of 128
    assert large > small > 2 * 128 * 16 * 16 * 1600 * 4
    if os.path.exists("/proc/meminfo"):
        assert batches_mod.available_memory() > 0


# ---------------------------------------------------------------- D6: a reuse config is not ignored

def test_a_reuse_config_without_a_strategy_is_an_error(tmp_path, data, capsys):
    path = tmp_path / "reuse.json"
    path.write_text(json.dumps({"layers": {"conv2": {"L": 16, "H": 12}}}))
    assert main(base(data, tmp_path / "run", "--epochs", "1", "--reuse-config", str(path))) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "the reuse strategy is off: add --reuse fixed, schedule or adaptive" in err
    assert not (tmp_path / "run" / "history.json").exists()
    assert main(base(data, tmp_path / "run", "--epochs", "1", "--reuse", "fixed", "--reuse-config", str(path))) == 0
    assert history(tmp_path / "run")["epochs"][0]["layers"]["conv2"]["reuse"]["L"] == 16


# ---------------------------------------------------------------- D7: output paths checked before the work

@pytest.fixture
def trained(tmp_path, data):
    out = tmp_path / "run"
    assert main(base(data, out, "--epochs", "1")) == 0
    return out


def test_evaluate_checks_its_json_path_before_evaluating(tmp_path, data, trained, capsys, monkeypatch):
    from minireuse.tools import evaluate as evaluate_mod
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ran = []
    monkeypatch.setattr(evaluate_mod, "evaluate_model", lambda *a, **k: ran.append(1))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained / "model.npz"), "--data", data, "--device", "cpu",
                 "--quiet", "--json", str(blocker / "report.json")]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "cannot write to the directory of --json" in err and "give another --json" in err and not ran


def test_plot_checks_its_output_path_before_drawing(tmp_path, trained, capsys):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["plot", str(trained), "-o", str(blocker / "fig.png")]) == 2
    assert "cannot write to the directory of -o" in one_line_error(capsys.readouterr().err)
    assert main(["plot", str(trained), "-o", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- D10: nothing non-finite is kept as good

def test_a_non_finite_test_loss_is_not_kept_and_is_one_clean_line(tmp_path, data):
    out = tmp_path / "run"
    # one step per epoch: its loss is finite, the parameters it leaves are not
    r = run_cli(*base(data, out, "--epochs", "3", "--lr", "1e20", "--warmup-epochs", "0", "--batch-size", "64"))
    assert r.returncode == 2
    err = one_line_error(r.stderr)
    assert "non-finite test loss" in err and "RuntimeWarning" not in r.stderr
    if (out / "history.json").exists():
        assert all(np.isfinite(e["test_loss"]) for e in history(out)["epochs"])
    if (out / "checkpoint.npz").exists():
        meta, arrays = checkpoint_mod.read_checkpoint(str(out / "checkpoint.npz"))
        assert all(np.isfinite(a).all() for k, a in arrays.items() if k.startswith("param/"))


# ---------------------------------------------------------------- D9: no ratio of exact with exact

def common(data, out):
    return ["--data", data, "--device", "cpu", "--out", str(out), "--quiet", "--limit-train", "64",
            "--batch-size", "32", "--no-download", "--epochs", "1", "--reuse", "adaptive"]


def test_compare_says_when_reuse_never_ran_and_gives_no_ratio(tmp_path, data, capsys):
    assert main(["compare", *common(data, tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "reuse never ran" in table
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert rows["training time"][-1] == "-" and rows["conv layers time"][-1] == "-"


def test_parity_says_when_reuse_never_ran_and_gives_no_ratio(tmp_path, data, capsys):
    assert main(["parity", "--seeds", "0", *common(data, tmp_path / "par")]) == 0
    table = capsys.readouterr().out
    assert "reuse never ran in seed 0" in table
    seed_row = next(line for line in table.splitlines() if line.startswith("0 "))
    assert not any(cell.endswith("x") for cell in seed_row.split())
    result = json.load(open(tmp_path / "par" / "parity.json"))
    assert result["aggregate"]["train_seconds"]["ratio"] is None
    # the time-to-accuracy rows give the reuse run's seconds but no ratio either
    targets = [line.split() for line in table.split("time to accuracy")[1].splitlines()[2:] if line.strip()]
    assert targets and not any(cell.endswith("x)") for row in targets for cell in row)
    for t in result["per_seed"][0]["time_to_targets"] + result["aggregate"]["time_to_targets"]:
        assert t["ratio_vs_exact"]["reuse"] is None


# ---------------------------------------------------------------- D8: the evaluation shows progress

@pytest.mark.parametrize("quiet", [False, True])
def test_the_evaluation_after_each_epoch_has_a_progress_bar(tmp_path, data, quiet):
    args = [a for a in base(data, tmp_path / "run", "--epochs", "1", "--limit-test", "24", "--batch-size", "8")
            if not (a == "--quiet" and not quiet)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert ("epoch 1: evaluating:" in r.stderr) != quiet and ("/3 [" in r.stderr) != quiet   # 24 images, 3 batches


# ---------------------------------------------------------------- help

def help_text(*command):
    r = run_cli(*command, "--help")
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())


@pytest.mark.parametrize("command", [("train",), ("parity",), ("evaluate",), ("plot",), ("bench", "layers"),
                                     ("bench", "step")])
def test_help_shows_each_default_once_and_only_real_ones(command):
    text = help_text(*command)
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    for shown in ("(default 0,1,2) (default", "(default 128) (default", "(default 12,20) (default",
                  "history.png) (default"):
        assert shown not in text


def test_help_describes_switches_and_offers_only_what_is_taken():
    train = help_text("train")
    assert "--no-nesterov SGD with plain momentum" in train and "--no-augment train on the images as they are" in train
    assert "--no-download never download CIFAR-10 when it is missing [" in train or \
        "--no-download never download CIFAR-10 when it is missing --" in train
    parity = help_text("parity")
    assert "--seed SEED" not in parity and "--reuse {fixed,schedule,adaptive}" in parity
    assert "--reuse {fixed,schedule,adaptive}" in help_text("compare")
    assert "--checkpoint FILE RUN/model.npz or RUN/checkpoint.npz of a trained model --" in help_text("evaluate")


# ---------------------------------------------------------------- plot

def test_plot_of_a_run_without_history_says_why(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert "no history.json (no epoch finished yet?)" in one_line_error(capsys.readouterr().err)


def test_plot_of_a_one_epoch_exact_run_draws_points_and_says_there_is_no_reuse(tmp_path, trained):
    pytest.importorskip("matplotlib")
    from minireuse.tools import plot
    fig = plot.figure([plot.read_history(str(trained))])
    acc, loss, _, rc, err, harm = fig.axes
    assert all(line.get_marker() == "o" for line in acc.lines + loss.lines)
    for ax in (rc, err, harm):
        assert [t.get_text() for t in ax.texts] == ["no reuse recorded in these runs"]


# ---------------------------------------------------------------- what a run shows as it goes

def test_a_run_says_its_estimated_time_and_its_reuse_state(tmp_path, data):
    path = tmp_path / "reuse.json"
    path.write_text(json.dumps({"layers": {"conv2": {"L": 64, "H": 16}}}))
    args = [a for a in base(data, tmp_path / "run", "--epochs", "2", "--reuse", "fixed", "--reuse-config", str(path))
            if a != "--quiet"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("estimated time for the run: about") == 1 and "2 epochs of 2 steps" in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch 1: train loss")]
    assert len(lines) == 1 and "| reuse: conv2 L64H16 offset r_c 0." in lines[0]
    assert "conv2:L64H16,offset" in r.stderr                  # the bar shows which layers reuse
