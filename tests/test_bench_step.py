"""The whole-step benchmark (minireuse.tools.bench_step): rows, labels, JSON, and its errors."""
import argparse
import importlib.util
import json

import pytest

from minireuse import backend, cpu
from minireuse.tools import bench_step

from cifar_fixture import write_cifar_fixture


@pytest.fixture(autouse=True)
def every_core_after():
    yield
    cpu.set_threads(None)


def parse(*argv):
    p = argparse.ArgumentParser()
    bench_step.add_arguments(p)
    return p.parse_args(list(argv))


def test_cpu_run_prints_a_labelled_table_and_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    args = parse("--device", "cpu", "--data", str(tmp_path / "none"), "--batch", "8", "--batches", "2",
                 "--steps", "2", "--warmup", "1", "--torch", "off", "--json", str(out), "--quiet")
    assert bench_step.run(args) == 0
    printed = capsys.readouterr().out
    assert "NOT CIFAR-10" in printed and "device: cpu" in printed
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["minireuse exact", "minireuse default reuse (conv2 L64 H32, backward only)",
                     "minireuse fast reuse (conv2 L64 H32)", "minireuse fast reuse (conv2 pca L64 H16)",
                     "data pipeline"]  # no graph rows on a CPU
    exact, reuse = report["rows"][0], report["rows"][1]
    assert exact["ms"] > 0 and exact["steps"] == 2 and exact["implementation"].startswith("numpy, fast path, ")
    assert "numpy-reference" in reuse["implementation"]
    assert exact["epoch_s"] == pytest.approx(exact["ms"] * 6250 / 1e3)
    assert report["batch"] == 8 and report["steps_per_epoch"] == 6250


def test_real_images_are_named(tmp_path, capsys):
    write_cifar_fixture(str(tmp_path / "data"), n_per_batch=8, n_test=8)
    args = parse("--device", "cpu", "--data", str(tmp_path / "data"), "--batch", "8", "--batches", "2",
                 "--steps", "1", "--warmup", "0", "--torch", "off", "--quiet")
    report = bench_step.run_step_bench(args)
    assert report["data"].startswith("CIFAR-10 training images 0..15 from")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_pytorch_is_timed_in_the_same_run(tmp_path):
    args = parse("--device", "cpu", "--data", str(tmp_path / "none"), "--batch", "8", "--batches", "1",
                 "--steps", "1", "--warmup", "1", "--threads", "1", "--quiet")
    report = bench_step.run_step_bench(args)
    torch_row = next(r for r in report["rows"] if r["name"] == "pytorch eager")
    assert torch_row["ms"] > 0 and "1 CPU threads" in torch_row["implementation"]
    table = bench_step.format_table(report)
    assert "vs pytorch" in table and "1.00x" in table


def test_graph_on_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(backend.DeviceError, match="need a GPU"):
        bench_step.run_step_bench(parse("--device", "cpu", "--graph", "on", "--torch", "off"))


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--batch must be a positive integer"):
        bench_step.run_step_bench(parse("--device", "cpu", "--batch", "0", "--torch", "off"))


def test_threads_size_minireuse_and_pytorch_together(tmp_path):
    args = parse("--device", "cpu", "--data", str(tmp_path / "none"), "--batch", "8", "--batches", "1",
                 "--steps", "1", "--warmup", "0", "--threads", "1", "--torch", "off", "--quiet",
                 "--reuse-config", str(write_setting(tmp_path)))
    report = bench_step.run_step_bench(args)
    assert cpu.threads() == 1
    assert [r["name"] for r in report["rows"]][:2] == ["minireuse exact", "minireuse reuse (conv2 L16 H8)"]
    numba = ", numba" if cpu.compiled_kernels() else ""      # the fast path's kernels, where installed
    assert report["rows"][0]["implementation"] == "numpy, fast path, 1 threads" + numba


def test_threads_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        bench_step.run_step_bench(parse("--device", "cpu", "--threads", "0", "--torch", "off"))


