"""scripts/layer_times.py: the per-layer profile docs/cpu.md shows, on a small fixture."""
import importlib.util
from pathlib import Path

import pytest

from minireuse import cpu


def load_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "layer_times.py"
    spec = importlib.util.spec_from_file_location("layer_times", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_layer_of_every_row_is_timed_both_ways(tmp_path, capsys):
    script = load_script()
    try:
        times = script.main(["--data", str(tmp_path), "--batch", "4", "--steps", "2", "--rows", "exact,fastest",
                             "--threads", "1"])
    finally:
        cpu.set_threads(None)
    out = capsys.readouterr().out
    assert "NOT CIFAR-10" in out and "exact fwd / bwd ms" in out and "fastest fwd / bwd ms" in out
    assert set(times) == {"exact", "fastest"}
    for row in times.values():
        assert len(row["step"]) == 2
        layer_keys = [k for k in row if k != "step"]
        assert {d for _, d in layer_keys} == {"fwd", "bwd"} and ("conv2", "bwd") in row
        assert all(len(v) == 2 and min(v) > 0 for v in row.values())
    assert any(line.startswith("conv2") for line in out.splitlines())


@pytest.mark.parametrize("argv,message", [(["--rows", "exact,fast"], "--rows: expected names from exact, default, "
                                                                      "fastest, got fast"),
                                          (["--steps", "1"], "--steps: expected at least 2")])
def test_bad_arguments_say_what_was_expected(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_script().main(argv)
    assert message in capsys.readouterr().err


def test_weights_start_every_row_from_a_saved_model(tmp_path, capsys, monkeypatch):
    """--weights loads the file into every row's model before the first step."""
    import numpy as np

    from minireuse.models import MODELS
    script = load_script()
    saved = MODELS["cifarnet"](seed=7)
    path = tmp_path / "model.npz"
    saved.save(str(path))
    seen = []
    real = script.MODELS["cifarnet"]

    def spy(**kw):
        model = real(**kw)
        seen.append(model)
        return model
    monkeypatch.setitem(script.MODELS, "cifarnet", spy)
    try:
        script.main(["--data", str(tmp_path), "--batch", "2", "--steps", "2", "--rows", "exact,default",
                     "--threads", "1", "--weights", str(path)])
    finally:
        cpu.set_threads(None)
    assert f"the weights of {path}" in capsys.readouterr().out
    assert len(seen) == 2
    # the script runs forward and backward only (no optimizer step): the weights stay the saved ones
    def params(model):
        return {key: layer.params[name] for key, layer, name in model.named_parameters()}
    want = params(saved)
    for model in seen:
        got = params(model)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert not np.array_equal(want["conv1.W"], params(real(seed=0))["conv1.W"])


def test_a_missing_weights_file_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--weights", str(tmp_path / "none.npz")])
    assert "--weights: expected a model.npz or checkpoint.npz file" in capsys.readouterr().err
