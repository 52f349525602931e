"""The layer benchmark runs end to end on a tiny grid (timings themselves are not tested)."""
import argparse
import json

from minireuse.tools import bench


def test_bench_runs_a_tiny_grid_and_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--layers", "conv2,fc3", "--L", "16", "--H", "4", "--family", "offset",
                              "--batch", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                              "--data", str(tmp_path / "no-cifar"), "--json", str(out), "--quiet"])
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    assert "NOT CIFAR-10" in printed and "pixel L=16 H=4 offset" in printed
    report = json.loads(out.read_text())
    modes = [(r["layer"], r["mode"]) for r in report["rows"]]
    assert modes == [("conv2", "exact"), ("conv2", "pixel L=16 H=4 offset dx=cluster"),
                     ("conv2", "general L=16 H=4 offset dx=cluster"), ("fc3", "exact"),
                     ("fc3", "general L=16 H=4 offset dx=cluster")]
    for row in (r for r in report["rows"] if r["mode"] != "exact"):
        assert row["impl"] == "numpy-reference" and 0 < row["r_c"] <= 1 and row["rel_error"] >= 0
        assert row["speedup_total"] > 0


def test_bench_layers_of_another_model(tmp_path, capsys):
    import pytest
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    base = ["--model", "vgg19", "--H", "4", "--family", "offset", "--paths", "pixel", "--batch", "2",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--data", str(tmp_path / "no-cifar"), "--quiet"]
    model = bench.build_model("vgg19", 0)
    assert len(bench.default_layers("vgg19", model)) == 16
    out = tmp_path / "vgg.json"
    assert bench.run(parser.parse_args(base + ["--layers", "conv1_1,conv5_4", "--json", str(out)])) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layer"], r["mode"]) for r in rows] == [
        ("conv1_1", "exact"), ("conv1_1", "pixel L=3 H=4 offset dx=cluster"),
        ("conv5_4", "exact"), ("conv5_4", "pixel L=16 H=4 offset dx=cluster"),
        ("conv5_4", "pixel L=64 H=4 offset dx=cluster")]
    with pytest.raises(ValueError, match=r"--layers: unknown \['conv2'\]; vgg19's conv/dense layers are"):
        bench.run(parser.parse_args(base + ["--layers", "conv2"]))
