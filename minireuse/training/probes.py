"""What a deep-reuse strategy does around each training step, apart from the training loop.

Before a step: the strategy's progress, the ladder order measured on the batch when
reuse starts, on a probe step the timing of each reusing layer on the step's batch,
exact and with reuse in turns (exact, reuse, reuse, exact: the speed guard's A/B, whose
two sides meet the same load, caches and memory, however the load comes and goes; the
passes' dY is the one the layer received in the training step of the previous probe,
as sparse as training makes it), and on a
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
        self.reuse_probe_timer = LayerTimer(list(strategy.ladders))
        self._probe_states = {}     # layer -> the ReuseState its probe passes use (the layer's own is left alone)
        self._pairs = {}            # layer -> [(exact timings, reuse timings)] of this epoch's probes
        self._dy_seen = {}          # layer name -> the dY its backward received in the last probe's step
        self._listening = []        # layers whose backward this step's training notes the dY of

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
        if probed:
            self.time_exact_layers(xb, probed, st.probe_steps)
            self._note_dy(probed)
        self._exact_loss = None
        self._measuring = st.measure_error_now(step)
        if self._measuring:
            self._start_measuring(xb, yb, epoch, step)

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

    def _note_dy(self, names):
        """Keep the dY that each layer of ``names`` receives in this step's backward, for the
        next probe's passes: a conv's dY behind ReLU, LRN and pooling is mostly zeros once
        training is under way, which the exact CPU backward skips (cpu/conv.py), so a dense
        stand-in (the layer's output) would time exact's backward too slow. (A step replayed
        from a CUDA graph runs no Python: the probe then falls back to the output.)"""
        for name in names:
            layer = self.model.layer(name)
            real = layer.backward

            def backward(dy, real=real, name=name):
                self._dy_seen[name] = dy
                return real(dy)
            self._listening.append((layer, vars(layer).get("backward")))
            layer.backward = backward

    def _stop_noting(self):
        for layer, own in reversed(self._listening):
            if own is None:
                del layer.backward      # the class's method again
            else:
                layer.backward = own    # what the layer had (a wrapper of its own)
        self._listening = []

    def after_step(self, loss=None):
        """loss: the step's training loss (a device scalar), None for a replayed step."""
        self._stop_noting()
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
        self.reuse_probe_timer.collect()

    def add_exact_times(self, layer_records):
        """Put this epoch's probed exact ms per step (forward + backward) into the epoch's
        per-layer records as ``exact_probe_ms``, with ``exact_probes`` passes timed, and the
        median over the probes of (reuse passes' time) / (exact passes' time) as
        ``reuse_vs_exact`` (``paired_probes`` probes): the speed guard's measure, an A/B on
        the same batch whose two sides meet the same load."""
        for name, pairs in self._pairs.items():
            if name in layer_records and pairs:
                ratios = [sum(self.reuse_probe_timer.seconds(t) for t in reuse)
                          / max(sum(self.probe_timer.seconds(t) for t in exact), 1e-12) for exact, reuse in pairs]
                layer_records[name]["reuse_vs_exact"] = float(np.median(ratios))
                layer_records[name]["paired_probes"] = len(ratios)
        self._pairs = {}
        self.reuse_probe_timer.collect()
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
        """Time the forward+backward of each layer of ``names`` on the input the exact model
        gives it for this batch, exact and with its reuse setting in turns (exact, reuse, reuse,
        exact, ``repeats`` times): exact passes into ``probe_timer``, reuse passes into
        ``reuse_probe_timer``, the probe's pair kept for ``add_exact_times``. Nothing the step
        uses changes: the reuse settings and gradients are put back, the reuse passes run on a
        ReuseState of the probe's own (the layer's statistics stay the step's), no randomness
        is drawn (the layers before run in evaluation mode), no parameter moves."""
        saved = [(l, dict(l.grads)) for l in self.model.reuse_layers()]
        settings = {name: self.model.layer(name).reuse for name in names}
        with self.model.reuse_settings(None):
            self._time_passes(xb, settings, repeats)
        for l, grads in saved:
            l.grads.update(grads)

    def _time_passes(self, xb, settings, repeats):
        last = max(i for i, l in enumerate(self.model.layers) if l.name in settings)
        x = xb
        for layer in self.model.layers[:last + 1]:
            if layer.name not in settings:
                x = layer.forward(x, train=False)
                continue
            timers = {"exact": self.probe_timer, "reuse": self.reuse_probe_timer}
            marks = {(k, ph): t.mark(layer.name, ph) for k, t in timers.items() for ph in ("forward", "backward")}
            for _ in range(repeats):
                for kind in ("exact", "reuse", "reuse", "exact"):
                    y = self._timed_pass(layer, x, timers[kind], settings[layer.name] if kind == "reuse" else None)
            self._pairs.setdefault(layer.name, []).append(tuple(
                [t.since(layer.name, ph, marks[(k, ph)]) for ph in ("forward", "backward")]
                for k, t in timers.items()))
            x = y

    def _timed_pass(self, layer, x, timer, setting):
        """One forward+backward of ``layer`` on x, exact (setting None) or with ``setting`` on the
        probe's ReuseState; as dY the one the layer received in the last probe's step (_note_dy;
        its values need not fit this batch: only their zeros matter to the time), else its output."""
        own = layer.reuse_state
        if setting is not None:
            layer.set_reuse(setting)
            layer.reuse_state = self._probe_states.setdefault(layer.name, ReuseState())
        try:
            timer.start(layer.name, "forward")
            y = layer.forward(x, train=True)
            timer.stop(layer.name)
            dy = self._dy_seen.get(layer.name)
            timer.start(layer.name, "backward")
            layer.backward(dy if dy is not None and dy.shape == y.shape else y)
            timer.stop(layer.name)
        finally:
            layer.set_reuse(None)
            layer.reuse_state = own
        return y
