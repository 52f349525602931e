"""The example scripts run and print what they promise."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reuse_layer_example_runs():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "reuse_layer.py"), "--batch", "4",
                        "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("exact") and len(lines) == 3
    for line, family in zip(lines[1:], ("origin", "offset")):
        assert line.startswith(f"reuse {family}") and "r_c" in line and "relative error" in line
