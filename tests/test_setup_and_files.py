"""Set-up and files: atomic writes get a normal file mode, the step benchmark runs
without PyTorch, the Makefile's virtual environment, and the package data."""
import configparser
import glob
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from minireuse.tools import bench_step
from minireuse import fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- atomic_write (item 9)

@pytest.fixture
def umask():
    """Set a umask for the test; the previous one is restored after it."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o000], ids=oct)
@pytest.mark.parametrize("writer", ["json", "savez", "text"])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask, mask, writer):
    umask(mask)
    target = tmp_path / f"out.{writer}"
    if writer == "json":
        fileio.atomic_write_json(str(target), {"a": 1})
    elif writer == "savez":
        import numpy as np
        fileio.atomic_savez(str(target), {"x": np.arange(3)})
    else:
        fileio.atomic_write(str(target), lambda f: f.write("hello"), binary=False)
    plain = tmp_path / "plain"
    with open(plain, "w") as f:
        f.write("x")
    assert mode_of(target) == mode_of(plain) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, "plain"])   # no temp file left


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_write_replacing_a_file_gives_the_umask_mode(tmp_path, umask):
    target = tmp_path / "h.json"
    umask(0o077)
    fileio.atomic_write_json(str(target), [1])
    assert mode_of(target) == 0o600
    umask(0o022)
    fileio.atomic_write_json(str(target), [2])
    assert mode_of(target) == 0o644 and json.loads(target.read_text()) == [2]


def test_atomic_write_fsyncs_then_replaces_in_the_same_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])

    def replace(src, dst):
        events.append(("replace", os.path.dirname(src), os.path.basename(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    target = tmp_path / "sub" / "c.json"
    fileio.atomic_write_json(str(target), {"k": "v"})
    assert json.loads(target.read_text()) == {"k": "v"}
    assert events[0] == "fsync"          # the data reaches the disk before the rename
    kind, directory, name = events[1]
    assert kind == "replace" and directory == str(tmp_path / "sub")
    assert name.startswith(".c.json.") and name.endswith(".tmp")


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.json"
    target.write_text('"old"')

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        fileio.atomic_write(str(target), boom)
    assert target.read_text() == '"old"'
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


# ---------------------------------------------------------------- bench step without PyTorch (item 10)

# runs `python -m minireuse ...` with `torch` unimportable even where it is installed
HIDE_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'minireuse'; "
              "runpy.run_module('minireuse', run_name='__main__', alter_sys=True)")


def test_step_bench_without_pytorch_runs_and_says_the_row_was_skipped(tmp_path):
    out = tmp_path / "step.json"
    flags = ["bench", "step", "--device", "cpu", "--data", str(tmp_path / "no-such-dir"),
             "--batch", "8", "--batches", "1", "--steps", "1", "--warmup", "0", "--json", str(out)]
    if importlib.util.find_spec("torch") is None:
        cmd = [sys.executable, "-m", "minireuse"] + flags
    else:
        cmd = [sys.executable, "-c", HIDE_TORCH] + flags
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MINIREUSE_DEVICE="cpu")
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "NOT CIFAR-10" in r.stdout                                # the random fixture, and it says so
    assert "minireuse exact" in r.stdout and "data pipeline" in r.stdout
    assert "pytorch eager: skipped: PyTorch is not installed" in r.stdout
    assert "pip install -e '.[compare]'" in r.stdout
    report = json.loads(out.read_text())
    row = next(x for x in report["rows"] if x["name"] == "pytorch eager")
    assert row["ms"] is None and row["skipped"] is True and "not installed" in row["reason"]
    assert report["skipped"] == {"pytorch eager": row["reason"]}
    exact = next(x for x in report["rows"] if x["name"] == "minireuse exact")
    assert exact["ms"] > 0


def test_table_with_a_skipped_torch_row_has_no_pytorch_ratios():
    rows = [dict(name="minireuse exact", ms=10.0, ms_p10=9.0, ms_p90=11.0, epoch_s=3.9, implementation="numpy"),
            bench_step.skipped_row("pytorch eager", "PyTorch is not installed; for this row: x"),
            dict(name="data pipeline", ms=1.0, ms_p10=1.0, ms_p90=1.0, epoch_s=0.4, implementation="b")]
    report = dict(device="cpu", commit="c", data="d", batch=8, steps=1, warmup=0, steps_per_epoch=391,
                  rows=rows, skipped={})
    table = bench_step.format_table(report)
    exact_line = next(line for line in table.splitlines() if line.startswith("minireuse exact"))
    assert "1.00x" in exact_line and exact_line.split()[-2] == "-"     # vs pytorch: none; vs exact: 1.00x
    assert table.splitlines()[-1] == "pytorch eager: skipped: PyTorch is not installed; for this row: x"


def setup_cfg():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return cfg


def listed(value):
    return [x.strip() for x in value.replace(",", "\n").splitlines() if x.strip()]


def test_compare_extra_installs_pytorch():
    extras = setup_cfg()["options.extras_require"]
    assert any(req.startswith("torch") for req in listed(extras["compare"]))
    assert "[compare]" in bench_step.TORCH_INSTALL_HINT


def test_gpu_extras_bring_cupys_toolkit_and_the_readme_names_them():
    """CuPy 14 wheels compile kernels only with a CUDA toolkit: its [ctk] extra brings one."""
    extras = setup_cfg()["options.extras_require"]
    readme = open(os.path.join(ROOT, "README.md")).read()
    for extra, wheel in (("gpu-cuda13", "cupy-cuda13x[ctk]"), ("gpu-cuda12", "cupy-cuda12x[ctk]")):
        assert listed(extras[extra]) == [wheel]
        assert f"'.[{extra}]'" in readme and f"`{wheel}`" in readme


# ---------------------------------------------------------------- package data (item 12)

def test_package_data_is_declared_and_matches_the_files():
    cfg = setup_cfg()
    assert cfg["options"]["packages"].strip() == "find_namespace:"
    data = cfg["options.package_data"]
    assert sorted(listed(data["minireuse.kernels"])) == ["*.cu", "host_runtime.h"]
    kernel_globs = listed(data["minireuse.reuse.kernels"])
    assert sorted(kernel_globs) == ["*.cu", "*.cuh"]
    kdir = os.path.join(ROOT, "minireuse", "reuse", "kernels")
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(kdir, "*")) if os.path.isfile(p)}
    matched = {os.path.basename(p) for g in kernel_globs for p in glob.glob(os.path.join(kdir, g))}
    assert on_disk and matched == on_disk             # every kernel source ships, nothing is left out
    assert os.path.isfile(os.path.join(ROOT, "minireuse", "kernels", "host_runtime.h"))
    assert os.path.isfile(os.path.join(ROOT, "minireuse", "kernels", "step_kernels.cu"))


def test_package_discovery_lists_every_folder_of_the_package():
    """What setuptools warns about ('... is absent from the packages configuration'):
    a folder under minireuse/ with files that the declared discovery does not list."""
    setuptools = pytest.importorskip("setuptools")
    cfg = setup_cfg()
    finder = {"find:": setuptools.find_packages,
              "find_namespace:": setuptools.find_namespace_packages}[cfg["options"]["packages"].strip()]
    find = cfg["options.packages.find"]
    found = set(finder(ROOT, include=listed(find["include"]), exclude=listed(find.get("exclude", ""))))
    folders = set()
    for d, subdirs, files in os.walk(os.path.join(ROOT, "minireuse")):
        subdirs[:] = [s for s in subdirs if s != "__pycache__"]
        if files:
            folders.add(os.path.relpath(d, ROOT).replace(os.sep, "."))
    assert "minireuse.reuse.kernels" in found
    assert folders <= found
    assert not any("__pycache__" in p for p in found)


# ---------------------------------------------------------------- the Makefile's virtual environment (item 12)

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


# A fake interpreter: it logs how it was called (its own path first) and does what make
# relies on: `-m venv DIR` creates DIR/bin/python (another fake), `-m pip install -e` leaves
# the install's dist-info in that environment. Everything else only logs.
FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "$MAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
fi
case "$*" in
    "-m pip install -q -e"*) mkdir -p "$(dirname "$0")/../lib/python3.x/site-packages/minireuse-0.1.0.dist-info" ;;
esac
"""


