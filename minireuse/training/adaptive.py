"""Adaptive deep reuse: who decides each reuse layer's setting as training goes on.

A *ladder* is a layer's list of stages, from the most approximate to the least;
the stage after the last is exact computation (reuse off). A strategy moves every
layer along its ladder, only forwards, so "the next stage" always means less error:

    fixed      one setting for the whole run (a one-stage ladder, never left);
    schedule   stage k while the training progress t (0..1) is in
               [boundaries[k], boundaries[k+1]); exact from the last boundary on;
    adaptive   the controller below.

The adaptive rule. Decisions are taken at the end of each epoch from numbers read
back once per epoch; the harm and the error are sampled on one step in
``sample_every``:

1. start: every layer is exact until the warm-up is over and the training loss
   falls steadily (the first epoch ending after ``start_after``, default the end
   of the learning-rate warm-up, lowered the loss by at least ``steady_drop``
   against the epoch before). Reuse during warm-up and at the peak learning rate
   is what damages training most (docs/adaptive.md). When reuse starts, each
   ladder is measured on the current batch and put in order of decreasing
   output error, so that moving on always reduces the error;
2. harm: on a sampled step the loss of the reuse forward is compared with the
   loss of the exact forward on the same batch (same dropout masks, same
   weights). When the epoch's mean relative loss increase exceeds ``harm_bound``,
   the reuse layer with the largest sampled error moves one stage towards exact;
3. divergence: when the training loss of an epoch trained with reuse rose against
   the epoch before, in ``rise_patience`` (default 1) such epochs in a row, every
   reusing layer moves one stage towards exact;
4. error cap (off unless ``error_bound`` is set): a layer whose sampled relative
   output error exceeds ``error_bound`` moves one stage on;
5. speed: a layer whose reuse forward+backward took longer per step than its
   exact computation, by more than ``speed_margin`` (5 %) in ``speed_patience`` (2)
   epochs in a row, goes straight to exact, so reuse does not keep training
   slower while one noisy epoch cannot end it. The comparison is paired: exact is
   timed in the same epoch as reuse, ``probe_steps`` exact forward+backward passes
   of the layer on the step's batch every ``probe_every`` steps and on the epoch's
   last step, each probe timing the layer exact and with its reuse setting in turns
   (exact, reuse, reuse, exact; passes that change no parameter and draw no training
   randomness); the guard reads the median over the epoch's probes of reuse's time
   over exact's, so a load that comes and goes, even within an epoch, meets both
   sides of a probe alike;
6. end: every layer is exact for the final ``exact_tail`` fraction of training.

All decisions are functions of the seed-determined run, so a resumed run makes
the same ones (the strategy's state, the ladders' order included, is saved in
the checkpoint).
"""
import dataclasses
import inspect
import json

from ..checks import check_range
from ..reuse.config import ReuseConfig

STRATEGIES = ("off", "fixed", "schedule", "adaptive")

# CifarNet defaults, from the parity protocol (docs/adaptive.md, docs/results.md). Reuse
# pays on the CPU only on conv2, pixel-aligned, offset family (docs/reuse.md). At 5,000
# images and 8 epochs (2-core CPU, seeds 0-2, confirmed on 3-5) no setting kept accuracy
# within 0.5 points; reuse in the backward only (exact forward, centroid dW) lost least.
# Its dX is exact: at the full budget (all 50,000 images, 15 epochs) the clustered dX
# (each member of a cluster gets its cluster's mean gradient) carried a quarter of the
# exact gradient to the layers below, at cosine 0.5, and cost 1.1 points on average;
# with exact dX the same reuse cost 0.5 on seed 0 (docs/results.md, "Full training").
# The classic setting (the reuse forward as well, clustered dX) is faster but lost about
# 2 points; it stays the default of the fixed strategy.
DEFAULT_LADDERS = {
    "conv2": [dict(L=64, H=32, dx_mode="exact", forward="exact")],
}
DEFAULT_FIXED = {"conv2": dict(L=64, H=32, dx_mode="cluster")}

