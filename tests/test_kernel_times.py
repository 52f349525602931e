"""scripts/kernel_times.py (the GPU check's kernels stage) runs its whole pipeline on the
kernels' host build here, so a mistake in it shows before a GPU run does."""
import importlib.util
import json
from pathlib import Path

import pytest

from minireuse import backend
from minireuse.kernels import runtime
from minireuse.reuse import cuda

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kernel_times.py"


def load_script():
    spec = importlib.util.spec_from_file_location("kernel_times", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(runtime.host_compiler() is None, reason="no host C++ compiler")
def test_the_script_times_its_settings_on_the_host_runner(tmp_path, capsys, monkeypatch):
    script = load_script()
    # one pixel-aligned and one general setting: each host launch costs a fraction of a second
    monkeypatch.setattr(script, "SETTINGS", [script.SETTINGS[0], script.SETTINGS[-1]])
    backend.set_device("cpu")
    out_json, out_md = tmp_path / "k.json", tmp_path / "k.md"
    assert script.main(["--data", str(tmp_path / "no-data"), "--batch", "2", "--repeats", "1",
                        "--json", str(out_json), "--markdown", str(out_md)], cuda.HostDevice()) == 0
    report = json.loads(out_json.read_text())
    assert list(report["settings"]) == [label for label, _ in script.SETTINGS]
    for s in report["settings"].values():
        assert s["op_count"] > 0 and s["fwd_ms"] > 0 and s["graph_fwd_bwd_ms"] is None
        assert all(label.startswith(("fwd ", "bwd ")) and ms >= 0 for label, ms in s["ops"])
    assert report["cudnn"] is None and report["data"].startswith("NOT CIFAR-10")
    assert out_md.read_text() == capsys.readouterr().out.rstrip("\n") + "\n"
