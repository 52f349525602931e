"""Training loop: epochs of SGD over CIFAR-10 with evaluation, history and checkpoints.

    python -m minireuse train --data DIR --epochs N --out runs/x

Every epoch appends a record to OUT/history.json and rewrites OUT/checkpoint.npz
(both atomically). With ``eval_every`` below 1 the test set is also evaluated every
such fraction of an epoch (the record's ``mid_evals``, each with the training seconds
of the epoch so far); evaluation time is never counted as training time, and an
evaluation draws no random number, so it changes nothing that is trained. All randomness of step s of epoch e (shuffle order, crops,
flips, dropout masks) is drawn from generators seeded with (seed, e[, s]), so a
run resumed from a checkpoint continues exactly as the uninterrupted run would
(bit for bit on the CPU).

On the GPU a step never waits for the device (docs/speed.md): the loss and accuracy
are summed on the device, and the progress bar and the non-finite-loss guard read
those sums through an asynchronous copy that lands a few steps later (one wait per
epoch, at its end). With ``graph`` 'auto' or 'on' (the default is 'off'), the step
is recorded once as a CUDA graph and replayed (minireuse.step_graphs). Checkpoints are
written and read by minireuse.checkpoint.
"""
import contextlib
import functools
import math
import os
import shlex
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from . import backend, step_kernels
from .layers.simple import reseed_layers
from .losses import SoftmaxCrossEntropy
from .checkpoint import TrainingError, load_checkpoint, read_checkpoint, resume_conflicts, save_checkpoint
from .distributed import DataParallel, SingleProcess
from .fileio import atomic_write_json
from .models import MODELS
from .optim import SGD, Adam, make_schedule
from .outdir import OutLock, OutputError, check_unlocked, check_writable
from .reuse.adaptive import make_strategy, resolved_layers, stage_label
from .strategy_steps import StrategySteps
from .timing import LayerTimer

# CIFAR-10's training and test images, for the memory estimate made before they are read
CIFAR_IMAGES = (50000, 10000)
CHECKPOINT = "checkpoint.npz"
HISTORY = "history.json"
MODEL = "model.npz"
# what a finished or interrupted run leaves in its directory (--overwrite removes them)
RUN_FILES = (CHECKPOINT, HISTORY, MODEL, "history.png")
# set by `make cifar` to its own invocation: the interpreter it runs is the project's
# environment, which a bare `python` on the PATH may not be
MAKE_COMMAND_ENV = "MINIREUSE_MAKE_COMMAND"
# with CUDA graphs, one step in this many runs eagerly with the per-layer timers
# (a replayed graph cannot be timed per layer)
GRAPH_TIMING_EVERY = 100


def check_number(name, value, low=None, high=None, open_low=False, open_high=False):
    """Raise ValueError unless value is a finite number in its range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        lo = "" if low is None else ("(" if open_low else "[") + str(low)
        hi = "" if high is None else str(high) + (")" if open_high else "]")
        rng = f"in {lo}, {hi}" if lo and hi else (f"{'>' if open_low else '>='} {low}" if lo else f"<= {high}")
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")


def resume_command(ckpt):
    """The command that continues the run saved in ``ckpt``, for how this process was started."""
    make = os.environ.get(MAKE_COMMAND_ENV)
    if make:
        return f"{make} RESUME=1"
    return f"{shlex.quote(sys.executable)} -m minireuse train --resume {shlex.quote(ckpt)}"


def checkpoint_position(ckpt):
    """Where the run saved in ``ckpt`` stands, in words."""
    try:
        meta = read_checkpoint(ckpt, arrays=False)[0]
    except TrainingError:
        return "an unreadable state"
    return f"epoch {meta['epoch'] + 1}, step {meta['step']}" if meta["step"] else f"the end of epoch {meta['epoch']}"


def refuse_existing_run(out):
    """Raise OutputError when ``out`` holds a run's files, with the ways on: resume it,
    another output directory, or start over explicitly (nothing is replaced unasked)."""
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not present:
        return
    ckpt = os.path.join(out, CHECKPOINT)
    where = f"its checkpoint is at {checkpoint_position(ckpt)}" if CHECKPOINT in present else \
        f"{', '.join(present)}, no checkpoint"
    make = os.environ.get(MAKE_COMMAND_ENV)
    other, over = (("another OUT=DIR", f"{make} TRAIN_FLAGS=--overwrite") if make
                   else ("another --out DIR", "--overwrite"))
    resume = f"continue it with {resume_command(ckpt)}, " if CHECKPOINT in present else ""
    raise OutputError(f"{os.path.abspath(out)} already holds a run ({where}): {resume}choose {other}, or "
                      f"start over with {over} (discards it)")


def clear_run(out):
    """Remove the files of the run in ``out`` (--overwrite), so none of them outlives the new run."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