# The other models' defaults, from `bench layers --model M` on their real activations
# (docs/models.md): the layers where L64 H32 pays on the CPU. AlexNet: conv2 (the
# CifarNet defaults apply by name); VGG-19: conv1_2 and conv2_1, its large early maps.
MODEL_DEFAULTS = {
    "vgg19": ({name: [dict(L=64, H=32, dx_mode="exact", forward="exact")] for name in ("conv1_2", "conv2_1")},
              {name: dict(L=64, H=32, dx_mode="cluster") for name in ("conv1_2", "conv2_1")}),
}
_DEFAULT_CONFIG = ReuseConfig()


def stage_label(cfg):
    """A setting in a few words: 'L64H32 offset dx=cluster' (L, H, the family, then the
    fields that differ from ReuseConfig's defaults); 'exact' for None or a disabled setting.
    cfg: a ReuseConfig or a dict of its fields (as history.json stores it)."""
    if cfg is None:
        return "exact"
    cfg = ReuseConfig.coerce(cfg)
    if not cfg.enabled:
        return "exact"
    short = {"dx_mode": "dx", "shared_planes": "shared", "pixel_aligned": "pixel"}
    extra = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in ("L", "H", "family", "measure_error") and value != getattr(_DEFAULT_CONFIG, f.name):
            extra.append(f"{short.get(f.name, f.name)}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join([f"L{cfg.L}H{cfg.H}", cfg.family] + extra)


def _configs(stages, layer):
    if isinstance(stages, dict):
        stages = [stages]
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"reuse settings for {layer!r}: expected a setting (dict) or a non-empty list "
                         f"of settings, got {stages!r}")
    return [ReuseConfig.coerce(s) for s in stages]


def load_settings(path):
    """Read a JSON settings file: {"layers": {name: setting or [settings]}, "options": {...}}.

    A bare {name: ...} mapping is taken as the "layers" part.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read reuse settings {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"reuse settings {path}: expected a JSON object, got {type(data).__name__}")
    if "layers" not in data:
        data = {"layers": data}
    unknown = set(data) - {"layers", "options"}
    if unknown:
        raise ValueError(f"reuse settings {path}: unknown keys {sorted(unknown)}; expected 'layers', 'options'")
    return data["layers"], data.get("options", {})


class ReuseStrategy:
    """Base class: holds each layer's ladder and its current stage index."""

    name = "fixed"

    def __init__(self, ladders, exact_tail=0.0):
        self.ladders = {layer: _configs(stages, layer) for layer, stages in ladders.items()}
        check_range("exact_tail", exact_tail, 0, 1, open_high=True)
        self.exact_tail = exact_tail
        self.stage = {layer: 0 for layer in self.ladders}
        self.events = []

    # ----- the layers
    def attach(self, model):
        """Check the layer names and every stage against the model and apply the current stages."""
        names = {l.name for l in model.reuse_layers()}
        unknown = set(self.ladders) - names
        if unknown:
            raise ValueError(f"reuse settings name layers {sorted(unknown)} that the model does not have "
                             f"as conv/dense layers; it has {sorted(names)}")
        for name, ladder in self.ladders.items():
            for cfg in ladder:
                cfg.check_fits(model.layer(name))
        self.model = model
        self.apply()

    def current(self, layer):
        """The layer's current ReuseConfig, or None for exact."""
        k = self.stage[layer]
        ladder = self.ladders[layer]
        return ladder[k] if k < len(ladder) else None

    def apply(self):
        """Push the current settings into the layers; True when anything changed."""
        changed = False
        for name in self.ladders:
            layer = self.model.layer(name)
            cfg = self.current(name)
            if cfg != layer.reuse:
                layer.set_reuse(cfg)
                changed = True
        return changed

    def advance(self, layer, reason, to_exact=False):
        old = self.stage[layer]
        self.stage[layer] = len(self.ladders[layer]) if to_exact else min(old + 1, len(self.ladders[layer]))
        if self.stage[layer] != old:
            self.events.append(dict(layer=layer, stage=self.stage[layer], reason=reason))

    def describe(self):
        """A short text of every layer's stage, for the progress bar."""
        return " ".join(f"{name}:" + stage_label(self.current(name)).replace(" ", ",") for name in self.ladders)

    # ----- hooks the trainer calls
    def on_step(self, progress):
        """Called before every step with progress t in [0, 1); returns True if settings changed."""
        if progress >= 1.0 - self.exact_tail and self.exact_tail > 0:
            for layer in self.ladders:
                if self.current(layer) is not None:
                    self.advance(layer, "exact tail", to_exact=True)
        return self.apply()

    def configure(self, warmup_fraction):
        """Told by the trainer where the learning-rate warm-up ends; only the adaptive rule uses it."""

    def measure_error_now(self, step):
        """Whether this step samples the reuse error and harm."""
        return False

    def wants_ladder_order(self):
        """Layers whose ladders should be measured now (see AdaptiveStrategy)."""
        return []

    def probe_now(self, step, steps):
        """Layers whose exact computation is timed on this step (the adaptive speed guard)."""
        return []

    def on_epoch_end(self, progress, train_loss, layer_stats, harm=None):
        """layer_stats: {layer: dict(rel_error, step_ms, ...)}; harm: the epoch's mean relative
        loss increase of the reuse forward over the exact one on sampled steps (or None).
        Returns True if settings changed."""
        return self.apply()

    def state_dict(self):
        return {"stage": dict(self.stage), "events": list(self.events)}

    def load_state_dict(self, d):
        self.stage.update({k: int(v) for k, v in d["stage"].items() if k in self.stage})
        self.events = list(d.get("events", []))


