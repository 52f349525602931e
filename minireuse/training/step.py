"""The device side of one training step, below the training loop.

``Step.run(xb, yb, lr, step)`` runs one step (forward, loss, backward, update) and adds
its loss and accuracy to the epoch's device-resident sums. Before every step, eager or
replayed, it advances the per-step state that lives in device memory: the optimizer's
scalars (step count, learning rate, Adam's bias corrections) and every layer's per-step
state (Dropout's mask key), through their ``begin_step()``; a layer's forward then only
reads it, whether it runs, is recorded, or runs again after a recording that failed,
until ``end_step()``. With graphs ('auto' or 'on', GPU only) the step is recorded once as a CUDA
graph and replayed (graphs.StepGraphs); one step in ``GRAPH_TIMING_EVERY`` runs eagerly with
the per-layer timers, since a replay cannot be timed per layer. ``layer_times`` turns
the timers and the reuse statistics into the epoch's per-layer records, and says what
replays mean for them. The loop (trainer.py) knows none of this.
"""
import contextlib

import numpy as np
from tqdm import tqdm

from .. import backend
from ..kernels import step_kernels

# with CUDA graphs, one step in this many runs eagerly with the per-layer timers
GRAPH_TIMING_EVERY = 100


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


def begin_step(model, optimizer):
    """Advance the per-step device state of ``optimizer`` and of every layer of ``model`` that
    has some (the protocol: ``begin_step()`` before the step, ``end_step()`` after it). Layers
    without per-step state need nothing."""
    optimizer.begin_step()
    for layer in model.layers:
        begin = getattr(layer, "begin_step", None)
        if begin is not None:
            begin()


def end_step(model):
    """Close the step that begin_step opened, for every layer with per-step state."""
    for layer in model.layers:
        end = getattr(layer, "end_step", None)
        if end is not None:
            end()


class Step:
    """One training step of ``model`` on the device, eager or replayed (module docstring).

    timer: the per-layer timer of eager steps (timing.LayerTimer). graph_mode: 'off',
    'auto' or 'on' (graphs.resolve_mode). parallel: a distributed.DataParallel, whose
    processes sum their gradients before the update and their sums (None: one process). ``begin_run()`` sets up the sums and the graph
    runner; every step runs inside ``with step.stream():``.
    """

    def __init__(self, model, optimizer, loss_fn, timer, graph_mode="off", parallel=None):
        self.model, self.opt, self.loss_fn, self.timer = model, optimizer, loss_fn, timer
        self.graph_mode = graph_mode
        self.parallel = parallel
        self.graphs = None
        self.totals = None
        self._replays_before = 0    # graph replays before this epoch

    def begin_run(self):
        """Set up what steps accumulate into and, on the GPU with graphs, the graph runner."""
        self.totals = StepTotals(backend.xp())
        if self.parallel is not None:
            self.totals = self.parallel.totals(self.totals)
        self.graphs = None
        if self.graph_mode != "off":
            from .graphs import StepGraphs
            self.graphs = StepGraphs(self._recorded_body, self.model, mode=self.graph_mode)

    def stream(self):
        """The context every step, eager or replayed, runs in (the graphs' stream on the GPU)."""
        return self.graphs.stream if self.graphs is not None else contextlib.nullcontext()

    def begin_epoch(self, sums=None):
        """Zero the epoch's sums, or set them to ``sums`` (loss sum, correct) of a resumed epoch."""
        if sums is None:
            self.totals.reset()
        else:
            self.totals.sums[...] = backend.xp().asarray(sums, dtype=np.float64)
        self._replays_before = self.graphs.replays if self.graphs is not None else 0

    def run(self, xb, yb, lr, step):
        """One step at learning rate ``lr`` (``step``: its number in the epoch, for the timing
        cadence), added to the epoch's sums. Returns its loss (a device scalar), or None for a
        replayed step."""
        self.opt.lr = lr
        begin_step(self.model, self.opt)
        try:
            if self.graphs is not None and step % GRAPH_TIMING_EVERY != 0 and self.graphs.run(xb, yb):
                return None
            loss, logits = self.body(xb, yb, self.timer)
            self.totals.add(loss, logits, yb)
            return loss
        finally:
            end_step(self.model)

    def body(self, xb, yb, timer=None):
        """Forward, loss, backward and update on a batch; returns (loss, logits). Eager steps
        are timed per layer, those that sample the reuse error too: the exact product they
        also compute is part of what reuse costs."""
        logits = self.model.forward(xb, train=True, timer=timer)
        loss = self.loss_fn.forward(logits, yb)
        self.model.backward(self.loss_fn.backward(), timer=timer)
        if self.parallel is not None:
            self.parallel.allreduce_gradients(self.model, loss, logits, yb)
        self.opt.apply()
        return loss, logits

    def _recorded_body(self, xb, yb):
        loss, logits = self.body(xb, yb)
        self.totals.add(loss, logits, yb)

    def epoch_sums(self):
        """(loss sum, correct) of the epoch's steps so far; waits for the device."""
        return self.totals.read()

    def layer_times(self, steps_run):
        """Per conv/dense layer: time per step, and reuse settings and statistics.

        Replayed steps are not timed per layer: in an epoch with replays, forward_s and
        backward_s are the means of the eager (timed) calls times the steps run;
        timed_calls says how many calls were measured."""
        times = self.timer.collect()
        sampled = self.graphs is not None and self.graphs.replays > self._replays_before
        if self.graphs is not None:
            self.graphs.flush_stats()
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
                rec.update(layer.reuse_state.pop_stats())
                evaluation = layer.reuse_state.pop_stats(train=False)
                if evaluation:                 # the test-set forwards, kept apart from training
                    rec["eval"] = evaluation
            out[layer.name] = rec
        return out


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