@pytest.fixture
def project(tmp_path):
    """The project's Makefile, setup.cfg and pyproject.toml, a logging scripts/gpu_check.sh,
    and a fake python3 first on the PATH."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), root / name)
    (root / "scripts" / "gpu_check.sh").write_text('echo "gpu_check PYTHON=$PYTHON" >> "$MAKE_LOG"\n')
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("python3", "python3.x"):
        (bindir / name).write_text(FAKE_PYTHON)
        (bindir / name).chmod(0o755)
    return root


def run_make(project, *args, virtual_env=None):
    """The commands the fake interpreters ran for `make ARGS`, with the project's path cut."""
    log = project / "make.log"
    log.write_text("")
    # a clean environment: nothing of a calling make or an active virtual environment leaks in
    env = {k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(PATH=f"{project.parent / 'bin'}:{os.environ['PATH']}", MAKE_LOG=str(log))
    if virtual_env:
        env["VIRTUAL_ENV"] = virtual_env
    r = subprocess.run(["make", "--no-print-directory", *args, "DATA=nodata", "SHARED_CIFAR=/nonexistent"],
                       cwd=str(project), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bin_dir = str(project.parent / "bin") + "/"
    return [line.replace(bin_dir, "").replace(str(project) + "/", "") for line in log.read_text().splitlines()]


@needs_make
def test_make_runs_the_interpreter_it_should_and_installs_only_when_needed(project, tmp_path):
    venv, install = ".venv/bin/python", "-m pip install -q -e .[test]"
    # a fresh clone: .venv is created, pip upgraded, the project installed, then the tests run
    assert run_make(project, "test") == ["python3 -m venv .venv", f"{venv} -m pip install -q --upgrade pip",
                                         f"{venv} {install}", f"{venv} -m pytest -q tests"]
    # installed and nothing changed: no install step
    assert run_make(project, "test") == [f"{venv} -m pytest -q tests"]
    assert run_make(project, "cifar")[-1].startswith(f"{venv} -m minireuse train --model cifarnet --data nodata")
    # setup.cfg newer than the install: installed again, into the same .venv
    earlier = os.stat(project / "setup.cfg").st_mtime - 10
    os.utime(project / ".venv" / ".installed", (earlier, earlier))
    assert run_make(project, "test") == [f"{venv} {install}", f"{venv} -m pytest -q tests"]
    # the install removed (pip uninstall) although the stamp is fresh: installed again
    shutil.rmtree(project / ".venv" / "lib")
    assert run_make(project, "test") == [f"{venv} {install}", f"{venv} -m pytest -q tests"]
    # gpu-check installs into make's own .venv first and hands the script that interpreter
    assert run_make(project, "gpu-check") == [f"gpu_check PYTHON={venv}"]
    # an active virtual environment: its python3 as it is (`make test` installs nothing there)
    active = str(tmp_path / "active")
    assert run_make(project, "test", virtual_env=active) == ["python3 -m pytest -q tests"]
    assert run_make(project, "cifar", virtual_env=active)[0] == f"python3 {install}"
    # PYTHON given: that interpreter, no .venv, no install for the tests or the GPU check
    assert run_make(project, "test", "PYTHON=python3.x") == ["python3.x -m pytest -q tests"]
    assert run_make(project, "gpu-check", "PYTHON=python3.x") == ["gpu_check PYTHON=python3.x"]
    assert run_make(project, "cifar", "PYTHON=python3.x")[0] == f"python3.x {install}"


def test_dot_venv_is_ignored_by_git():
    lines = open(os.path.join(ROOT, ".gitignore")).read().split()
    assert ".venv/" in lines or ".venv" in lines or "/.venv/" in lines


def test_test_modules_share_helpers_through_helper_modules_only():
    """A test file imports helpers (conftest, cli_helpers, gradcheck, ...), never another
    test file: a test module imported elsewhere runs its own tests' imports twice and ties
    unrelated files together."""
    import ast
    tests = os.path.join(ROOT, "tests")
    offenders = []
    for name in sorted(os.listdir(tests)):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        tree = ast.parse(open(os.path.join(tests, name)).read())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {m}" for m in mods if m.split(".")[0].startswith("test_")]
    assert not offenders, offenders