class FixedStrategy(ReuseStrategy):
    name = "fixed"

    def __init__(self, settings, exact_tail=0.0):
        super().__init__({k: [v] if isinstance(v, dict) else v[:1] for k, v in settings.items()}, exact_tail)


class ScheduleStrategy(ReuseStrategy):
    """Stage k of every ladder from progress boundaries[k]; exact from boundaries[-1] on."""

    name = "schedule"

    def __init__(self, ladders, boundaries=None, exact_tail=None):
        super().__init__(ladders, 0.0)
        n = max(len(l) for l in self.ladders.values())
        if boundaries is None:
            # stages share the first 85% of training evenly; the last 15% is exact
            boundaries = [0.85 * k / n for k in range(n)] + [0.85]
        if len(boundaries) != n + 1 or sorted(boundaries) != list(boundaries) or boundaries[0] != 0.0:
            raise ValueError(f"schedule boundaries must be {n + 1} increasing fractions starting at 0 "
                             f"(one per stage, then the start of exact), got {boundaries}")
        self.boundaries = list(boundaries)

    def on_step(self, progress):
        for layer, ladder in self.ladders.items():
            k = sum(1 for b in self.boundaries[1:] if progress >= b)
            # the last boundary always means exact, whatever the ladder's length
            target = len(ladder) if progress >= self.boundaries[-1] else min(k, len(ladder) - 1)
            while self.stage[layer] < target:
                self.advance(layer, f"schedule at progress {progress:.2f}")
        return self.apply()


