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
epoch, at its end). How a step runs on the device, eagerly or as a CUDA graph (``graph``
'auto' or 'on'; the default is 'off'), is the business of step.Step; the loop calls
``step.run``, ``step.epoch_sums`` and ``step.layer_times``. Checkpoints are written and
read by checkpoint.py, the run's files by outdir.py, its data and batches by batches.py.
"""
import contextlib
import math
import os
import time

import numpy as np
from tqdm import tqdm

from .. import backend
from ..fileio import atomic_write_json
from ..layers.simple import reseed_layers
from ..losses import SoftmaxCrossEntropy
from ..models import MODELS
from ..optim import SGD, Adam, make_schedule
from ..timing import LayerTimer
from .adaptive import make_strategy, resolved_layers, stage_label
from .batches import CIFAR_IMAGES, batches, check_memory, epoch_batches, load_data, mid_epoch_evaluations
from .checkpoint import TrainingError, load_checkpoint, read_checkpoint, resume_conflicts, save_checkpoint
from .config import TrainConfig
from .distributed import DataParallel, SingleProcess
from .graphs import resolve_mode
from .outdir import (CHECKPOINT, HISTORY, MODEL, InterruptFlag, OutLock, check_unlocked, check_writable,
                     checkpoint_position, resume_command)
from .probes import StrategySteps
from .step import Step, evaluate


def build_optimizer(model, cfg):
    decay_layers = cfg.get("decay_layers")
    if cfg["optimizer"] == "sgd":
        return SGD(model, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                   weight_decay=cfg["weight_decay"], decay_layers=decay_layers)
    if cfg["optimizer"] == "adam":
        return Adam(model, lr=cfg["lr"], weight_decay=cfg["weight_decay"], decay_layers=decay_layers)
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; expected sgd or adam")


class Trainer:
    """Runs the epochs of one training job described by a settings dict (config.TrainConfig:
    the settings, their defaults, what a resume may change)."""

    DEFAULTS = TrainConfig.defaults()
    # what a resumed run may change: where things are, how long it goes on, how it executes
    SAFE_TO_CHANGE = TrainConfig.names("resume")

    def __init__(self, cfg, data=None, model=None, quiet=False, comm=None):
        """comm: the communicator of a data-parallel run (training.distributed); None: one process."""
        TrainConfig.check({**self.DEFAULTS, **cfg})
        self.cfg = {**TrainConfig.defaults(), **cfg}
        c = self.cfg
        check_writable(c["out"])           # before any data is loaded or any step runs
        check_unlocked(c["out"])
        self.device = backend.set_device(c["device"])
        self.parallel = DataParallel(comm or SingleProcess(), self.device, c)
        self.quiet = quiet or not self.parallel.writes
        graph_mode = resolve_mode("off" if self.parallel.active else c["graph"], self.device)
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
        self.step = Step(self.model, self.opt, self.loss_fn, self.timer, graph_mode, self.parallel)
        self.strategy_steps = None if self.strategy is None else StrategySteps(
            self.strategy, self.model, self.loss_fn, self.timer, c["seed"], c["epochs"], agree=self.parallel.agree)
        self._resume_totals = None  # the sums of the resumed epoch's steps before the checkpoint
        self._mid_evals = []        # this epoch's evaluations before its end
        self.reader = None

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

    def begin_run(self):
        """Set up the step's sums and graphs, and the reader of the sums."""
        self.step.begin_run()
        self.reader = backend.AsyncReader(2, xp=backend.xp())

    def run_step(self, xb, yb, epoch, step, steps):
        """One training step as fit runs it: dropout seeds, learning rate and reuse settings
        for (epoch, step), then the step itself (``self.step.run``). Returns the learning
        rate used. Needs ``begin_run()`` and ``with self.step.stream():``."""
        lr = self.schedule(epoch + step / steps)
        xb, yb = self.parallel.shard(xb, yb, self.model)
        if self.strategy_steps is not None:
            # the strategy's probes run first: the step's dropout masks are drawn after them,
            # so a reuse run draws the same randomness as the exact run of the same seed
            self.strategy_steps.before_step(xb, yb, epoch, step, steps)
        reseed_layers(self.model, (self.cfg["seed"], epoch, step))
        loss = self.step.run(xb, yb, lr, step)
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
        loss_sum, correct = self.step.epoch_sums()
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
            self.reader.clear()
            if self.strategy_steps is not None:
                self.strategy_steps.begin_epoch()
            seen, earlier_s, self._mid_evals, earlier = 0, 0.0, [], None
            if start > 0 and self._resume_totals:        # the steps of this epoch before the checkpoint
                r = self._resume_totals
                earlier = (r["loss_sum"], r["correct"])
                seen, earlier_s = int(r["seen"]), float(r["seconds"])
                self._mid_evals = list(r.get("mid_evals", []))
            self.step.begin_epoch(earlier)
            self._resume_totals = None
            t0 = time.perf_counter() - earlier_s
            bar = tqdm(it, total=steps, initial=start, desc=f"epoch {epoch + 1}/{c['epochs']}", unit="batch",
                       disable=self.quiet, leave=True, dynamic_ncols=True)
            step = start - 1
            with self.step.stream():
                for step, (xb, yb) in enumerate(bar, start=start):
                    # after `step` steps; a run resumed from an interrupted evaluation does it again
                    if step in mid and all(m["step"] != step for m in self._mid_evals):
                        t0 += self._evaluate_mid_epoch(test_iter, epoch, step, steps, seen, t0, ckpt, interrupted)
                    lr = self.run_step(xb, yb, epoch, step, steps)
                    seen += len(yb)
                    if (step + 1) % c["log_every"] == 0 or step + 1 == steps:
                        # queue a copy of the sums; show the newest copy that has landed
                        self.reader.request(self.step.totals.sums, tag=(seen, step))
                        self._show_progress(bar, epoch, lr, seen, t0, ckpt)
                        if epoch == self.start_epoch and step + 1 - start <= c["log_every"] and not self.quiet:
                            tqdm.write(self._run_estimate(time.perf_counter() - t0 - earlier_s, step + 1 - start,
                                                          epoch, step, steps, len(test_iter) * (1 + len(mid))))
                    if interrupted:
                        bar.close()
                        self._interrupt(ckpt, epoch, step, seen, t0, f"after step {step + 1}")
                bar.close()
                loss_sum, correct = self.step.epoch_sums()   # the one wait of the epoch
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
            record["layers"] = self.step.layer_times(step + 1 - start)
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

