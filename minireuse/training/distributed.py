"""Data-parallel training over processes: one model, N processes, one global batch.

    mpiexec -n 2 python -m minireuse train --batch-size 128 ...

Every process builds the same model from the same seed, draws the same global batch
(same shuffled order, same augmentation) and trains on its contiguous share of it
(rows [lo, hi) of the batch). After the backward, the gradients of every parameter,
weighted by the process's share of the batch, go into ONE flat buffer with the
step's loss and accuracy sums and the Ctrl-C flag, and one all-reduce (a sum) gives
every process the gradient of the whole batch: each applies the same update, so the
models stay equal. In exact mode the run is the one-process run with the same global
batch up to float rounding (the order of the sums differs); dropout masks are the
rows of the mask that one process would draw for the whole batch.

Communicators, one small interface (rank, size, allreduce in place, broadcast,
barrier, allgather_object for small host objects, abort):
- SingleProcess: size 1, what runs when not launched by mpiexec;
- MPICommunicator: mpi4py, for NumPy arrays (the CPU);
- NCCLCommunicator: cupy.cuda.nccl for CuPy arrays (the GPU), its unique id broadcast
  through MPI; host objects go through MPI.

What is per process, not global:
- deep reuse: each process hashes and clusters its own share of the batch, so
  clusters never span processes, and r_c and errors are per share. The adaptive
  strategy decides from statistics averaged over the processes (ladder errors,
  per-layer records, the sampled harm; the loss is global), so every process takes the
  same decision at the same step; the strategy's state is compared every epoch.
- BatchNorm normalises with the statistics of the process's share (as PyTorch's DDP
  without SyncBatchNorm). Its running statistics are averaged over the processes,
  weighted by share, in the same all-reduce: the running mean is then the one-process
  one; the running variance misses the spread between shares' means.

Faults: an exception on one process prints its message, naming the process, and
aborts every process (MPI_Abort), so none is left waiting in a collective.
"""
import hashlib
import json
import os
import sys
import time
import traceback

import numpy as np

from .. import backend

INSTALL = "pip install -e '.[distributed]' (mpi4py and the mpich wheel, which brings mpiexec)"
# the process count that a launcher gives its processes (MPICH/Hydra, Open MPI)
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
MODES = ("auto", "on", "off")
NO_NCCL = ("CuPy finds no NCCL, which data-parallel training on GPUs needs: install it (pip install "
           "nvidia-nccl-cu12, or python -m cupyx.tools.install_library --library nccl --cuda 12.x) or train on "
           "the CPU (--device cpu)")
_world = {"comm": None}
# how long a process waiting in an all-reduce sleeps between polls
POLL_S = 2e-4


class DistributedError(RuntimeError):
    """A setting or an environment that data-parallel training cannot run with."""


class SingleProcess:
    """The communicator of a run in one process: every collective is the identity, and the
    trainer keeps its one-process path (``data_parallel`` False)."""

    rank, size, local_rank = 0, 1, 0
    data_parallel = False

    def allreduce(self, buf):
        return buf

    def broadcast(self, buf, root=0):
        return buf

    def barrier(self):
        pass

    def allgather_object(self, obj):
        return [obj]

    def abort(self, code):
        sys.exit(code)


class MPICommunicator:
    """mpi4py's COMM_WORLD; allreduce and broadcast work in place on NumPy arrays."""

    data_parallel = True

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise DistributedError(f"data-parallel training needs mpi4py ({e}): {INSTALL}") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()

    def allreduce(self, buf):
        """Sum ``buf`` over the processes, in place. The processes first meet in a barrier that
        a waiting process polls with sleeps in between, instead of spinning as MPI's blocking
        calls do (on a machine with as many processes as cores, or shared with other work, a
        spinning wait takes the core that a slower process needs); the all-reduce itself then
        runs blocking, with every process there (a nonblocking one advances only when polled)."""
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(POLL_S)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def broadcast(self, buf, root=0):
        self.comm.Bcast(buf, root=root)
        return buf

    def barrier(self):
        self.comm.Barrier()

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def abort(self, code):
        self.comm.Abort(code)


