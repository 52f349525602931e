"""What a deep-reuse strategy does around each training step, apart from the training loop.

Before a step: the strategy's progress, the ladder order measured on the batch when
reuse starts, on a probe step the timing of the reusing layers computed exactly (the
speed guard's reference: each probe is paired with the same layer's reuse time in the
step that follows it, on the same batch a moment later, so that a load that comes and
goes within an epoch slows both sides of a pair alike), and on a
sampled step the exact forward's loss on the same batch and dropout masks (the harm
probe) with error measurement switched on. After it: measurement off, and the
(reuse loss, exact loss) pair kept for the epoch's harm. These probes run before the
step's dropout masks are drawn and draw nothing themselves, so a reuse run draws the
same randomness as the exact run of the same seed.
"""
import numpy as np

from .. import backend
from ..layers.simple import reseed_dropout
from ..reuse.config import ReuseState
from ..reuse.common import relative_error
from ..timing import LayerTimer


def stage_errors(model, x, layer_name, configs):
    """Relative output error of layer ``layer_name`` under each config, on the input that the
    exact model gives it for the batch x (train=False: no dropout drawn, nothing cached).
    A fresh ReuseState is used so the layer's statistics are not touched."""
    layer = model.layer(layer_name)
    x = model.input_of(layer_name, x)
    saved_cfg, saved_state = layer.reuse, layer.reuse_state
    try:
        layer.set_reuse(None)
        y_exact = layer.forward(x, train=False)
        errors = []
        for cfg in configs:
            layer.set_reuse(cfg.replace(measure_error=False))
            layer.reuse_state = ReuseState()
            errors.append(float(relative_error(layer.forward(x, train=False), y_exact)))
    finally:
        layer.reuse, layer.reuse_state = saved_cfg, saved_state
    return errors