class AdaptiveStrategy(ReuseStrategy):
    """The controller described in this module's docstring."""

    name = "adaptive"

    def __init__(self, ladders, start_after=None, steady_drop=0.02, harm_bound=0.05, error_bound=None,
                 exact_tail=0.1, sample_every=20, probe_steps=1, probe_every=50, speed_guard=True,
                 order_ladders=True, speed_margin=0.05, speed_patience=2, rise_patience=1):
        super().__init__(ladders, exact_tail)
        for name, v, lo, hi in (("start_after", start_after, 0, 1), ("steady_drop", steady_drop, 0, 1),
                                ("harm_bound", harm_bound, 0, None), ("error_bound", error_bound, 0, None),
                                ("speed_margin", speed_margin, 0, None)):
            if v is not None:           # null: the rule is off
                check_range(f"adaptive option {name}", v, lo, hi, open_high=True)
        for name, v in (("sample_every", sample_every), ("speed_patience", speed_patience),
                        ("rise_patience", rise_patience), ("probe_steps", probe_steps),
                        ("probe_every", probe_every)):
            check_range(f"adaptive option {name}", v, 1, integer=True)
        self.start_after, self.steady_drop = start_after, steady_drop
        self.harm_bound, self.error_bound = harm_bound, error_bound
        self.sample_every, self.probe_steps, self.probe_every = sample_every, probe_steps, probe_every
        self.speed_guard, self.order_ladders = speed_guard, order_ladders
        self.speed_margin, self.speed_patience = speed_margin or 0.0, speed_patience
        self.slow_epochs = {}       # layer -> consecutive epochs slower than exact beyond the margin
        self.rise_patience = rise_patience
        self.rising_epochs = 0      # consecutive reuse epochs whose training loss rose
        self.started = False
        self.ordered = not order_ladders
        self.prev_loss = None

    def configure(self, warmup_fraction):
        """The trainer tells the strategy where the learning-rate warm-up ends (a fraction of training)."""
        if self.start_after is None:
            self.start_after = warmup_fraction

    def current(self, layer):
        return super().current(layer) if self.started else None

    def describe(self):
        return super().describe() if self.started else "waiting: exact until the loss falls steadily"

    def measure_error_now(self, step):
        return self.started and step % self.sample_every == 0 and any(
            self.current(l) is not None for l in self.ladders)

    def probe_now(self, step, steps):
        """The reusing layers whose exact computation the speed guard times on this step (of
        ``steps`` in the epoch): every probe_every steps, and on the last one, so that an epoch
        resumed past its probes still has one."""
        if not (self.speed_guard and (step % self.probe_every == 0 or step == steps - 1)):
            return []
        return [l for l in self.ladders if self.current(l) is not None]

    def on_step(self, progress):
        if not self.started and self.steady_drop is None and progress >= (self.start_after or 0.0):
            self._start(f"progress {progress:.2f} >= start_after")
        return super().on_step(progress)

    def _start(self, reason):
        self.started = True
        for layer in self.ladders:
            self.events.append(dict(layer=layer, stage=self.stage[layer], reason=f"reuse starts: {reason}"))

    def wants_ladder_order(self):
        """Layers whose ladder still has to be measured and put in order (at the first reuse step)."""
        if self.ordered or not self.started:
            return []
        return [l for l in self.ladders if len(self.ladders[l]) > 1]

    def set_ladder_order(self, errors):
        """errors: {layer: [relative output error of each stage on one batch]}; sorts each ladder
        by decreasing error (stable). Called when reuse starts: a reusing layer starts again
        from the first stage of its ordered ladder."""
        for layer, errs in errors.items():
            ladder = self.ladders[layer]
            order = sorted(range(len(ladder)), key=lambda k: -errs[k])
            self.ladders[layer] = [ladder[k] for k in order]
            if self.stage[layer] < len(ladder):
                self.stage[layer] = 0
            self.events.append(dict(layer=layer, stage=self.stage[layer], reason="ladder ordered by measured "
                                    "error: " + ", ".join(f"{stage_label(ladder[k])} {errs[k]:.3f}" for k in order)))
        self.ordered = True

    def on_epoch_end(self, progress, train_loss, layer_stats, harm=None):
        prev, self.prev_loss = self.prev_loss, train_loss
        if not self.started:
            after = progress > (self.start_after or 0.0) + 1e-9
            falling = (self.steady_drop is None or (prev is not None and train_loss is not None
                                                    and train_loss <= prev * (1 - self.steady_drop)))
            if after and falling and progress < 1.0 - self.exact_tail:
                self._start(f"loss fell {prev:.4f} -> {train_loss:.4f} after warm-up" if prev is not None
                            else f"progress {progress:.2f}")
            return self.apply()
        reusing = [l for l in self.ladders if self.current(l) is not None]
        moved = set()
        for layer in reusing:
            st = layer_stats.get(layer, {})
            # reuse_vs_exact: the median over this epoch's probes of the layer's reuse time over its
            # exact time, timed in turns on the probe's batch; without probes' pairs (records of
            # older runs), the epoch's mean step time against its exact probes' mean
            exact_ms, reuse_ms, err = st.get("exact_probe_ms"), st.get("step_ms"), st.get("rel_error")
            ratio = st.get("reuse_vs_exact")
            if ratio is None and exact_ms is not None and reuse_ms is not None:
                ratio = reuse_ms / exact_ms if exact_ms > 0 else None
            slow = None
            if self.speed_guard and ratio is not None:
                slow = ratio > 1 + self.speed_margin
                self.slow_epochs[layer] = self.slow_epochs.get(layer, 0) + 1 if slow else 0
            if slow and self.slow_epochs[layer] >= self.speed_patience:
                how = (f"on the same steps (median of {st['paired_probes']} probes)" if "reuse_vs_exact" in st
                       else f"({reuse_ms:.1f} against {exact_ms:.1f} ms/step in the same epoch)")
                self.advance(layer, f"reuse {ratio:.2f}x exact's time {how}: slower than exact "
                                    f"(+{100 * self.speed_margin:.0f} %) for {self.slow_epochs[layer]} epochs",
                             to_exact=True)
                moved.add(layer)
            elif self.error_bound is not None and err is not None and err > self.error_bound:
                self.advance(layer, f"sampled error {err:.3f} > bound {self.error_bound:.3f}")
                moved.add(layer)
        left = [l for l in reusing if l not in moved]
        rose = prev is not None and train_loss is not None and train_loss > prev
        self.rising_epochs = self.rising_epochs + 1 if rose and reusing else 0
        if left and rose and self.rising_epochs >= self.rise_patience:
            in_row = f", {self.rising_epochs} epochs in a row" if self.rise_patience > 1 else ""
            for layer in left:
                self.advance(layer, f"loss rose under reuse ({prev:.4f} -> {train_loss:.4f}{in_row})")
            self.rising_epochs = 0
        elif left and harm is not None and self.harm_bound is not None and harm > self.harm_bound:
            worst = max(left, key=lambda l: layer_stats.get(l, {}).get("rel_error") or 0.0)
            self.advance(worst, f"reuse raised the sampled loss by {100 * harm:.1f} % > "
                                f"{100 * self.harm_bound:.1f} %")
        return self.apply()

    def state_dict(self):
        d = super().state_dict()
        d.update(prev_loss=self.prev_loss, slow_epochs=dict(self.slow_epochs),
                 rising_epochs=self.rising_epochs,
                 started=self.started,
                 ordered=self.ordered, start_after=self.start_after,
                 ladders={k: [c.as_dict() for c in v] for k, v in self.ladders.items()})
        return d

    def load_state_dict(self, d):
        super().load_state_dict(d)
        # a checkpoint from before the paired speed guard also holds exact_ms (the first batch's
        # exact times): the guard times exact in every epoch now, so it is not read
        self.prev_loss = d.get("prev_loss")
        self.slow_epochs = {k: int(v) for k, v in d.get("slow_epochs", {}).items()}
        self.rising_epochs = int(d.get("rising_epochs", 0))
        self.started, self.ordered = bool(d.get("started", False)), bool(d.get("ordered", self.ordered))
        self.start_after = d.get("start_after", self.start_after)
        for layer, stages in d.get("ladders", {}).items():
            if layer in self.ladders:
                self.ladders[layer] = _configs(stages, layer)


