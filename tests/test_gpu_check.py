"""make gpu-check (scripts/gpu_check.sh) on a machine without a usable GPU: it stops within
seconds saying why and writes nothing; a GPU case that skips fails the check's test stage;
the report is written from whatever stages finished."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minireuse import backend

ROOT = Path(__file__).resolve().parent.parent
no_gpu_here = pytest.mark.skipif(backend.gpu_available(), reason="checks what happens where no GPU is usable")


def clean_env(**extra):
    """The environment of a fresh shell: nothing of a calling make or of MINIREUSE_* leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MINIREUSE_"))}
    env.update(extra)
    return env


def listing(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else []


def assert_stopped_at_once(output, seconds):
    lines = output.strip().splitlines()
    assert seconds < 30
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no usable GPU, nothing measured or written: ")
    assert backend.gpu_unavailable_reason().split(":")[0] in lines[0]


@no_gpu_here
def test_the_script_stops_within_seconds_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "gpu_results"
    start = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                       env=clean_env(PYTHON=sys.executable, OUT_DIR=str(out_dir)))
    assert r.returncode == 3, r.stdout + r.stderr
    assert_stopped_at_once(r.stdout, time.monotonic() - start)
    assert not out_dir.exists()


@no_gpu_here
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_passes_its_python_and_stops_within_seconds():
    results = ROOT / "gpu_results"
    before = listing(results)
    start = time.monotonic()
    r = subprocess.run(["make", "--no-print-directory", "-s", "gpu-check", f"PYTHON={sys.executable}"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 2 and "gpu-check] Error 3" in r.stderr, r.stdout + r.stderr
    assert_stopped_at_once(r.stdout, time.monotonic() - start)
    assert listing(results) == before


@no_gpu_here
def test_a_gpu_case_that_skips_fails_under_require_gpu():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_backend.py", "-k", "mixing_numpy_and_cupy_names_both"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120,
                       env=clean_env(MINIREUSE_REQUIRE_GPU="1", PYTHONPATH=str(ROOT)))
    # a skipif mark skips in setup, so the case shows as an error
    assert r.returncode == 1 and "1 error" in r.stdout
    assert "MINIREUSE_REQUIRE_GPU: a GPU case was skipped" in r.stdout


def test_the_summary_reports_the_stages_that_finished(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "env.json").write_text(json.dumps(dict(
        device="NVIDIA H100 80GB HBM3", compute_capability="90", cupy="14.2.0", cuda_runtime=13000,
        cuda_driver=13000, nvrtc="13.0", numpy="2.4.6", python="3.12.3", commit="abc1234", started="now")))
    (run / "stages.tsv").write_text("tests\tpassed\t100\nkernels\ttimed out after 50 s\t60\n")
    (run / "tests.xml").write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2" '
                                   'time="99.5"></testsuite></testsuites>')
    (run / "tests.log").write_text("....\n1 failed, 7 passed, 2 skipped\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_report.py"), "summary", str(run)],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    text = (run / "summary.md").read_text()
    assert text.startswith("# GPU check: NVIDIA H100 80GB HBM3") and "commit abc1234" in text
    assert "cupy 14.2.0" in text and "| kernels | timed out after 50 s | 60 |" in text
    assert "7 passed, 1 failed, 2 skipped, 100 s" in text and "(no table: see kernels.log)" in text


def test_gpu_only_collects_the_gpu_cases_and_nothing_else(tmp_path):
    """The check's test stage (MINIREUSE_GPU_ONLY) keeps a test parametrised with "gpu" and one
    whose skip says "no usable GPU", and leaves the CPU cases to the CPU suite."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "from conftest import NO_GPU\n"
        "def test_on_each(device): pass\n"
        "@pytest.mark.skipif(True, reason=f'{NO_GPU}: needs one')\n"
        "def test_gpu_alone(): pass\n"
        "@pytest.mark.skipif(False, reason='checks the error raised where no GPU is usable')\n"
        "def test_without_a_gpu(): pass\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_cpu_only(n): pass\n")

    def collected(**extra):
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "test_sample.py"], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                           env=clean_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", **extra))
        assert r.returncode == 0, r.stdout + r.stderr
        return sorted(line.split("::")[1] for line in r.stdout.splitlines() if "::" in line)

    assert collected(MINIREUSE_GPU_ONLY="1") == ["test_gpu_alone", "test_on_each[gpu]"]
    assert len(collected()) == 6