class StrategySteps:
    """The per-step hooks of one strategy on one model (see the module docstring)."""

    def __init__(self, strategy, model, loss_fn, timer, seed, epochs, agree=None):
        """agree: in data-parallel training, what makes a measurement the same on every process
        (distributed.DataParallel.agree: the mean over processes)."""
        self.strategy, self.model, self.loss_fn, self.timer = strategy, model, loss_fn, timer
        self.agree = agree or (lambda measured: measured)
        self.seed, self.epochs = seed, epochs
        self._measuring = False
        self._exact_loss = None
        self._harms = []            # (reuse loss, exact loss) device scalars of this epoch's sampled steps
        self.probe_timer = LayerTimer(list(strategy.ladders))
        self._open_pairs = None     # on a probe step: layer -> (marks in the step's timer, the probe's timings)
        self._pairs = {}            # layer -> [(reuse timings, exact timings, passes)] of this epoch's probes

    def before_step(self, xb, yb, epoch, step, steps):
        """Set this step's reuse settings; time the exact layers on a probe step; on a sampled
        step, compute the exact forward's loss."""
        st = self.strategy
        st.on_step((epoch + step / steps) / self.epochs)
        wanted = st.wants_ladder_order()
        if wanted:
            st.set_ladder_order(self.agree({name: stage_errors(self.model, xb, name, st.ladders[name])
                                            for name in wanted}))
            st.apply()
        probed = st.probe_now(step, steps)
        exact = {}
        if probed:
            marks = {(n, ph): self.probe_timer.mark(n, ph) for n in probed for ph in ("forward", "backward")}
            self.time_exact_layers(xb, probed, st.probe_steps)
            exact = {n: [self.probe_timer.since(n, ph, marks[(n, ph)]) for ph in ("forward", "backward")]
                     for n in probed}
        self._exact_loss = None
        self._measuring = st.measure_error_now(step)
        if self._measuring:
            self._start_measuring(xb, yb, epoch, step)
        # marked last: the step's own layer times follow (not the harm probe's exact forward)
        self._open_pairs = {n: ({ph: self.timer.mark(n, ph) for ph in ("forward", "backward")}, exact[n])
                            for n in probed} or None

    def _start_measuring(self, xb, yb, epoch, step):
        st = self.strategy
        # a layer that reuses in its backward only computes the exact forward itself
        reused_forward = any(l.reuse is not None and l.reuse.forward != "exact" for l in self.model.reuse_layers())
        if reused_forward:
            self._exact_loss = self.exact_loss(xb, yb, (self.seed, epoch, step))
        for name in st.ladders:
            layer = self.model.layer(name)
            if layer.reuse is not None:
                layer.set_reuse(layer.reuse.replace(measure_error=True))

    def after_step(self, loss=None):
        """loss: the step's training loss (a device scalar), None for a replayed step."""
        for name, (marks, exact) in (self._open_pairs or {}).items():
            reuse = [self.timer.since(name, ph, marks[ph]) for ph in ("forward", "backward")]
            # no pair from a replayed step (not timed per layer) or a step that also measured
            # the error (it computed the exact product besides)
            if all(reuse) and all(exact) and not self._measuring:
                self._pairs.setdefault(name, []).append((reuse, exact, self.strategy.probe_steps))
        self._open_pairs = None
        if self._exact_loss is not None and loss is not None:
            self._harms.append((loss, self._exact_loss))
        self._exact_loss = None
        if self._measuring:
            for name in self.strategy.ladders:
                layer = self.model.layer(name)
                if layer.reuse is not None:
                    layer.set_reuse(layer.reuse.replace(measure_error=False))
            self._measuring = False

    def begin_epoch(self):
        self._harms = []
        self._pairs = {}
        self.probe_timer.collect()      # a resumed epoch's probes start with its steps

    def add_exact_times(self, layer_records):
        """Put this epoch's probed exact ms per step (forward + backward) into the epoch's
        per-layer records as ``exact_probe_ms``, with ``exact_probes`` passes timed, and the
        median over the probe steps of (the layer's time in the step) / (its exact time on the
        probe just before) as ``reuse_vs_exact`` (``paired_probes`` pairs): the speed guard's
        measure, which a load common to both sides of a pair leaves alone."""
        for name, pairs in self._pairs.items():
            if name in layer_records and pairs:
                ratios = [sum(self.timer.seconds(t) for t in reuse) * passes
                          / max(sum(self.probe_timer.seconds(t) for t in exact), 1e-12)
                          for reuse, exact, passes in pairs]
                layer_records[name]["reuse_vs_exact"] = float(np.median(ratios))
                layer_records[name]["paired_probes"] = len(ratios)
        self._pairs = {}
        times = self.probe_timer.collect()
        for name, rec in layer_records.items():
            f, n = times.get((name, "forward"), (0.0, 0))
            if n:
                rec["exact_probe_ms"] = 1e3 * (f + times[(name, "backward")][0]) / n
                rec["exact_probes"] = n

    def epoch_harm(self):
        """Mean relative loss increase of the reuse forward over the exact one on this epoch's
        sampled steps (one read back per epoch), or None when no step was sampled."""
        if not self._harms:
            return None
        pairs = [(float(backend.asnumpy(r)), float(backend.asnumpy(e))) for r, e in self._harms]
        self._harms = []
        return float(np.mean([r / e - 1.0 for r, e in pairs if e > 0]))

    def exact_loss(self, xb, yb, dropout_seed):
        """Training-mode loss (a device scalar) of the exact forward on a batch, with the
        dropout masks of ``dropout_seed``; parameters are not changed. Timed per layer."""
        with self.model.reuse_settings(None):
            reseed_dropout(self.model, dropout_seed)
            return self.loss_fn.forward(self.model.forward(xb, train=True, timer=self.timer), yb)

    def time_exact_layers(self, xb, names, repeats=1):
        """Time the exact forward+backward of the layers ``names`` on the inputs the exact model
        gives them for this batch, ``repeats`` passes each, into ``probe_timer``. Nothing the
        step uses changes: the reuse settings and gradients are put back, no randomness is
        drawn (the layers before run in evaluation mode), no parameter moves."""
        saved = [(l, dict(l.grads)) for l in self.model.reuse_layers()]
        with self.model.reuse_settings(None):
            self._time_exact_passes(xb, names, repeats)
        for l, grads in saved:
            l.grads.update(grads)

    def _time_exact_passes(self, xb, names, repeats):
        last = max(i for i, l in enumerate(self.model.layers) if l.name in names)
        x = xb
        for layer in self.model.layers[:last + 1]:
            if layer.name not in names:
                x = layer.forward(x, train=False)
                continue
            for _ in range(repeats):
                self.probe_timer.start(layer.name, "forward")
                y = layer.forward(x, train=True)
                self.probe_timer.stop(layer.name)
                self.probe_timer.start(layer.name, "backward")
                layer.backward(y)          # its output as dY: real data, any values serve for timing
                self.probe_timer.stop(layer.name)
            x = y