def model_defaults(model):
    """(ladders, fixed settings) of a model: MODEL_DEFAULTS[model], else CifarNet's."""
    return MODEL_DEFAULTS.get(model, (DEFAULT_LADDERS, DEFAULT_FIXED))


def resolved_layers(kind, layers=None, model="cifarnet"):
    """The per-layer settings a strategy of this kind runs: ``layers`` when given, else the
    model's defaults as plain dicts (None for 'off'). A run saves these, so a run made with
    another default never counts as a run with the same settings."""
    if kind == "off":
        return None
    if layers:
        return layers
    ladders, fixed = model_defaults(model)
    return json.loads(json.dumps(fixed if kind == "fixed" else ladders))


def make_strategy(kind, layers=None, options=None, model="cifarnet"):
    """A strategy by name ('off' gives None) from per-layer settings (or the model's defaults:
    CifarNet's, or MODEL_DEFAULTS[model])."""
    options = dict(options or {})
    if kind not in STRATEGIES:
        raise ValueError(f"unknown reuse strategy {kind!r}; expected one of {STRATEGIES}")
    if kind == "off":
        return None
    ladders, fixed = model_defaults(model)
    cls, default = {"fixed": (FixedStrategy, fixed), "schedule": (ScheduleStrategy, ladders),
                    "adaptive": (AdaptiveStrategy, ladders)}[kind]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "ladders", "settings")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"reuse options {unknown} are not options of the {kind!r} strategy; "
                         f"it takes {allowed}")
    return cls(layers or default, **options)
