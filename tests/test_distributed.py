"""Data-parallel training (minireuse.training.distributed): the pieces in one process, then whole runs
under `mpiexec -n 2` on the CPU compared with one-process runs of the same global batch.

The mpiexec cases need the .[distributed] extra (mpi4py and the mpich wheel's mpiexec);
without it they skip, saying so. Each run is a tiny CifarNet on the 80-image fixture.
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_helpers import base, history, learnable_data
from conftest import NO_GPU
from minireuse import backend
from minireuse.kernels import runtime, step_kernels
from minireuse.training import distributed
from minireuse.layers import Dropout
from minireuse.layers.simple import KEY_STRIDE, call_key
from minireuse.training.distributed import (DataParallel, DistributedError, NCCLCommunicator, SingleProcess,
                                            check_same, mean_of, share)
from minireuse.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None, "mpi4py is not installed: pip install -e '.[distributed]'"
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    found = shutil.which("mpiexec", path=path)
    return found, None if found else "no mpiexec on the PATH or beside this python (the mpich wheel brings one)"


MPIEXEC, NO_MPI = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason=str(NO_MPI))


class Loopback(SingleProcess):
    """A communicator of one process through which the trainer runs the whole data-parallel
    path (shards, the flat buffer, its all-reduce)."""

    data_parallel = True


class FakeComm(Loopback):
    """A process of a larger run whose allgather answers with given objects."""

    def __init__(self, rank, size, gathered=None):
        self.rank, self.size, self.gathered = rank, size, gathered

    def allgather_object(self, obj):
        return self.gathered


def test_each_process_takes_contiguous_rows_in_rank_order():
    for n, size in ((128, 2), (80, 3), (5, 4)):
        bounds = [share(n, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_a_batch_size_the_processes_do_not_divide_is_refused():
    cfg = dict(Trainer.DEFAULTS, batch_size=15)
    with pytest.raises(ValueError, match="does not divide among the 2 processes.*multiple of 2"):
        DataParallel(FakeComm(0, 2), "cpu", cfg)
    DataParallel(FakeComm(0, 3), "cpu", cfg)


def test_settings_that_differ_between_processes_are_named():
    check_same(FakeComm(0, 2, ["ab", "ab"]), "the training settings", {"lr": 0.1})
    with pytest.raises(DistributedError, match=r"training settings differ between processes "
                                               r"\(groups that agree: \[0\], \[1\]\)"):
        check_same(FakeComm(0, 2, ["ab", "cd"]), "the training settings", {"lr": 0.1})


def test_records_are_averaged_over_processes_the_same_way_everywhere():
    a = {"conv2": {"r_c": 0.125, "rel_error": None, "timed_calls": 4, "reuse": {"L": 16, "family": "offset"}},
         "errors": [0.5, 0.25]}
    b = {"conv2": {"r_c": 0.375, "rel_error": 0.2, "timed_calls": 4, "reuse": {"L": 16, "family": "offset"}},
         "errors": [0.25, 0.75]}
    want = {"conv2": {"r_c": 0.25, "rel_error": 0.2, "timed_calls": 4, "reuse": {"L": 16, "family": "offset"}},
            "errors": [0.375, 0.5]}
    assert mean_of([a, b]) == want
    assert mean_of([None, None]) is None


def test_dropout_given_its_rows_draws_them_from_the_whole_batchs_mask():
    x = np.random.default_rng(0).standard_normal((12, 7)).astype(np.float32) + 2
    whole = Dropout(0.5, seed=(3, 1, 4))
    want = whole.forward(x)
    for lo, hi in ((0, 6), (6, 12), (4, 9)):
        part = Dropout(0.5, seed=(3, 1, 4))
        part.batch_shard = (lo, len(x))
        np.testing.assert_array_equal(part.forward(x[lo:hi]), want[lo:hi])


@pytest.mark.skipif(runtime.host_compiler() is None, reason="no host C++ compiler for the kernels' host build")
def test_the_gpu_dropout_key_moved_on_by_the_rows_before_gives_the_same_rows():
    """The GPU mask (the kernel's host build): the key of a share is the whole batch's key
    moved on by KEY_STRIDE per element before the share's first row."""
    x = np.random.default_rng(1).standard_normal((10, 9)).astype(np.float32) + 2
    key = call_key((5, 0, 2), 1)

    def mask(rows, first):
        k = (key + first * KEY_STRIDE) & 0xFFFFFFFFFFFFFFFF
        return step_kernels.dropout_forward(rows, 0.6, np.array([k & 0xFFFFFFFF, k >> 32], np.uint32))[0]

    np.testing.assert_array_equal(mask(x[4:10], 4 * x.shape[1]), mask(x, 0)[4:10])


def test_asking_for_mpi_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(DistributedError, match=r"\.\[distributed\]"):
        distributed.world("on")
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(DistributedError, match="mpiexec started 2 processes.*distributed"):
        distributed.world("auto")
    monkeypatch.setenv("PMI_SIZE", "1")
    assert isinstance(distributed.world("auto"), SingleProcess)


def one_process_communicator(device):
    if device == "cpu":
        return Loopback()
    try:
        return NCCLCommunicator(SingleProcess())
    except DistributedError as e:
        pytest.skip(str(e))


def tiny_cfg(tmp_path, name, device):
    return dict(model="cifarnet", epochs=1, batch_size=16, lr=0.02, warmup_epochs=0.0, device=device,
                out=str(tmp_path / name), log_every=2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not backend.gpu_available(), reason=f"{NO_GPU}/cupy on this machine"))])
