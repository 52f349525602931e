"""Deep reuse at inference (python -m minireuse evaluate): a trained model's test set exact
and with reuse, side by side, on a small fixture."""
import json

import numpy as np
import pytest

from minireuse.__main__ import main
from minireuse.tools.evaluate import evaluate_model, reuse_settings
from minireuse.models import cifarnet

from cifar_fixture import write_cifar_fixture


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CifarNet trained for one epoch on the fixture, saved as model.npz and checkpoint.npz."""
    d = tmp_path_factory.mktemp("eval")
    write_cifar_fixture(str(d / "data"), n_per_batch=16, n_test=40)
    out = d / "run"
    assert main(["train", "--data", str(d / "data"), "--device", "cpu", "--out", str(out), "--quiet",
                 "--epochs", "1", "--batch-size", "16", "--no-download"]) == 0
    return d


def test_exact_and_reuse_side_by_side(trained, capsys, tmp_path):
    capsys.readouterr()
    report_path = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(trained / "run" / "model.npz"), "--data", str(trained / "data"),
                 "--device", "cpu", "--no-download", "--quiet", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    for shown in ("test accuracy", "predictions as exact", "images/s", "conv2 forward ms/batch",
                  "L64H32 offset dx=cluster", "conv2 r_c / output error"):
        assert shown in out, shown
    report = json.loads(report_path.read_text())
    assert report["test_images"] == 40
    conv2 = report["reuse"]["layers"]["conv2"]
    assert 0 < conv2["r_c"] < 1 and 0 < conv2["rel_error"] < 1 and conv2["impl"] == "numpy-reference"
    assert 0 <= report["reuse"]["agreement"] <= 1
    assert report["exact"]["layers"]["conv2"]["setting"] is None


def test_checkpoint_npz_and_exact_only(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained / "run" / "checkpoint.npz"), "--data",
                 str(trained / "data"), "--device", "cpu", "--no-download", "--quiet", "--reuse", "off"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "reuse" not in out.splitlines()[0]


def test_more_hash_bits_cost_less_error_and_change_fewer_predictions():
    model = cifarnet(seed=0)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (48, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 10, 48)
    base = reuse_settings("fixed", None)["conv2"].replace(impl="reference")
    coarse = evaluate_model(model, x, y, {"conv2": base.replace(H=8)}, batch_size=16)["reuse"]
    fine = evaluate_model(model, x, y, {"conv2": base.replace(H=64)}, batch_size=16)["reuse"]
    assert fine["layers"]["conv2"]["rel_error"] < coarse["layers"]["conv2"]["rel_error"]
    assert fine["layers"]["conv2"]["r_c"] > coarse["layers"]["conv2"]["r_c"]
    assert fine["agreement"] >= coarse["agreement"]


def test_bad_input_is_refused(trained, capsys, tmp_path):
    ladder = tmp_path / "ladder.json"
    ladder.write_text(json.dumps({"layers": {"conv2": [{"L": 64, "H": 32}, {"L": 64, "H": 64}]}}))
    text = tmp_path / "notes.txt"
    text.write_text("x")
    cases = [(["--checkpoint", str(trained / "nope.npz")], "does not exist"),
             (["--checkpoint", str(text)], "is not a minireuse model or checkpoint"),
             (["--checkpoint", str(trained / "run" / "model.npz"), "--reuse-config", str(ladder)],
              "one setting per layer")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["evaluate", "--data", str(trained / "data"), "--device", "cpu", "--no-download",
                     "--quiet", *args]) == 2
        assert message in capsys.readouterr().err


def test_timed_passes_are_warmed_up_with_their_own_settings_and_read_back_once(monkeypatch):
    """The reuse pass's first call (module load, calibration) happens before its clock starts,
    and no batch of the timed loop reads a value back to the host (a GPU synchronisation)."""
    from minireuse import backend
    model = cifarnet(seed=0)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 256, (48, 32, 32, 3)).astype(np.uint8), rng.integers(0, 10, 48)
    events = []
    conv2 = model.layer("conv2")
    forward = conv2.forward
    monkeypatch.setattr(conv2, "forward", lambda *a, **k: (events.append(("reuse" if conv2.reuse else "exact")),
                                                           forward(*a, **k))[1])
    # run_pass synchronises right before starting its clock and right after its loop
    monkeypatch.setattr(backend, "synchronize", lambda: events.append("clock"))
    asnumpy = backend.asnumpy
    monkeypatch.setattr(backend, "asnumpy", lambda a: (events.append("read"), asnumpy(a))[1])
    setting = reuse_settings("fixed", None)["conv2"].replace(impl="reference")
    evaluate_model(model, x, y, {"conv2": setting}, batch_size=16, error_batches=1)
    timed = []                                   # the events between each pass's two clock reads
    for start in [i for i, e in enumerate(events) if e == "clock"][::2]:
        end = events.index("clock", start + 1)
        timed.append(events[start + 1:end])
        warm_up = [e for e in events[:start] if e in ("exact", "reuse")][-1]
        assert warm_up == timed[-1][0]                      # a warm-up call with the same settings
    assert [t.count("exact") for t in timed[:1]] == [3] and timed[1].count("reuse") == 3
    assert not any("read" in t for t in timed)
