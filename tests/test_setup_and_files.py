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


@pytest.fixture
def project(tmp_path):
    """A directory with the project's Makefile, setup.cfg and pyproject.toml: enough for make -n."""
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


def make_n(project, target, *args, virtual_env=None):
    # a clean environment: nothing of a calling make (MAKEFLAGS, MAKELEVEL, its
    # command-line variables) or of an active virtual environment leaks in
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    if virtual_env:
        env["VIRTUAL_ENV"] = virtual_env
    r = subprocess.run(["make", "-n", "--no-print-directory", target, "DATA=nodata",
                        "SHARED_CIFAR=/nonexistent/make_cifar10.py", *args],
                       cwd=str(project), env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def fake_venv(project, stamp_age=0.0, installed=True):
    """A .venv as `make` leaves it: its python, the install stamp and the install's dist-info."""
    bindir = project / ".venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python").write_text("")
    if installed:
        (project / ".venv" / "lib" / "python3.x" / "site-packages" / "minireuse-0.1.0.dist-info").mkdir(parents=True)
    stamp = project / ".venv" / ".installed"
    stamp.write_text("")
    cfg_time = os.stat(project / "setup.cfg").st_mtime
    for name in ("setup.cfg", "pyproject.toml"):
        os.utime(project / name, (cfg_time - 100, cfg_time - 100))
    t = cfg_time - 100 + 50 - stamp_age      # stamp_age > 50: older than setup.cfg
    os.utime(stamp, (t, t))


@needs_make
def test_make_without_a_virtual_environment_creates_and_uses_dot_venv(project):
    out = make_n(project, "test")
    assert "python3 -m venv .venv" in out
    assert ".venv/bin/python -m pip install -q -e '.[test]'" in out
    assert out.strip().splitlines()[-1] == ".venv/bin/python -m pytest -q tests"
    cifar = make_n(project, "cifar")
    assert "python3 -m venv .venv" in cifar and ".venv/bin/python -m pip install -q -e '.[test]'" in cifar
    assert ".venv/bin/python -m minireuse train --model cifarnet --data nodata" in cifar
    assert not any(line.startswith("python3 -m pip") for line in cifar.splitlines())


@needs_make
def test_make_installs_only_when_missing_or_setup_cfg_is_newer(project):
    fake_venv(project)
    assert make_n(project, "test").strip() == ".venv/bin/python -m pytest -q tests"
    cifar = make_n(project, "cifar")
    assert "pip install -q -e" not in cifar and "-m venv" not in cifar
    assert ".venv/bin/python -m minireuse train" in cifar


@needs_make
def test_make_reinstalls_after_setup_cfg_changes(project):
    fake_venv(project, stamp_age=100)          # setup.cfg newer than the last install
    out = make_n(project, "test")
    assert "-m venv" not in out
    assert ".venv/bin/python -m pip install -q -e '.[test]'" in out


@needs_make
def test_make_reinstalls_an_uninstalled_package(project):
    fake_venv(project, installed=False)        # stamp fresh, but the install is gone
    out = make_n(project, "cifar")
    assert "-m venv" not in out and ".venv/bin/python -m pip install -q -e '.[test]'" in out


@needs_make
def test_make_in_an_active_virtual_environment_uses_it_as_before(project, tmp_path_factory):
    venv = str(tmp_path_factory.mktemp("active-venv"))
    assert make_n(project, "test", virtual_env=venv).strip() == "python3 -m pytest -q tests"
    cifar = make_n(project, "cifar", virtual_env=venv)
    assert "python3 -m pip install -q -e '.[test]'" in cifar and ".venv" not in cifar
    # .ci/run: its own environment activated, then `make test PYTHON=python`
    assert make_n(project, "test", "PYTHON=python", virtual_env=venv).strip() == "python -m pytest -q tests"


@needs_make
def test_make_with_an_explicit_python_uses_it_and_no_dot_venv(project):
    out = make_n(project, "test", "PYTHON=/usr/bin/python3.x")
    assert out.strip() == "/usr/bin/python3.x -m pytest -q tests"
    cifar = make_n(project, "cifar", "PYTHON=/usr/bin/python3.x")
    assert "/usr/bin/python3.x -m pip install -q -e '.[test]'" in cifar and ".venv" not in cifar


@needs_make
def test_make_gpu_check_installs_into_its_own_venv_and_takes_a_given_python_as_it_is(project):
    out = make_n(project, "gpu-check")
    assert ".venv/bin/python -m pip install -q -e '.[test]'" in out
    assert out.strip().splitlines()[-1] == ("PYTHON='.venv/bin/python' DATA='nodata' OUT_DIR='gpu_results' "
                                            "bash scripts/gpu_check.sh")
    # a GPU machine's python3, run from the source tree with no install step
    assert make_n(project, "gpu-check", "PYTHON=python3").strip() == \
        "PYTHON='python3' DATA='nodata' OUT_DIR='gpu_results' bash scripts/gpu_check.sh"


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