def test_the_data_parallel_path_of_one_process_trains_as_the_plain_trainer(tmp_path, device):
    """On the GPU through NCCL (one process, no MPI needed): shards of a whole batch, the flat
    buffer, its all-reduce and the summed epoch totals give the plain trainer's run."""
    data = learnable_data(n_train=64, n_test=32)
    plain = Trainer(tiny_cfg(tmp_path, "plain", device), data=data, quiet=True)
    plain.fit()
    parallel = Trainer(tiny_cfg(tmp_path, "parallel", device), data=data, quiet=True,
                       comm=one_process_communicator(device))
    assert parallel.parallel.active and parallel.step.graph_mode == "off"
    parallel.fit()
    for (key, a, name), (_, b, _) in zip(plain.model.named_parameters(), parallel.model.named_parameters()):
        np.testing.assert_allclose(backend.asnumpy(b.params[name]), backend.asnumpy(a.params[name]), rtol=0,
                                   atol=1e-6, err_msg=key)
    assert parallel.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-6)
    assert parallel.history[0]["test_acc"] == plain.history[0]["test_acc"]


def test_the_distributed_extra_brings_mpi_with_mpiexec_and_ci_installs_it():
    import configparser
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    extra = cfg["options.extras_require"]["distributed"].split()
    assert any(r.startswith("mpi4py") for r in extra) and "mpich" in extra
    assert "'.[distributed]'" in distributed.INSTALL
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "pip install -q -e '.[test,distributed]'" in f.read()


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for name in distributed.LAUNCHER_SIZE_VARIABLES:
        env.pop(name, None)
    return env


def mpirun(n, *args, script=None, timeout=120):
    """`mpiexec -n n python -m minireuse ARGS` (or python SCRIPT ARGS): CompletedProcess."""
    command = [MPIEXEC, "-n", str(n), sys.executable] + ([script] if script else ["-m", "minireuse"])
    return subprocess.run(command + list(args), env=_env(), capture_output=True, text=True, timeout=timeout)


def one_process(*args):
    return subprocess.run([sys.executable, "-m", "minireuse", *args], env=_env(), capture_output=True, text=True,
                          timeout=120)


def tiny(data, out, *extra):
    return base(data, out, "--batch-size", "16", "--epochs", "2", *extra)


def parameters(out):
    with np.load(os.path.join(out, "model.npz")) as f:
        return {k: f[k] for k in f.files}


def assert_same_model(a, b):
    pa, pb = parameters(a), parameters(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=0, atol=2e-6, err_msg=k)