class NCCLCommunicator:
    """NCCL over the processes of ``host`` (an MPICommunicator, or SingleProcess for one
    process): allreduce and broadcast work in place on CuPy arrays, on the current stream;
    host objects, the barrier and abort go through ``host``."""

    data_parallel = True

    def __init__(self, host):
        cupy = backend.require_gpu()
        try:
            from cupy.cuda import nccl
        except ImportError:
            nccl = None
        if nccl is None or not getattr(nccl, "available", True):
            raise DistributedError(NO_NCCL)
        self.cupy, self.nccl, self.host = cupy, nccl, host
        self.rank, self.size, self.local_rank = host.rank, host.size, host.local_rank
        uid = host.allgather_object(nccl.get_unique_id() if host.rank == 0 else None)[0]
        self.comm = nccl.NcclCommunicator(host.size, uid, host.rank)

    def _datatype(self, buf):
        types = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32, np.dtype(np.float64): self.nccl.NCCL_FLOAT64}
        if buf.dtype not in types or not buf.flags.c_contiguous:
            raise TypeError(f"NCCL collectives take contiguous float32/float64 arrays, got {buf.dtype}")
        return types[buf.dtype]

    def allreduce(self, buf):
        """Sum ``buf`` over the processes, in place (queued on the current stream)."""
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._datatype(buf), self.nccl.NCCL_SUM, stream)
        return buf

    def broadcast(self, buf, root=0):
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.bcast(buf.data.ptr, buf.size, self._datatype(buf), root, stream)
        return buf

    def barrier(self):
        self.cupy.cuda.get_current_stream().synchronize()
        self.host.barrier()

    def allgather_object(self, obj):
        return self.host.allgather_object(obj)

    def abort(self, code):
        self.host.abort(code)


def launched_processes():
    """How many processes the launcher (mpiexec) started, from its environment; 1 without one."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def world(mode="auto"):
    """The communicator of every process of this run: 'auto' is MPI when mpiexec started more
    than one process, else SingleProcess; 'on' is MPI (even for one process); 'off' is
    SingleProcess. Under MPI with more than one process, an uncaught exception on any
    process aborts all of them (fail_all)."""
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    launched = launched_processes()
    if mode == "off" or (mode == "auto" and launched == 1):
        comm = SingleProcess()
    else:
        if mode == "auto":
            try:
                import mpi4py  # noqa: F401  (the check only: MPICommunicator imports MPI)
            except ImportError:
                raise DistributedError(f"mpiexec started {launched} processes, and data-parallel training "
                                       f"needs mpi4py to join them: {INSTALL}") from None
        comm = MPICommunicator()
        if comm.size > 1:
            sys.excepthook = lambda *exc: fail_all(
                comm, f"process {comm.rank} of {comm.size} failed, stopping every process:\n"
                + "".join(traceback.format_exception(*exc)), 1)
    _world["comm"] = comm
    return comm


def where(comm=None):
    """' (process r of n)' for messages of a run in several processes, else ''."""
    comm = comm or _world["comm"]
    return f" (process {comm.rank} of {comm.size})" if comm is not None and comm.size > 1 else ""


def fail_all(comm, message, code):
    """Print ``message`` and end every process of the run with exit status ``code``."""
    sys.stdout.flush()
    print(message.rstrip("\n"), file=sys.stderr, flush=True)
    comm.abort(code)


def finish(code, agreed=False):
    """The exit status of a CLI command: with several processes, a failure that the
    processes did not agree on (an error on one of them) aborts them all."""
    comm = _world["comm"]
    if code and comm is not None and comm.size > 1 and not agreed:
        fail_all(comm, f"stopping every process: process {comm.rank} failed with exit status {code}", code)
    return code


def settings_digest(obj):
    """A short hash of a JSON-able object, equal on every process that holds an equal one."""
    text = json.dumps(obj, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(comm, what, obj):
    """Raise DistributedError unless every process holds an equal ``obj``."""
    digests = comm.allgather_object(settings_digest(obj))
    if len(set(digests)) > 1:
        groups = {}
        for rank, d in enumerate(digests):
            groups.setdefault(d, []).append(rank)
        listed = ", ".join(str(ranks) for ranks in groups.values())
        raise DistributedError(f"{what} differ between processes (groups that agree: {listed}): "
                               "start every process with the same command and files")


def mean_of(values):
    """The mean over processes of equal-shaped records: dicts key by key, lists item by item,
    numbers averaged (None ignored), anything else taken from the first process."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == len(first)
                                                for v in present):
        return [mean_of(list(items)) for items in zip(*present)]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for v in present if isinstance(v, dict) for k in v))
        return {k: mean_of([v.get(k) for v in present if isinstance(v, dict)]) for k in keys}
    numbers = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(present):
        return first
    if all(isinstance(v, int) for v in numbers) and len(set(numbers)) == 1:
        return first
    return float(sum(numbers) / len(numbers))