def test_a_training_runs_settings_file_times_without_its_strategy_options(tmp_path):
    # the full-data runs' files carry adaptive options (speed_guard) that the fixed rows of
    # the bench do not take; the row must time the file's layers and drop the options
    path = tmp_path / "run_settings.json"
    path.write_text(json.dumps({"layers": {"conv2": [{"L": 16, "H": 8, "dx_mode": "exact", "forward": "exact"}]},
                                "options": {"speed_guard": False, "exact_tail": 0.1}}))
    [(name, layers)] = bench_step.reuse_rows(str(path))               # the row carries no options
    assert layers == {"conv2": [{"L": 16, "H": 8, "dx_mode": "exact", "forward": "exact"}]}
    assert "backward only" in name
    out = tmp_path / "step.json"
    assert bench_step.run(parse("--device", "cpu", "--data", str(tmp_path / "none"), "--batch", "8",
                                "--steps", "1", "--warmup", "0", "--batches", "1", "--torch", "off",
                                "--reuse-config", str(path), "--json", str(out), "--quiet")) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["minireuse exact", name, "data pipeline"] and rows[1]["ms"] > 0


def write_setting(tmp_path):
    path = tmp_path / "setting.json"
    path.write_text(json.dumps({"layers": {"conv2": {"L": 16, "H": 8}}}))
    return path


class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def step(self, i, timed):
        self.log.append((self.name, i, timed))


def test_rows_take_turns_on_the_cpu_and_run_one_after_another_on_the_gpu():
    log = []
    bench_step.time_rows([Recorder("a", log), Recorder("b", log)], steps=3, warmup=1, per_turn=2)
    assert log == [("a", 0, False), ("b", 0, False), ("a", 1, True), ("a", 2, True), ("b", 1, True),
                   ("b", 2, True), ("a", 3, True), ("b", 3, True)]
    log.clear()
    bench_step.time_rows([Recorder("a", log), Recorder("b", log)], steps=2, warmup=1)
    assert log == [("a", 0, False), ("b", 0, False), ("a", 1, True), ("a", 2, True), ("b", 1, True),
                   ("b", 2, True)]


def test_weights_start_every_row_from_a_trained_model(tmp_path, monkeypatch):
    """--weights: each minireuse row's model (and PyTorch's, when it imports) holds the file's
    weights when timing starts; a file that is not CifarNet's stops the run before any timing."""
    from minireuse.models.cifarnet import cifarnet
    model = cifarnet(seed=7)
    path = tmp_path / "model.npz"
    model.save(str(path))
    started = []
    real = bench_step.time_rows

    def spy(rows, *a, **k):
        for row in rows:
            if isinstance(row, bench_step.MinireuseRow):
                started.append(row.t.model.layer("conv2").params["W"].copy())
            else:
                started.append(row.model[4].weight.detach().numpy().transpose(2, 3, 1, 0).copy())
        return real(rows, *a, **k)
    monkeypatch.setattr(bench_step, "time_rows", spy)
    torch = "auto" if importlib.util.find_spec("torch") else "off"
    args = parse("--device", "cpu", "--data", str(tmp_path / "none"), "--batch", "8", "--batches", "2",
                 "--steps", "1", "--warmup", "0", "--torch", torch, "--weights", str(path), "--quiet",
                 "--json", str(tmp_path / "step.json"))
    assert bench_step.run(args) == 0
    assert len(started) == (5 if torch == "auto" else 4)
    for w in started:
        assert w == pytest.approx(model.layer("conv2").params["W"], abs=1e-7)
    assert json.loads((tmp_path / "step.json").read_text())["weights"] == str(path)
    (tmp_path / "other.npz").write_bytes(b"not an npz")
    with pytest.raises(Exception, match="other.npz"):
        bench_step.run(parse("--device", "cpu", "--data", str(tmp_path / "none"), "--torch", "off",
                             "--weights", str(tmp_path / "other.npz"), "--quiet"))
