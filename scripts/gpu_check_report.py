"""The GPU check's two Python steps (scripts/gpu_check.sh runs them).

    python scripts/gpu_check_report.py preflight OUT_DIR
        A usable GPU (CuPy imports, a device is visible, one kernel compiles and runs):
        creates OUT_DIR/<UTC time>-<device>/env.json (device, compute capability, CuPy,
        CUDA runtime, driver and NVRTC versions, NumPy, Python, commit) and prints that
        directory. Otherwise prints one line saying why and exits 3, writing nothing.
    python scripts/gpu_check_report.py summary RUN_DIR
        Writes RUN_DIR/summary.md from env.json, stages.tsv and what each finished
        stage left there; run after every stage, so a run cut short still reports.
"""
import datetime
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minireuse import backend  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def commit():
    """HEAD (with '-dirty' when the tree has changes), else $COMMIT, else 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=ROOT, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("COMMIT") or "unknown (not a git checkout: pass COMMIT=...)"


def environment(cp):
    """What every result is recorded with."""
    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return dict(device=name, compute_capability=device.compute_capability, cupy=cp.__version__,
                cuda_runtime=cp.cuda.runtime.runtimeGetVersion(), cuda_driver=cp.cuda.runtime.driverGetVersion(),
                nvrtc=".".join(map(str, cp.cuda.nvrtc.getVersion())), numpy=__import__("numpy").__version__,
                python=sys.version.split()[0], commit=commit(),
                started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def preflight(out_dir):
    reason = backend.gpu_unavailable_reason()
    if reason is not None:
        print(f"gpu-check: no usable GPU, nothing measured or written: {' '.join(reason.split())}. "
              f"Install CuPy into {sys.executable} (pip install -e '.[gpu-cuda13]', or gpu-cuda12 for CUDA 12) "
              "or pass PYTHON=... naming an interpreter that has it.")
        return 3
    env = environment(backend.require_gpu())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run = Path(out_dir) / f"{stamp}-{re.sub(r'[^A-Za-z0-9]+', '-', env['device']).strip('-')}"
    run.mkdir(parents=True)
    (run / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(run)
    return 0


def stages(run):
    path = run / "stages.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
    return [(name, status, seconds) for name, status, seconds in rows]


def tail(path, n):
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no output)"


def test_counts(run):
    """'N passed, N failed, N skipped' from the tests stage's JUnit file."""
    path = run / "tests.xml"
    if not path.exists():
        return "(no JUnit file)"
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    return f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped, {float(suite.get('time')):.0f} s"


def training(run, name):
    path = run / name / "history.json"
    if not path.exists():
        return f"- {name}: no history.json"
    epochs = json.loads(path.read_text()).get("epochs") or [{}]
    last = epochs[-1]
    shown = {k: last[k] for k in ("test_acc", "test_loss", "train_loss", "seconds", "images_per_s") if k in last}
    return f"- {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def summary(run):
    run = Path(run)
    env = json.loads((run / "env.json").read_text())
    lines = [f"# GPU check: {env['device']}", "",
             ", ".join(f"{k} {env[k]}" for k in ("compute_capability", "cupy", "cuda_runtime", "cuda_driver",
                                                  "nvrtc", "numpy", "python")), "",
             f"commit {env['commit']}, started {env['started']}", "", "| stage | status | seconds |", "|---|---|---|"]
    done = stages(run)
    lines += [f"| {name} | {status} | {seconds} |" for name, status, seconds in done]
    names = [name for name, _, _ in done]
    if "tests" in names:
        lines += ["", "## tests", "", test_counts(run), "", "```text", tail(run / "tests.log", 25), "```"]
    if "kernels" in names:
        kernels = run / "kernel_times.md"
        lines += ["", kernels.read_text() if kernels.exists() else "## conv2 kernels\n\n(no table: see kernels.log)"]
    for name, title in (("bench", "layer bench"), ("step", "training step (bench step)")):
        if name in names:
            lines += ["", f"## {title}", "", "```text", tail(run / f"{name}.log", 30), "```"]
    trained = [name for name in names if name.startswith("train-")]
    if trained:
        lines += ["", "## training (1 epoch, 5000 images)", ""] + [training(run, name) for name in trained]
    (run / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    sys.exit({"preflight": preflight, "summary": summary}[command](target))
