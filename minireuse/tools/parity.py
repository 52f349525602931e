"""Accuracy parity over seeds: the same recipe exact and with deep reuse, once per seed.

    python -m minireuse parity --seeds 0,1,2 --data DIR --epochs N --reuse adaptive \\
        [--reuse-config FILE] [every other train flag] [--exact-from DIR] --out runs/parity

For each seed S it trains the recipe twice from that seed, exact (reuse off) into
OUT/seedS/exact and with the --reuse strategy (default adaptive) and --reuse-config
into OUT/seedS/reuse; each is a normal training run (history.json, checkpoint.npz,
model.npz). The data are loaded once for all runs; the test accuracy is over the
whole test set unless --limit-test says otherwise.

The protocol is resumable and re-uses what is there. A run directory whose
history.json has every epoch asked for, with the same settings (``same_settings``:
all keys but where and how it ran), is not trained again; one with a checkpoint.npz
and the same settings but fewer epochs done is resumed from it; one with other
settings is refused, naming the keys that differ, before anything is trained. A
reuse run records the per-layer settings it ran (the model's defaults resolved), so
runs made under another default are not taken for runs of today's.
``--exact-from DIR`` takes each seed's exact run from DIR/seedS/exact (complete, same
settings apart from the reuse keys) instead of training it, so that several reuse
settings are compared against one set of exact runs.

``--control`` also trains, per seed, OUT/seedS/control: the reuse layers with the
exact gradients through the reuse code (strategy 'fixed' from the first step, each
layer's first setting with forward 'exact', dx_mode 'exact' and dw_sample 1, so its
dW is the centroid dW plus every residual: X^T dY up to the order of additions).
Its difference from the exact run is what a rounding-sized perturbation alone does
to a run at this budget: the table's own noise floor, printed per seed and across
seeds with the reuse run's difference from it.

It prints a table and writes OUT/parity.json (atomically): per seed the final and
best test accuracy of both runs and their difference (reuse - exact, in points), the
training time of both and, for every layer that used reuse, its forward+backward
seconds in both runs and their ratio, and the reuse run's stages (epochs grouped by
the layer's setting) with their mean r_c, sampled relative error (and the cosines and
gains of dW and of a clustered dX to the exact ones, when recorded); across seeds the mean, sample standard deviation, min and max of the
differences, the mean accuracies, and the time ratios of the summed seconds.

Time to accuracy: every run's test accuracy at each evaluation (every epoch's end,
and every ``--eval-every`` of an epoch) against its cumulative training seconds
(evaluation excluded) is in parity.json (``curves``), with the training seconds each
run took to reach each target: per seed its exact run's final accuracy minus 0.3 and
minus 1.0 points, and the levels of ``--targets`` (percent); across seeds, the runs that
reached it and the ratio of summed seconds against exact and against PyTorch. The
figure OUT/time_to_accuracy.png (matplotlib, the plot extra) draws those curves, one
panel per seed. ``--step-ms exact=MS,reuse=MS[,pytorch=MS]`` times the curves by steps
instead (parity_results.step_time_curve: each evaluation's steps times the milliseconds
given, reuse's in the epochs where a layer reused), for runs that shared the machine.

``--pytorch [SEEDS]`` also trains, per seed (all, or those listed), OUT/seedS/pytorch:
the recipe in PyTorch from the same initial weights, batches, dropout masks and
updates (minireuse.tools.pytorch_run), a row of the table and the figure; without PyTorch
the table says it was skipped and why.

At small budgets (few epochs, a subset of the data) the accuracy difference of one
seed is noisy, often by more than the effect of a reuse setting: report the spread
over three seeds or more, not one seed's number.
"""
import dataclasses
import json
import os
import sys

from ..fileio import atomic_write_json
from ..training.adaptive import resolved_layers, stage_label
from ..training.batches import load_data
from ..training.checkpoint import TrainingError, read_checkpoint
from ..training.config import TrainConfig
from ..training.outdir import CHECKPOINT, HISTORY
from ..training.trainer import Trainer
from .parity_results import (accuracy_curve, aggregate, aggregate_targets, format_pytorch, format_table,
                             format_targets, pytorch_entry, reuse_stages, seed_entry, seed_targets, spread,
                             step_time_curve, time_to, time_to_targets)

RESULT = "parity.json"
FIGURE = "time_to_accuracy.png"
# where and how a run ran, or when it was evaluated: not what it computed (TrainConfig's run_only
# settings; "quiet" was stored by older runs)
IGNORED_SETTINGS = frozenset(TrainConfig.names("run_only")) | {"quiet"}
# what an exact run may hold from a reuse config it did not use (its "reuse" must still be "off")
REUSE_OPTION_SETTINGS = frozenset({"reuse_layers", "reuse_options"})