def available_memory():
    """Bytes of memory the system can give without swapping (MemAvailable of /proc/meminfo),
    or None where that is not known (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def step_memory_bytes(model, batch, images):
    """A deliberately simple upper estimate of a CPU training run's peak memory, in bytes:
    the ``images`` as uint8 (32x32x3 each), the parameters four times (weights, gradients,
    two optimizer slots), and for one step every layer's output twice (kept for the
    backward, then its gradient) plus the largest conv im2col matrix twice (the forward's
    columns, the backward's column gradient), at the parameters' precision."""
    itemsize = max((p.dtype.itemsize for l in model.layers for p in l.params.values()), default=4)
    params = sum(int(np.prod(p.shape)) for l in model.layers for p in l.params.values())
    shape, outputs, columns = (batch, 32, 32, 3), 0, 0
    for layer in model.layers:
        W = layer.params.get("W")
        out = layer.output_shape(shape)
        if W is not None and W.ndim == 4:              # a conv: one im2col row per output pixel
            columns = max(columns, int(np.prod(out[:-1])) * int(np.prod(W.shape[:-1])))
        outputs += int(np.prod(out))
        shape = out
    return images * 32 * 32 * 3 + itemsize * (4 * params + 2 * outputs + 2 * columns)


def check_memory(model, batch, images):
    """Refuse, before any data is read, a CPU run whose estimated peak (step_memory_bytes)
    exceeds the memory available now (the GPU's memory is not estimated)."""
    need, have = step_memory_bytes(model, batch, images), available_memory()
    if have is not None and need > have:
        raise ValueError(f"training {model.name} with batches of "
                         f"{batch} needs about {need / 2**30:.1f} GiB of memory, but {have / 2**30:.1f} GiB are "
                         "available: lower --batch-size")


def build_optimizer(model, cfg):
    decay_layers = cfg.get("decay_layers")
    if cfg["optimizer"] == "sgd":
        return SGD(model, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                   weight_decay=cfg["weight_decay"], decay_layers=decay_layers)
    if cfg["optimizer"] == "adam":
        return Adam(model, lr=cfg["lr"], weight_decay=cfg["weight_decay"], decay_layers=decay_layers)
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; expected sgd or adam")


class StepTotals:
    """Device-resident sums over an epoch: [sum of loss * batch size, correct predictions].

    On CuPy arrays ``add`` is one fused kernel; on NumPy it is the array code.
    """

    def __init__(self, xp):
        self.sums = xp.zeros(2, dtype=np.float64)

    def reset(self):
        self.sums[...] = 0

    def add(self, loss, logits, labels):
        if step_kernels.supports(logits) and loss.dtype == logits.dtype:
            step_kernels.accumulate_step(self.sums, loss, logits, labels)
            return
        self.sums[0] += loss * len(labels)
        self.sums[1] += (logits.argmax(axis=1) == labels).sum()

    def read(self):
        """(loss sum, correct) as host floats; waits for the device."""
        loss_sum, correct = backend.asnumpy(self.sums)
        return float(loss_sum), float(correct)


def evaluate(model, loss_fn, iterator, stop=None, progress=None, parallel=None):
    """Mean loss and accuracy over an iterator; accumulates on the device, reads back once.

    stop: checked before every batch; when it returns True, None is returned at once.
    progress: the label of a progress bar over the batches (None: no bar).
    parallel: a distributed.DataParallel: each process evaluates its share of every batch."""
    totals, n = StepTotals(backend.xp()), 0
    with tqdm(iterator, total=len(iterator), desc=progress, unit="batch", leave=False, dynamic_ncols=True,
              disable=progress is None) as batches:
        for xb, yb in batches:
            if stop is not None and stop():
                return None
            if parallel is not None:
                xb, yb = parallel.shard(xb, yb)
                if len(yb) == 0:
                    continue
            logits = model.forward(xb, train=False)
            totals.add(loss_fn.forward(logits, yb), logits, yb)
            n += len(yb)
    loss_sum, correct = totals.read()
    if parallel is not None:
        loss_sum, correct, n = parallel.sum_floats(loss_sum, correct, n)
    return loss_sum / max(n, 1), correct / max(n, 1)


class Trainer:
    """Runs the epochs of one training job described by a config dict (see DEFAULTS)."""

    DEFAULTS = dict(model="cifarnet", data="data", epochs=30, batch_size=128, lr=0.05,
                    optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.004,
                    decay_layers=["fc3", "fc4"], schedule="cosine", warmup_epochs=1.0,
                    augment=True, seed=0, out="runs/cifarnet", limit_train=None, limit_test=None,
                    device="auto", log_every=25, download=True,
                    reuse="off", reuse_layers=None, reuse_options=None, graph="off", eval_every=1.0)
    # what a resumed run may change: where things are, how long it goes on, how it executes
    SAFE_TO_CHANGE = ("epochs", "data", "device", "graph", "download", "out", "limit_test", "log_every",
                      "eval_every")

    def __init__(self, cfg, data=None, model=None, quiet=False, comm=None):
        """comm: the communicator of a data-parallel run (minireuse.distributed); None: one process."""
        unknown = set(cfg) - set(self.DEFAULTS)
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        self.cfg = {**self.DEFAULTS, **cfg}
        c = self.cfg
        for key in ("epochs", "batch_size"):
            if not isinstance(c[key], int) or c[key] < 1:
                raise ValueError(f"{key} must be a positive integer, got {c[key]!r}")
        for key, low, high in (("lr", 0, None), ("momentum", 0, 1), ("weight_decay", 0, None),
                               ("warmup_epochs", 0, None)):
            check_number(key, c[key], low, high, open_low=key == "lr", open_high=key == "momentum")
        check_number("eval_every", c["eval_every"], 0, 1, open_low=True)
        check_writable(c["out"])           # before any data is loaded or any step runs
        check_unlocked(c["out"])
        self.device = backend.set_device(c["device"])
        self.parallel = DataParallel(comm or SingleProcess(), self.device, c)
        self.quiet = quiet or not self.parallel.writes
        from .step_graphs import resolve_mode
        self.graph_mode = resolve_mode("off" if self.parallel.active else c["graph"], self.device)
        backend.seed(c["seed"])
        self.model = model if model is not None else self._build_model()
        if c["decay_layers"] is not None:
            names = {l.name for l in self.model.layers if l.params}
            unknown = sorted(set(c["decay_layers"]) - names)
            if unknown and list(c["decay_layers"]) == self.DEFAULTS["decay_layers"]:
                c["decay_layers"] = None         # CifarNet's fc3, fc4; a model without them decays every weight
            elif unknown:
                raise ValueError(f"decay_layers: {unknown} are not layers with weights of {c['model']}; "
                                 f"expected some of {sorted(names)} (or 'all')")
        self.opt = build_optimizer(self.model, c)
        self.schedule = make_schedule(c["schedule"], c["lr"], c["epochs"], c["warmup_epochs"])
        self.loss_fn = SoftmaxCrossEntropy()
        c["reuse_layers"] = resolved_layers(c["reuse"], c["reuse_layers"], c["model"])   # saved as run
        # the reuse settings are checked against the layers before the data is loaded
        self.strategy = make_strategy(c["reuse"], c["reuse_layers"], c["reuse_options"], model=c["model"])
        if self.strategy is not None:
            self.strategy.attach(self.model)
            self.strategy.configure(c["warmup_epochs"] / c["epochs"])
        self.data = data if data is not None else self._load_checked_data()
        self.history = []
        self.start_epoch, self.start_step = 0, 0
        self.timer = LayerTimer([l.name for l in self.model.reuse_layers()])
        self.strategy_steps = None if self.strategy is None else StrategySteps(
            self.strategy, self.model, self.loss_fn, self.timer, c["seed"], c["epochs"], agree=self.parallel.agree)
        self._graphs = None
        self._replays_before = 0    # graph replays before this epoch
        self._resume_totals = None  # the sums of the resumed epoch's steps before the checkpoint
        self._mid_evals = []        # this epoch's evaluations before its end
        self.totals = self.reader = None

    def _build_model(self):
        name = self.cfg["model"]
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
        return MODELS[name](seed=self.cfg["seed"])

    def _load_checked_data(self):
        """The data, once the estimated memory is known to fit, and not fewer images than a batch."""
        c = self.cfg
        if self.device == "cpu":       # the loader reads every image, then limits
            check_memory(self.model, min(c["batch_size"], c["limit_train"] or CIFAR_IMAGES[0]), sum(CIFAR_IMAGES))
        data = self._load_data()
        if c["batch_size"] > len(data[0]):
            raise ValueError(f"--batch-size {c['batch_size']} is larger than the training set "
                             f"({len(data[0])} images); give at most {len(data[0])}")
        return data

    def _load_data(self):
        return load_data(self.cfg, progress=not self.quiet)

    @property
    def out(self):
        return self.cfg["out"]

    def resume(self, path):
        """Continue the run saved in ``path``. The settings must be the checkpoint's, except
        SAFE_TO_CHANGE (e.g. more epochs); anything else that differs is refused, naming both
        values (the CLI takes the checkpoint's settings unless a flag is given)."""
        checkpoint = read_checkpoint(path)
        saved = dict(checkpoint[0].get("config") or {})
        if saved.get("reuse_layers") is None and saved.get("reuse", "off") != "off":
            # saved before runs recorded their default settings: those of today's default
            saved["reuse_layers"] = resolved_layers(saved["reuse"], None, saved.get("model", self.cfg["model"]))
        if saved.get("model", self.cfg["model"]) != self.cfg["model"]:
            raise TrainingError(f"checkpoint {path} was saved for model {saved['model']!r}; this run builds "
                                f"{self.cfg['model']!r}")
        conflicts = resume_conflicts(saved, self.cfg, self.SAFE_TO_CHANGE)
        if conflicts:
            listed = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in conflicts)
            raise TrainingError(f"cannot resume {path} with other settings ({listed}); resume with the "
                                f"checkpoint's settings (only {', '.join(self.SAFE_TO_CHANGE)} may change) or "
                                "start a new run with another --out")
        meta = load_checkpoint(path, self.model, self.opt, checkpoint)
        steps = -(-len(self.data[0]) // self.cfg["batch_size"])
        if not 0 <= meta["step"] <= steps:
            raise TrainingError(f"checkpoint {path} is at step {meta['step']} of an epoch, but an epoch of this "
                                f"run has {steps} steps (the training data changed?)")
        if meta["epoch"] >= self.cfg["epochs"] and meta["step"] == 0:
            raise TrainingError(f"checkpoint {path} is at the end of epoch {meta['epoch']}: nothing left to do "
                                f"with --epochs {self.cfg['epochs']}; give more epochs to extend the run")
        if self.strategy is not None and meta.get("strategy"):
            self.strategy.load_state_dict(meta["strategy"])
            self.strategy.apply()
        self.history = meta["history"]
        self.start_epoch, self.start_step = meta["epoch"], meta["step"]
        self._resume_totals = meta.get("epoch_totals") if meta["step"] > 0 else None
        return meta

    def _batches(self, x, y, train):
        return batches(self.cfg, x, y, train)

    def train_step(self, xb, yb, lr):
        """One eager step (forward, loss, backward, update) on a batch; returns (loss, logits).

        Every step is timed per layer, those that sample the reuse error too: the exact
        product they also compute is part of what reuse costs."""
        self.opt.lr = lr
        self.opt.prepare_step()
        return self._step_body(xb, yb, self.timer)

    def _step_body(self, xb, yb, timer=None):
        """The device part of a step, the part a CUDA graph records."""
        logits = self.model.forward(xb, train=True, timer=timer)
        loss = self.loss_fn.forward(logits, yb)
        self.model.backward(self.loss_fn.backward(), timer=timer)
        self.parallel.allreduce_gradients(self.model, loss, logits, yb)
        self.opt.apply()
        return loss, logits

    def _graph_body(self, xb, yb):
        loss, logits = self._step_body(xb, yb)
        self.totals.add(loss, logits, yb)

    def begin_run(self):
        """Set up what steps accumulate into and, on the GPU with graphs, the graph runner."""
        xp = backend.xp()
        self.totals = self.parallel.totals(StepTotals(xp))
        self.reader = backend.AsyncReader(2, xp=xp)
        self._graphs = None
        if self.graph_mode != "off":
            from .step_graphs import StepGraphs, prepare_replay
            self._graphs = StepGraphs(self._graph_body, self.model, functools.partial(prepare_replay, self.model,
                                                                                      self.opt),
                                      mode=self.graph_mode)

    @property
    def graphs(self):
        """The run's recorded steps (step_graphs.StepGraphs) after begin_run(), or None without graphs."""
        return self._graphs

    def stream(self):
        """The context every step, eager or replayed, runs in (the graphs' stream on the GPU)."""
        return self._graphs.stream if self._graphs is not None else contextlib.nullcontext()

    def run_step(self, xb, yb, epoch, step, steps):
        """One training step as fit runs it: dropout seeds, learning rate and reuse settings
        for (epoch, step), then a graph replay or an eager step, added to ``self.totals``.
        Returns the learning rate used. Needs ``begin_run()`` and ``with self.stream():``."""
        c = self.cfg
        lr = self.schedule(epoch + step / steps)
        loss = None
        xb, yb = self.parallel.shard(xb, yb, self.model)
        if self.strategy_steps is not None:
            # the strategy's probes run first: the step's dropout masks are drawn after them,
            # so a reuse run draws the same randomness as the exact run of the same seed
            self.strategy_steps.before_step(xb, yb, epoch, step, steps)
        reseed_layers(self.model, (c["seed"], epoch, step))
        self.opt.lr = lr
        # eager steps are timed per layer; with graphs, one step in GRAPH_TIMING_EVERY runs eagerly
        if self._graphs is None or step % GRAPH_TIMING_EVERY == 0 or not self._graphs.run(xb, yb):
            loss, logits = self.train_step(xb, yb, lr)
            self.totals.add(loss, logits, yb)
        if self.strategy_steps is not None:
            self.strategy_steps.after_step(loss)
        return lr

    def fit(self):
        """Train from (start_epoch, start_step) to the last epoch. Returns the history list.

        The run holds OUT/.lock throughout. A first Ctrl-C (during a step, the evaluation or a
        save) stops at the next safe point with a resumable checkpoint and KeyboardInterrupt
        naming it; a second one stops at once and says what the last checkpoint is. A write
        that fails (disk full) stops with TrainingError; the last good checkpoint stays."""
        ckpt = os.path.join(self.out, CHECKPOINT)
        self.parallel.check_start(self.cfg, len(self.data[0]), self.model, self.opt)
        lock = OutLock(self.out) if self.parallel.writes else contextlib.nullcontext()
        with lock, InterruptFlag(lambda: self._resume_hint(ckpt)) as flag:
            interrupted = self.parallel.watch(flag)
            try:
                # overflow on the way to a non-finite loss is reported once, as its TrainingError
                with np.errstate(all="ignore"):
                    return self._fit(ckpt, interrupted)
            except OSError as e:
                raise TrainingError(f"writing to {os.path.abspath(self.out)} failed ({e.strerror or e}); "
                                    f"stopped. {self._resume_hint(ckpt)}") from e

    def _resume_hint(self, ckpt):
        """What a stopped run leaves to resume from, as a sentence."""
        if os.path.exists(ckpt):
            return (f"The last checkpoint is {os.path.abspath(ckpt)} ({checkpoint_position(ckpt)}): continue with "
                    f"{resume_command(ckpt)}")
        return "Nothing was saved yet (no checkpoint): start the run again."

    def _interrupt(self, ckpt, epoch, step, seen, t0, where):
        loss_sum, correct = self.totals.read()
        self._check_finite(loss_sum / max(seen, 1), epoch, step, ckpt)
        totals = dict(loss_sum=loss_sum, correct=correct, seen=seen, seconds=time.perf_counter() - t0,
                      mid_evals=self._mid_evals)
        if self.parallel.writes:
            save_checkpoint(ckpt, self.model, self.opt, epoch, step + 1, self.history, self.cfg, self.strategy,
                            epoch_totals=totals)
        self.parallel.barrier()
        raise KeyboardInterrupt(
            f"interrupted in epoch {epoch + 1} {where}; state saved to {os.path.abspath(ckpt)} "
            f"(continue with {resume_command(ckpt)})")

    def _fit(self, ckpt, interrupted):
        c = self.cfg
        xtr, ytr, xte, yte = self.data
        train_iter = self._batches(xtr, ytr, train=True)
        test_iter = self._batches(xte, yte, train=False)
        steps = len(train_iter)
        mid = mid_epoch_evaluations(steps, c["eval_every"])
        self.begin_run()
        for epoch in range(self.start_epoch, c["epochs"]):
            start = self.start_step if epoch == self.start_epoch else 0
            it = epoch_batches(train_iter, c["seed"], epoch, start)
            self.totals.reset()
            self.reader.clear()
            if self.strategy_steps is not None:
                self.strategy_steps.begin_epoch()
            self._replays_before = self._graphs.replays if self._graphs is not None else 0
            seen, earlier_s, self._mid_evals = 0, 0.0, []
            if start > 0 and self._resume_totals:        # the steps of this epoch before the checkpoint
                r = self._resume_totals
                self.totals.sums[...] = backend.xp().asarray([r["loss_sum"], r["correct"]], dtype=np.float64)
                seen, earlier_s = int(r["seen"]), float(r["seconds"])
                self._mid_evals = list(r.get("mid_evals", []))
            self._resume_totals = None
            t0 = time.perf_counter() - earlier_s
            bar = tqdm(it, total=steps, initial=start, desc=f"epoch {epoch + 1}/{c['epochs']}", unit="batch",
                       disable=self.quiet, leave=True, dynamic_ncols=True)
            step = start - 1
            with self.stream():
                for step, (xb, yb) in enumerate(bar, start=start):
                    # after `step` steps; a run resumed from an interrupted evaluation does it again
                    if step in mid and all(m["step"] != step for m in self._mid_evals):
                        t0 += self._evaluate_mid_epoch(test_iter, epoch, step, steps, seen, t0, ckpt, interrupted)
                    lr = self.run_step(xb, yb, epoch, step, steps)
                    seen += len(yb)
                    if (step + 1) % c["log_every"] == 0 or step + 1 == steps:
                        # queue a copy of the sums; show the newest copy that has landed
                        self.reader.request(self.totals.sums, tag=(seen, step))
                        self._show_progress(bar, epoch, lr, seen, t0, ckpt)
                        if epoch == self.start_epoch and step + 1 - start <= c["log_every"] and not self.quiet:
                            tqdm.write(self._run_estimate(time.perf_counter() - t0 - earlier_s, step + 1 - start,
                                                          epoch, step, steps, len(test_iter) * (1 + len(mid))))
                    if interrupted:
                        bar.close()
                        self._interrupt(ckpt, epoch, step, seen, t0, f"after step {step + 1}")
                bar.close()
                loss_sum, correct = self.totals.read()   # the one wait of the epoch
                seconds = time.perf_counter() - t0
                self._check_finite(loss_sum / max(seen, 1), epoch, step, ckpt)
                lr = self.schedule(epoch + (steps - 1) / steps) if start >= steps else lr
                evaluated = evaluate(self.model, self.loss_fn, test_iter, stop=lambda: bool(interrupted),
                                     progress=None if self.quiet else f"epoch {epoch + 1}: evaluating",
                                     parallel=self.parallel)
                if evaluated is None:    # Ctrl-C during the evaluation: the epoch's steps are kept
                    self._interrupt(ckpt, epoch, steps - 1, seen, t0, "during its evaluation")
                test_loss, test_acc = evaluated
                # an epoch is kept (as the last good checkpoint) only when all of it is finite
                self._check_finite(test_loss, epoch, step, ckpt, what="test loss")
                self._check_finite(self._parameters_sum(), epoch, step, ckpt, what="parameters (their sum)")
            record = dict(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1),
                          train_acc=correct / max(seen, 1), test_loss=test_loss, test_acc=test_acc,
                          lr=lr, seconds=seconds, images_per_s=seen / seconds if seconds > 0 else 0.0,
                          mid_evals=self._mid_evals)
            record["layers"] = self._layer_records(step + 1 - start)
            if self.strategy is not None:
                self.strategy_steps.add_exact_times(record["layers"])
                record["layers"] = self.parallel.agree(record["layers"])
                record["reuse_harm"] = self.parallel.agree(self.strategy_steps.epoch_harm())
                self.strategy.on_epoch_end((epoch + 1) / c["epochs"], record["train_loss"], record["layers"],
                                           harm=record["reuse_harm"])
                new_events = [e for e in self.strategy.events if "epoch" not in e]
                for e in new_events:
                    e["epoch"] = epoch + 1
                record["reuse_strategy"] = self.strategy.name
                record["reuse_events"] = new_events   # stage changes during or at the end of this epoch
                self.parallel.check_strategy(self.strategy)
            self.history.append(record)
            if self.parallel.writes:
                save_checkpoint(ckpt, self.model, self.opt, epoch + 1, 0, self.history, c, self.strategy)
                self.write_history()
            if not self.quiet:
                tqdm.write(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                           f"test loss {test_loss:.4f} acc {test_acc:.4f} | {seconds:.1f} s, "
                           f"{record['images_per_s']:.0f} img/s" + reuse_summary(record))
            if interrupted and epoch + 1 < c["epochs"]:
                self.parallel.barrier()
                raise KeyboardInterrupt(f"interrupted after epoch {epoch + 1}; state saved to "
                                        f"{os.path.abspath(ckpt)} (continue with {resume_command(ckpt)})")
        if self.parallel.writes:
            self.model.save(os.path.join(self.out, MODEL))
        return self.history

    def _evaluate_mid_epoch(self, test_iter, epoch, step, steps, seen, t0, ckpt, interrupted):
        """Evaluate the test set after ``step`` steps of the epoch into ``_mid_evals``; returns
        the seconds it took (the caller moves the epoch's clock on by them). A Ctrl-C during it
        saves the run before this evaluation, which the resumed run then does."""
        began = time.perf_counter()
        evaluated = evaluate(self.model, self.loss_fn, test_iter, stop=lambda: bool(interrupted),
                             progress=None if self.quiet else f"epoch {epoch + 1}: evaluating at step {step}",
                             parallel=self.parallel)
        took = time.perf_counter() - began
        if evaluated is None:
            self._interrupt(ckpt, epoch, step - 1, seen, t0 + took, "during an evaluation")
        test_loss, test_acc = evaluated
        self._check_finite(test_loss, epoch, step - 1, ckpt, what="test loss")
        self._mid_evals.append(dict(epoch=epoch + step / steps, step=step, seconds=began - t0,
                                    test_loss=test_loss, test_acc=test_acc))
        return took

    def _run_estimate(self, seconds, steps_timed, epoch, step, steps, test_batches):
        """The whole run's remaining time from the first steps timed, as a line: the steps left,
        and each evaluation at a third of a training step per batch (a forward only)."""
        per_step = seconds / max(steps_timed, 1)
        epochs_left = self.cfg["epochs"] - epoch
        left = per_step * (epochs_left * steps - step - 1 + epochs_left * test_batches / 3)
        return (f"estimated time for the run: about {format_duration(left)} more ({epochs_left} epoch"
                f"{'s' if epochs_left != 1 else ''} of {steps} steps at {per_step:.2f} s/step, from the first "
                f"{steps_timed}; the bar refines it)")

    def _show_progress(self, bar, epoch, lr, seen, t0, ckpt):
        """Progress bar and non-finite guard from the newest sums read back (CPU: the current ones)."""
        got = self.reader.latest()
        if got is None:
            return
        (loss_sum, correct), (n, at_step) = got
        self._check_finite(loss_sum / n, epoch, at_step, ckpt)
        if not bar.disable:
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}", lr=f"{lr:.4f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}",
                            **({"reuse": self.strategy.describe()} if self.strategy else {}))

    def _parameters_sum(self):
        """The sum of every parameter (one read back): finite exactly when all of them are."""
        xp = backend.xp()
        total = sum(xp.sum(layer.params[name], dtype=np.float64) for _, layer, name in self.model.named_parameters())
        return float(backend.asnumpy(total))

    def _layer_records(self, steps_run):
        """Per conv/dense layer: time per step, and reuse settings and statistics.

        Replayed CUDA-graph steps are not timed per layer: in an epoch with replays,
        forward_s and backward_s are the means of the eager (timed) calls times the
        steps run; timed_calls says how many calls were measured."""
        times = self.timer.collect()
        sampled = self._graphs is not None and self._graphs.replays > self._replays_before
        if self._graphs is not None:
            self._graphs.flush_stats()
        out = {}
        for layer in self.model.reuse_layers():
            f, nf = times.get((layer.name, "forward"), (0.0, 0))
            b, nb = times.get((layer.name, "backward"), (0.0, 0))
            if sampled:
                f, b = f / max(nf, 1) * steps_run, b / max(nb, 1) * steps_run
                nf = nb = steps_run
            rec = dict(forward_s=f, backward_s=b, forward_ms=1e3 * f / max(nf, 1),
                       backward_ms=1e3 * b / max(nb, 1), step_ms=1e3 * (f + b) / max(nb, 1),
                       timed_calls=times.get((layer.name, "forward"), (0.0, 0))[1],
                       reuse=None if layer.reuse is None else layer.reuse.replace(measure_error=False).as_dict())
            if layer.reuse_state is not None:
                rec.update({k: v for k, v in layer.reuse_state.pop_stats().items()})
                evaluation = layer.reuse_state.pop_stats(train=False)
                if evaluation:                 # the test-set forwards, kept apart from training
                    rec["eval"] = evaluation
            out[layer.name] = rec
        return out

    @staticmethod
    def _check_finite(mean_loss, epoch, step, ckpt, what="training loss"):
        if not math.isfinite(mean_loss):
            where = f"non-finite {what} ({mean_loss}) in epoch {epoch + 1} by step {step + 1}; stopped."
            if os.path.exists(ckpt):
                raise TrainingError(f"{where} The last good checkpoint is {os.path.abspath(ckpt)} (its settings "
                                    "are kept on resume: start a new run with a lower --lr, or resume it as "
                                    "it is).")
            raise TrainingError(f"{where} Nothing to resume from (no checkpoint yet): lower --lr and start "
                                "again.")

    def write_history(self):
        settings = {k: v for k, v in self.cfg.items()}
        atomic_write_json(os.path.join(self.out, HISTORY),
                          {"settings": settings, "device": backend.describe_device(), "epochs": self.history})


