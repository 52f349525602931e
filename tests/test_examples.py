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


def run_example(name, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), "--device", "cpu", *args],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_training_by_hand_learns():
    lines = run_example("train_by_hand.py")
    assert len(lines) == 4 and all(l.startswith(f"epoch {i + 1}: loss") for i, l in enumerate(lines))
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines]
    accs = [float(l.split("accuracy ")[1]) for l in lines]
    assert losses[-1] < losses[0] - 0.3 and accs[-1] > 0.8


def test_dense_network_with_reuse():
    lines = run_example("dense_reuse.py")
    exact, reuse = (float(l.split("accuracy ")[1]) for l in lines[:2])
    assert lines[1].startswith("reuse L=8 H=12") and exact > 0.9 and reuse > 0.8
    for line, name in zip(lines[2:], ("fc1", "fc2")):
        r_c = float(line.split("r_c ")[1].split(",")[0])
        err = float(line.split("relative error ")[1])
        assert line.strip().startswith(name) and 0 < r_c < 0.5 and 0 < err < 1


def test_reuse_at_inference_on_a_saved_model():
    lines = run_example("inference_reuse.py")
    assert lines[0].startswith("exact: accuracy") and lines[1].startswith("reuse conv2 L=16 H=20")
    assert "predictions as exact" in lines[1] and "r_c" in lines[1]