class ParityError(ValueError):
    """The protocol cannot run as asked (bad seeds, a run directory with other settings, ...)."""


class _Absent:
    def __repr__(self):
        return "(absent)"


ABSENT = _Absent()


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers, comma-separated."""
    seeds = []
    for part in str(text).split(","):
        try:
            v = int(part)
        except ValueError:
            raise ParityError(f"expected a comma-separated list of non-negative integers, got {text!r}") from None
        if v < 0:
            raise ParityError(f"seeds must be non-negative integers, got {v} in {text!r}")
        if v in seeds:
            raise ParityError(f"seed {v} is listed twice in {text!r}; the seeds must be distinct")
        seeds.append(v)
    return seeds


def settings_differences(saved, wanted, ignore=()):
    """The settings on which a saved run differs from the wanted one, as
    [(key, saved value, wanted value)]; empty means "same settings".

    Every key of either dict counts except IGNORED_SETTINGS and ``ignore``; values are
    compared as JSON holds them, and a key missing on one side is its Trainer default there
    (a run saved before a setting existed ran as its default), else ABSENT."""
    saved, wanted = json.loads(json.dumps(saved)), json.loads(json.dumps(wanted))
    skip = IGNORED_SETTINGS | set(ignore)
    defaults = json.loads(json.dumps(Trainer.DEFAULTS))

    def value(d, k):
        return d.get(k, defaults.get(k, ABSENT))
    return [(k, value(saved, k), value(wanted, k)) for k in sorted(set(saved) | set(wanted))
            if k not in skip and value(saved, k) != value(wanted, k)]


def _differences_text(diffs):
    return "; ".join(f"{k}: {s!r} there, {w!r} asked" for k, s, w in diffs)


@dataclasses.dataclass
class RunState:
    """What a run directory holds: 'complete' (history used as is), 'partial' (resume
    from checkpoint) or 'new' (nothing to re-use)."""
    path: str
    state: str
    history: list = None
    checkpoint: str = None
    done: int = 0


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ParityError(f"cannot read {path}: {e}") from e


def _checkpoint_meta(path):
    try:
        return read_checkpoint(path, arrays=False)[0]
    except TrainingError as e:
        raise ParityError(f"cannot read checkpoint {path}: {e}") from e


def inspect_run(path, wanted, ignore=()):
    """The state of run directory ``path`` for a run with settings ``wanted`` (a full
    Trainer config); raises ParityError when what is there was trained with other settings."""
    hist_path, ckpt_path = os.path.join(path, HISTORY), os.path.join(path, CHECKPOINT)
    saved = _read_json(hist_path) if os.path.exists(hist_path) else None
    if saved is not None:
        if not isinstance(saved, dict) or not isinstance(saved.get("epochs"), list):
            raise ParityError(f"{hist_path} is not a minireuse training history")
        diffs = settings_differences(saved.get("settings", {}), wanted, ignore)
        if diffs:
            raise ParityError(f"{path} holds a run with other settings ({_differences_text(diffs)}); "
                              "it is left alone: use another --out or remove that directory")
        if len(saved["epochs"]) >= wanted["epochs"]:
            return RunState(path, "complete", history=saved["epochs"], done=len(saved["epochs"]))
    done = len(saved["epochs"]) if saved is not None else 0
    if os.path.exists(ckpt_path):
        meta = _checkpoint_meta(ckpt_path)
        diffs = settings_differences(meta.get("config", {}), wanted, ignore)
        if diffs:
            raise ParityError(f"{ckpt_path} was saved by a run with other settings ({_differences_text(diffs)}); "
                              "it is left alone: use another --out or remove that directory")
        return RunState(path, "partial", checkpoint=ckpt_path, done=done)
    if saved is not None:
        raise ParityError(f"{path} has {done} of {wanted['epochs']} epochs in {HISTORY} but no {CHECKPOINT} "
                          "to resume from; remove that directory or use another --out")
    return RunState(path, "new")


def control_layers(layers):
    """The control's settings from resolved reuse layers ({name: setting or [settings]}): per
    layer its first setting with the exact gradients (forward and dX exact, dW corrected by
    every residual), as a one-stage ladder."""
    out = {}
    for name, stages in (layers or {}).items():
        first = stages[0] if isinstance(stages, list) else stages
        out[name] = [dict(first, forward="exact", dx_mode="exact", dw_sample=1.0, enabled=True)]
    return out


def run_step_curve(kind, history, steps_per_epoch, step_ms):
    """The time-by-steps curve of one run of a seed: the reuse run's epochs at reuse's
    milliseconds where a layer reused and at exact's in the others (its warm-up, its exact
    tail, the epochs the speed guard sent back to exact); exact and control at exact's;
    PyTorch at its own."""
    if kind == "pytorch":
        return step_time_curve(history, steps_per_epoch, step_ms["pytorch"])
    return step_time_curve(history, steps_per_epoch, step_ms["exact"], step_ms["reuse"] if kind == "reuse" else None)


def save_figure(result, out):
    """OUT/time_to_accuracy.png; returns a line naming it, or why there is none."""
    from . import plot
    panels = [(f"seed {p['seed']}", p["curves"], [(t["label"], t["accuracy"]) for t in p["time_to_targets"]])
              for p in result["per_seed"]]
    try:
        return "figure: " + plot.save_accuracy_time_figure(panels, os.path.join(out, FIGURE))
    except plot.PlotError as e:
        return f"no figure: {e}"


def _check_strategy(cfg):
    """Build the strategy and attach it to a fresh model, so that bad reuse settings
    fail before the exact runs are trained."""
    from ..models import MODELS
    from ..training.adaptive import make_strategy
    strategy = make_strategy(cfg["reuse"], cfg.get("reuse_layers"), cfg.get("reuse_options"))
    if cfg.get("model") in MODELS:
        strategy.attach(MODELS[cfg["model"]]())


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _steps_per_epoch(cfg, data):
    """Training steps in an epoch of the runs (the data read when no run loaded it)."""
    if data is not None:
        n = len(data[0])
    else:
        from ..data import load_cifar10
        n = len(load_cifar10(cfg["data"], download=False, progress=False)[0])
        n = min(n, cfg["limit_train"]) if cfg.get("limit_train") else n
    return -(-n // cfg["batch_size"])


def _count_test_images(cfg):
    """Test images the runs were evaluated on, when no run had to load the data: read
    the data (no download); None if they are not there."""
    from ..data import CorruptDataError, DataNotFoundError, load_cifar10
    try:
        n = len(load_cifar10(cfg["data"], download=False, progress=False)[2])
    except (DataNotFoundError, CorruptDataError):
        return None
    return min(n, cfg["limit_test"]) if cfg.get("limit_test") else n


def run(cfg, seeds, exact_from=None, quiet=False, data=None, control=False, targets=(), pytorch=None,
        step_ms=None):
    """The protocol for a train config (its "reuse" the strategy, "out" the parity
    directory; any "seed" is replaced by each of ``seeds``). Returns the parity.json dict
    (its "table" the printed report). Every run directory is checked before anything is
    trained. control: also train each seed's control run; targets: accuracy levels in
    percent for the time to accuracy; pytorch: the seeds that get a PyTorch run (True:
    all); step_ms: {'exact', 'reuse'[, 'pytorch']: milliseconds per step} to time the curves
    by steps instead of the runs' own seconds (module docstring)."""
    seeds = parse_seeds(",".join(str(s) for s in seeds)) if not isinstance(seeds, str) else parse_seeds(seeds)
    torch_seeds = seeds if pytorch is True else [s for s in (pytorch or ()) if s in seeds]
    unknown = sorted(set(pytorch) - set(seeds)) if pytorch not in (None, True) else []
    if unknown:
        raise ParityError(f"--pytorch names seeds {unknown} that --seeds does not list")
    base = {**Trainer.DEFAULTS, **{k: v for k, v in cfg.items() if k != "seed"}}
    strategy = base["reuse"]
    if strategy == "off":
        raise ParityError("parity needs a reuse strategy: --reuse fixed, schedule or adaptive")
    _check_strategy(base)
    out = base["out"]
    if step_ms is not None and torch_seeds and "pytorch" not in step_ms:
        raise ParityError("--step-ms needs pytorch=MS too when --pytorch trains runs: every curve is timed the "
                          "same way")
    torch_skipped = None
    if torch_seeds:
        from .pytorch_run import check_recipe, torch_missing
        check_recipe(base)
        torch_skipped = torch_missing()
    plan = []
    for s in seeds:
        ecfg = dict(base, seed=s, reuse="off", reuse_layers=None, reuse_options=None,
                    out=os.path.join(out, f"seed{s}", "exact"))
        rcfg = dict(base, seed=s, out=os.path.join(out, f"seed{s}", "reuse"),
                    reuse_layers=resolved_layers(strategy, base.get("reuse_layers"), base["model"]))
        if exact_from:
            path = os.path.join(exact_from, f"seed{s}", "exact")
            est = inspect_run(path, dict(ecfg, out=path), ignore=REUSE_OPTION_SETTINGS)
            if est.state != "complete":
                raise ParityError(f"--exact-from: {path} is not a complete exact run "
                                  f"({est.done} of {base['epochs']} epochs in its {HISTORY}); "
                                  "finish it there first or leave --exact-from out")
            esrc = "exact-from"
        else:
            est = inspect_run(ecfg["out"], ecfg)
            esrc = None
        runs = [(ecfg, est, esrc), (rcfg, inspect_run(rcfg["out"], rcfg), None)]
        if control:
            ccfg = dict(base, seed=s, reuse="fixed", reuse_layers=control_layers(rcfg["reuse_layers"]),
                        reuse_options=None, out=os.path.join(out, f"seed{s}", "control"))
            runs.append((ccfg, inspect_run(ccfg["out"], ccfg), None))
        if s in torch_seeds and torch_skipped is None:
            pcfg = dict(ecfg, reuse_options=None, framework="pytorch", out=os.path.join(out, f"seed{s}", "pytorch"))
            runs.append((pcfg, inspect_run(pcfg["out"], pcfg), None))
        plan.append((s, runs))

    per_seed, steps_per_epoch = [], None
    for s, runs in plan:
        got = {}
        for c, st, src in runs:
            kind = "pytorch" if c.get("framework") else os.path.basename(st.path)
            if st.state == "complete":
                src = src or "reused"
                _log(f"seed {s} {kind}: using the complete run in {st.path}")
                history = st.history
            else:
                history, src, data = _train(c, st, kind, s, data, quiet)
            got[kind] = (history, dict(dir=os.path.abspath(st.path), source=src))
        (eh, erun), (rh, rrun) = got["exact"], got["reuse"]
        entry = seed_entry(s, eh, rh, erun, rrun, *got.get("control", ()))
        if "pytorch" in got:
            entry.update(pytorch_entry(entry["exact"], *got["pytorch"]))
        if step_ms is not None and steps_per_epoch is None:
            steps_per_epoch = _steps_per_epoch(base, data)
        curves = {kind: accuracy_curve(h) if step_ms is None else run_step_curve(kind, h, steps_per_epoch, step_ms)
                  for kind, (h, _) in got.items()}
        entry.update(curves=curves, time_to_targets=time_to_targets(
            curves, seed_targets(entry["exact"]["final_test_acc"], targets), reuse_ran=entry["reuse_ran"]))
        per_seed.append(entry)

    n_test = len(data[2]) if data is not None else _count_test_images(base)
    result = dict(strategy=strategy, seeds=seeds, epochs=base["epochs"], test_images=n_test, step_ms=step_ms,
                  control=control, targets=list(targets),
                  pytorch=None if not torch_seeds else (dict(skipped=torch_skipped) if torch_skipped
                                                         else dict(seeds=torch_seeds)),
                  train_images=len(data[0]) if data is not None else None,
                  limit_test=base["limit_test"],
                  exact_from=os.path.abspath(exact_from) if exact_from else None,
                  settings={k: v for k, v in base.items() if k not in ("out", "seed")},
                  per_seed=per_seed, aggregate=dict(aggregate(per_seed), time_to_targets=aggregate_targets(per_seed)))
    result["table"] = "\n".join([format_table(result), *format_pytorch(result), *format_targets(result),
                                 "", save_figure(result, out)])
    atomic_write_json(os.path.join(out, RESULT), result)
    return result


def _train(c, st, kind, seed, data, quiet):
    """Train (or resume) one run of the plan; returns (history, source, the data loaded)."""
    if c.get("framework"):
        from .pytorch_run import TorchRun
        data = data if data is not None else load_data(c, progress=not quiet)
        trainer = TorchRun(c, data=data, quiet=quiet)
    else:
        trainer = Trainer(c, data=data, quiet=quiet)
    data = trainer.data                      # loaded once for all runs
    if st.state == "partial":
        meta = trainer.resume(st.checkpoint)
        src = "resumed"
        _log(f"seed {seed} {kind}: resuming {st.checkpoint} at epoch {meta['epoch'] + 1}, step {meta['step']}")
    else:
        src = "trained"
        _log(f"seed {seed} {kind}: training into {st.path}")
    history = trainer.fit()
    if trainer.start_epoch >= c["epochs"]:
        trainer.write_history()              # the checkpoint was ahead of history.json
    return history, src, data


__all__ = ["run", "parse_seeds", "settings_differences", "inspect_run", "stage_label", "reuse_stages",
           "control_layers", "spread", "seed_entry", "aggregate", "format_table", "ParityError", "RESULT",
           "accuracy_curve", "time_to", "seed_targets", "time_to_targets", "aggregate_targets"]
