"""Adaptive deep reuse: who decides each reuse layer's setting as training goes on.

A *ladder* is a layer's list of stages, from aggressive to conservative; the
stage after the last is exact computation (reuse off). A strategy moves every
layer along its ladder, only forwards:

    fixed      one setting for the whole run (a one-stage ladder, never left);
    schedule   stage k while the training progress t (0..1) is in
               [boundaries[k], boundaries[k+1]); exact from the last boundary on;
    adaptive   the controller below.

The adaptive rule (checked once per epoch, from host numbers read once per epoch;
the sampled error is measured on one step out of ``error_every``):

1. accuracy: move a layer to its next stage when its sampled relative output
   error exceeds a bound that tightens with progress,
   ``bound(t) = error_start + (error_end - error_start) * t``; early training
   tolerates approximation, late training does not;
2. loss: move every layer one stage on when the epoch's training loss fell by
   less than ``plateau`` (relative) against the previous epoch in the same stage:
   the current approximation has stopped paying for itself;
3. speed: a layer whose reuse forward+backward took longer per step than its exact
   computation goes straight to exact, so reuse never makes training slower
   than exact. Reuse is timed on every step that does not sample the error;
   exact is timed on the first batch (``probe_steps`` forward+backward passes
   with reuse off that change no parameter);
4. parity: every layer is exact for the final ``exact_tail`` fraction of training.

All decisions are functions of the seed-determined run, so a resumed run makes
the same ones (the strategy's state is saved in the checkpoint).
"""
import json

from .config import ReuseConfig

STRATEGIES = ("off", "fixed", "schedule", "adaptive")

# CifarNet defaults. The layer benchmark (docs/reuse.md, 2-core CPU, batch 128,
# real activations) found reuse paying only on conv2 (conv1 with K = 75 and the
# dense layers with N = batch were slower with reuse), and there only on the
# pixel-aligned path with the offset family. In training (docs/adaptive.md,
# 10,000 CIFAR-10 images, 15 epochs) settings with a per-layer error near 0.2
# or above (L=64 H=20) cost about 10 accuracy points; L=64 H=32 (error about
# 0.17) cost 7 with cluster-mode dX at 1.56x the speed of exact training, 6
# with exact dX at 1.17x. The cluster-mode ladder is the default.
DEFAULT_LADDERS = {
    "conv2": [dict(L=64, H=32, dx_mode="cluster"), dict(L=32, H=32, dx_mode="cluster")],
}
DEFAULT_FIXED = {"conv2": dict(L=64, H=32, dx_mode="cluster")}


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
        if not 0.0 <= exact_tail < 1.0:
            raise ValueError(f"exact_tail must be in [0, 1), got {exact_tail}")
        self.exact_tail = exact_tail
        self.stage = {layer: 0 for layer in self.ladders}
        self.events = []

    # ----- the layers
    def attach(self, model):
        """Check the layer names against the model and apply the current stages."""
        names = {l.name for l in model.reuse_layers()}
        unknown = set(self.ladders) - names
        if unknown:
            raise ValueError(f"reuse settings name layers {sorted(unknown)} that the model does not have "
                             f"as conv/dense layers; it has {sorted(names)}")
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
        parts = []
        for name in self.ladders:
            cfg = self.current(name)
            parts.append(f"{name}:" + ("exact" if cfg is None else f"L{cfg.L}H{cfg.H}"))
        return " ".join(parts)

    def settings(self):
        """{layer: setting dict or None} for history.json."""
        return {name: (None if self.current(name) is None else self.current(name).as_dict())
                for name in self.ladders}

    # ----- hooks the trainer calls
    def on_step(self, progress):
        """Called before every step with progress t in [0, 1); returns True if settings changed."""
        if progress >= 1.0 - self.exact_tail and self.exact_tail > 0:
            for layer in self.ladders:
                if self.current(layer) is not None:
                    self.advance(layer, "exact tail", to_exact=True)
        return self.apply()

    def measure_error_now(self, step):
        return False

    def on_epoch_end(self, progress, train_loss, layer_stats):
        """layer_stats: {layer: dict(rel_error, step_ms, ...)}; returns True if settings changed."""
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

    def __init__(self, ladders, error_start=0.4, error_end=0.1, plateau=0.01, exact_tail=0.2,
                 error_every=20, probe_steps=2, speed_guard=True):
        super().__init__(ladders, exact_tail)
        self.speed_guard = speed_guard
        self.error_start, self.error_end = error_start, error_end
        self.plateau, self.error_every, self.probe_steps = plateau, error_every, probe_steps
        self.prev_loss = None
        self.exact_ms = {}

    def bound(self, progress):
        return self.error_start + (self.error_end - self.error_start) * min(max(progress, 0.0), 1.0)

    def measure_error_now(self, step):
        return step % self.error_every == 0

    def on_epoch_end(self, progress, train_loss, layer_stats):
        changed_stage = False
        for layer in self.ladders:
            if self.current(layer) is None:
                continue
            st = layer_stats.get(layer, {})
            err = st.get("rel_error")
            exact_ms, reuse_ms = self.exact_ms.get(layer), st.get("step_ms")
            if self.speed_guard and exact_ms is not None and reuse_ms is not None and reuse_ms > exact_ms:
                self.advance(layer, f"reuse {reuse_ms:.1f} ms/step slower than exact {exact_ms:.1f}", to_exact=True)
                changed_stage = True
            elif err is not None and err > self.bound(progress):
                self.advance(layer, f"sampled error {err:.3f} > bound {self.bound(progress):.3f}")
                changed_stage = True
        if not changed_stage and self.prev_loss is not None and train_loss is not None:
            if train_loss > self.prev_loss * (1 - self.plateau):
                for layer in self.ladders:
                    if self.current(layer) is not None:
                        self.advance(layer, f"loss plateau ({self.prev_loss:.4f} -> {train_loss:.4f})")
                        changed_stage = True
        self.prev_loss = None if changed_stage else train_loss
        return self.apply()

    def state_dict(self):
        d = super().state_dict()
        d.update(prev_loss=self.prev_loss, exact_ms=dict(self.exact_ms))
        return d

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.prev_loss = d.get("prev_loss")
        self.exact_ms = dict(d.get("exact_ms", {}))


def make_strategy(kind, layers=None, options=None):
    """A strategy by name ('off' gives None) from per-layer settings (or the CifarNet defaults)."""
    options = dict(options or {})
    if kind not in STRATEGIES:
        raise ValueError(f"unknown reuse strategy {kind!r}; expected one of {STRATEGIES}")
    if kind == "off":
        return None
    if kind == "fixed":
        return FixedStrategy(layers or DEFAULT_FIXED, **options)
    if kind == "schedule":
        return ScheduleStrategy(layers or DEFAULT_LADDERS, **options)
    return AdaptiveStrategy(layers or DEFAULT_LADDERS, **options)