def share(n, rank, size):
    """Rows [lo, hi) of a batch of n that process ``rank`` of ``size`` takes: contiguous,
    in rank order, sizes differing by at most one."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class DataParallel:
    """The hooks of one training run in ``comm.size`` processes. With SingleProcess every hook
    leaves the trainer's one-process behaviour as it is; a communicator whose
    ``data_parallel`` is true, even of one process (``--distributed on``), runs the whole
    data-parallel path."""

    def __init__(self, comm, device, cfg):
        self.size, self.rank = comm.size, comm.rank
        self.active = comm.data_parallel
        batch_size = cfg["batch_size"]
        if self.size > 1 and batch_size % self.size:
            raise ValueError(f"--batch-size {batch_size} does not divide among the {self.size} processes: each "
                             f"takes an equal share of every batch; give a multiple of {self.size} (the batch "
                             "size is the global one, as in one process)")
        if self.active and cfg.get("graph") == "on":
            raise ValueError("--graph on: CUDA graphs are not recorded in data-parallel training (the all-reduce "
                             "runs between the backward and the update); use --graph auto or off")
        if device == "gpu" and isinstance(comm, MPICommunicator):
            backend.require_gpu().cuda.Device(comm.local_rank % backend.require_gpu().cuda.runtime
                                              .getDeviceCount()).use()
            comm = NCCLCommunicator(comm)
        self.comm = comm
        self.writes = self.rank == 0     # only process 0 writes history, checkpoints, the bar
        self._bucket = None
        self.step_sums = None            # the last step's [loss sum, correct] over every process
        self.stopping = False            # whether some process asked to stop (Ctrl-C) at the last step
        self._flag = None

    def check_start(self, cfg, n_train, model, opt):
        """Before the first step: the settings must be equal on every process, the last batch of
        an epoch must give every process a row, and process 0's parameters (and buffers and
        optimizer state) are broadcast so that every process starts from the same model."""
        if not self.active:
            return
        check_same(self.comm, "the training settings", cfg)
        last = n_train % cfg["batch_size"]
        if 0 < last < self.size:
            raise ValueError(f"the last batch of an epoch holds {last} of the {n_train} training images, fewer "
                             f"than the {self.size} processes: change --limit-train or --batch-size")
        arrays = self._state_arrays(model) + [v for s in opt.state.values() for v in s.values()]
        check_same(self.comm, "the model's parameter shapes", [list(a.shape) for a in arrays])
        self._broadcast(arrays)

    def _broadcast(self, arrays):
        xp = backend.get_array_module(*arrays)
        dtype = np.result_type(*[a.dtype for a in arrays])
        flat = xp.concatenate([a.ravel().astype(dtype) for a in arrays])
        self.comm.broadcast(flat)
        offset = 0
        for a in arrays:
            a[...] = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size

    @staticmethod
    def _state_arrays(model):
        return ([layer.params[name] for _, layer, name in model.named_parameters()]
                + [layer.buffers[name] for _, layer, name in model.named_buffers()])

    def shard(self, xb, yb, model=None):
        """This process's rows of a global batch; the Dropout layers of ``model`` learn where
        they lie in the batch, so that they draw those rows of the whole batch's mask."""
        if not self.active:
            return xb, yb
        lo, hi = share(len(yb), self.rank, self.size)
        if model is not None:
            for layer in model.layers:
                if hasattr(layer, "batch_shard"):
                    layer.batch_shard = (lo, len(yb))
        self._share = (hi - lo) / len(yb)
        return xb[lo:hi], yb[lo:hi]

    def barrier(self):
        """Wait for every process (before a stop that every process agreed on)."""
        self.comm.barrier()

    def watch(self, flag):
        """The Ctrl-C flag the training loop reads: with several processes, true once any
        process's own ``flag`` was set at a step (all of them see it after the same step)."""
        if not self.active:
            return flag
        self._flag = flag
        return AgreedFlag(self)

    def allreduce_gradients(self, model, loss, logits, labels):
        """After the backward: every gradient becomes the whole batch's (the share-weighted sum
        over processes), BatchNorm running statistics the share-weighted mean, and step_sums
        the whole batch's [loss sum, correct], by one all-reduce of one flat buffer."""
        if not self.active:
            return
        grads = [(layer.grads, name) for _, layer, name in model.named_parameters()]
        buffers = [(layer.buffers, name) for _, layer, name in model.named_buffers()]
        arrays = [store[name] for store, name in grads + buffers]
        xp = backend.get_array_module(*arrays)
        n_values = sum(a.size for a in arrays)
        if self._bucket is None or self._bucket.size != n_values + 3:
            self._bucket = xp.empty(n_values + 3, dtype=np.result_type(*[a.dtype for a in arrays]))
        bucket, offset = self._bucket, 0
        for a in arrays:
            bucket[offset:offset + a.size] = a.ravel()
            offset += a.size
        bucket[:offset] *= self._share
        bucket[offset] = loss * len(labels)
        bucket[offset + 1] = (logits.argmax(axis=1) == labels).sum()
        bucket[offset + 2] = 1.0 if self._flag else 0.0
        self.comm.allreduce(bucket)
        offset = 0
        for store, name in grads + buffers:
            a = store[name]
            a[...] = bucket[offset:offset + a.size].reshape(a.shape)
            offset += a.size
        self.step_sums = bucket[offset:offset + 2].astype(np.float64)
        self.stopping = self.stopping or bool(bucket[offset + 2] > 0)

    def totals(self, totals):
        """The trainer's epoch sums: with several processes, each step adds the whole batch's
        sums (step_sums), so every process holds the same totals."""
        return GlobalTotals(totals, self) if self.active else totals

    def sum_floats(self, *values):
        """Host numbers summed over the processes (evaluation sums)."""
        if not self.active:
            return values
        xp = backend.xp()
        buf = self.comm.allreduce(xp.asarray(values, dtype=np.float64))
        return tuple(float(v) for v in backend.asnumpy(buf))

    def agree(self, obj):
        """The mean over processes of a record (mean_of); the same on every process."""
        return mean_of(self.comm.allgather_object(obj)) if self.active else obj

    def check_strategy(self, strategy):
        """Raise unless the reuse strategy took the same decisions on every process."""
        if self.active and strategy is not None:
            check_same(self.comm, "the deep-reuse strategy's states", strategy.state_dict())


class AgreedFlag:
    """True once some process's Ctrl-C flag was set at a step (DataParallel.watch)."""

    def __init__(self, parallel):
        self.parallel = parallel

    def __bool__(self):
        return self.parallel.stopping


class GlobalTotals:
    """StepTotals whose ``add`` adds the whole batch's sums of the last all-reduce."""

    def __init__(self, totals, parallel):
        self.inner, self.parallel = totals, parallel

    @property
    def sums(self):
        return self.inner.sums

    def reset(self):
        self.inner.reset()

    def add(self, loss, logits, labels):
        self.inner.sums += self.parallel.step_sums

    def read(self):
        return self.inner.read()