def load_data(cfg, progress=True):
    """(train images, labels, test images, labels) of a run's settings (limit_train, limit_test)."""
    from .data import load_cifar10
    xtr, ytr, xte, yte = load_cifar10(cfg["data"], download=cfg["download"], progress=progress)
    if cfg["limit_train"]:
        xtr, ytr = xtr[:cfg["limit_train"]], ytr[:cfg["limit_train"]]
    if cfg["limit_test"]:
        xte, yte = xte[:cfg["limit_test"]], yte[:cfg["limit_test"]]
    return xtr, ytr, xte, yte


def batches(cfg, x, y, train):
    """The batch iterator of a run's training or test images (it moves the uint8 images to the
    device once); epoch_batches gives a training epoch's batches."""
    from .data import CIFAR10_MEAN, CIFAR10_STD, BatchIterator
    return BatchIterator(x, y, cfg["batch_size"], shuffle=train,
                         rng=np.random.default_rng(cfg["seed"]) if train else None,
                         augment=train and cfg["augment"], drop_last=False, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def epoch_batches(train_iter, seed, epoch, start=0):
    """The batches of training epoch ``epoch`` from step ``start`` on: every epoch's shuffle and
    augmentation come from (seed, epoch) alone, so a resumed run sees the same batches."""
    train_iter.rng = np.random.default_rng([seed, epoch])
    return train_iter.epoch(start)


def mid_epoch_evaluations(steps, eval_every):
    """The step counts within an epoch of ``steps`` steps after which the test set is evaluated
    before the epoch's end, every ``eval_every`` of an epoch (none for 1)."""
    points = {round(k * eval_every * steps) for k in range(1, math.ceil(1 / eval_every - 1e-9))}
    return sorted(p for p in points if 0 < p < steps)


def format_duration(seconds):
    """'2 h 05 min', '7 min 30 s' or '12 s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def reuse_summary(record):
    """The reuse state of an epoch's record for its line: each reuse layer's setting and mean
    r_c, or that every layer was exact ('' for a run without a strategy)."""
    if "reuse_strategy" not in record:
        return ""
    used = [f"{name} {stage_label(rec['reuse'])} r_c {rec['r_c']:.3f}" for name, rec in record["layers"].items()
            if rec.get("reuse") is not None and rec.get("r_c") is not None]
    return " | reuse: " + (", ".join(used) if used else "none this epoch (every layer exact)")


class InterruptFlag:
    """Within the block, a first Ctrl-C only sets the flag (the loop saves and stops
    at the next safe point); a second one interrupts at once, with ``hint()`` (what is
    left to resume from) as its message."""

    def __init__(self, hint=None):
        self.set = False
        self.hint = hint

    def __bool__(self):
        return self.set

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt("interrupted again: stopped at once without saving. "
                                    + (self.hint() if self.hint else ""))
        self.set = True

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