def check(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@needs_mpi
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, data):
    """Exact mode, with augmentation and dropout: 8 steps of batch 16 split 8 + 8."""
    check(one_process(*tiny(data, tmp_path / "one")))
    check(mpirun(2, *tiny(data, tmp_path / "two")))
    assert_same_model(tmp_path / "one", tmp_path / "two")
    for a, b in zip(history(tmp_path / "one")["epochs"], history(tmp_path / "two")["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_acc"] == b["test_acc"] and a["train_acc"] == b["train_acc"]


@needs_mpi
def test_a_run_of_two_processes_resumes_exactly_with_two_or_one(tmp_path, data):
    first = tiny(data, tmp_path / "a")
    first[first.index("--epochs") + 1] = "1"
    check(mpirun(2, *first))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    check(mpirun(2, "train", "--resume", str(tmp_path / "a" / "checkpoint.npz"), "--epochs", "2", "--quiet"))
    check(one_process("train", "--resume", str(tmp_path / "b" / "checkpoint.npz"), "--epochs", "2", "--quiet"))
    assert_same_model(tmp_path / "a", tmp_path / "b")
    assert [e["epoch"] for e in history(tmp_path / "a")["epochs"]] == [1, 2]


@needs_mpi
def test_an_exception_on_process_1_ends_every_process_with_its_message(tmp_path, data):
    began = time.monotonic()
    result = mpirun(2, *tiny(data, tmp_path / "x"), script=os.path.join(ROOT, "tests", "mpi_failing_train.py"),
                    timeout=60)
    assert time.monotonic() - began < 30
    assert result.returncode != 0
    assert "process 1 of 2 failed, stopping every process" in result.stderr
    assert "injected failure on process 1 at its second step" in result.stderr
    assert not os.path.exists(tmp_path / "x" / "model.npz")


@needs_mpi
def test_settings_that_differ_between_processes_stop_the_run_at_start(tmp_path, data):
    args = tiny(data, tmp_path / "x")
    command = [MPIEXEC, "-n", "1", sys.executable, "-m", "minireuse", *args, ":",
               "-n", "1", sys.executable, "-m", "minireuse", *args, "--lr", "0.01"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "the training settings differ between processes" in result.stderr
    result = mpirun(2, *base(data, tmp_path / "y", "--batch-size", "15"))
    assert result.returncode != 0 and "--batch-size 15 does not divide among the 2 processes" in result.stderr


@needs_mpi
def test_the_adaptive_strategy_takes_the_same_decisions_on_every_process(tmp_path, data):
    """Reuse from the first step with every stage measured: the ladder order, the sampled
    errors and the speed guard decide from statistics averaged over both processes; the
    trainer compares the strategy's state on both processes every epoch and stops on a
    difference, so a finished run took the same decisions on both."""
    config = tmp_path / "reuse.json"
    config.write_text('{"layers": {"conv2": [{"L": 16, "H": 8}, {"L": 16, "H": 12}], '
                      '"fc3": [{"L": 64, "H": 8}, {"L": 32, "H": 12}]}, "options": {"start_after": 0.0, '
                      '"steady_drop": null, "sample_every": 1, "probe_every": 2, "error_bound": 0.3}}')
    check(mpirun(2, *tiny(data, tmp_path / "r", "--reuse", "adaptive", "--reuse-config", str(config))))
    events = [e["reason"] for e in history(tmp_path / "r")["epochs"][0]["reuse_events"]]
    assert any(r.startswith("ladder ordered by measured error") for r in events)
    assert any(r.startswith("sampled error") for r in events)


class OneStage:
    def state_dict(self):
        return {"stage": {"conv2": 1}}


def test_process_state_comparison_catches_a_diverged_strategy():
    strategy = OneStage()
    parallel = DataParallel(FakeComm(0, 2, ["x", "y"]), "cpu", dict(Trainer.DEFAULTS))
    with pytest.raises(DistributedError, match="strategy's states differ"):
        parallel.check_strategy(strategy)
