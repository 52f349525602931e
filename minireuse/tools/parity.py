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
the layer's setting) with their mean r_c, sampled relative error (and dw_cos when
recorded); across seeds the mean, sample standard deviation, min and max of the
differences, the mean accuracies, and the time ratios of the summed seconds.

Time to accuracy: every run's test accuracy at each evaluation (every epoch's end,
and every ``--eval-every`` of an epoch) against its cumulative training seconds
(evaluation excluded) is in parity.json (``curves``), with the training seconds each
run took to reach each target: per seed its exact run's final accuracy minus 0.3 and
minus 1.0 points, and the levels of ``--targets`` (percent); across seeds, the runs that
reached it and the ratio of summed seconds against exact and against PyTorch. The
figure OUT/time_to_accuracy.png (matplotlib, the plot extra) draws those curves, one
panel per seed.

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
import statistics
import sys

from ..training.checkpoint import TrainingError, read_checkpoint
from .compare import summarise
from ..tables import align_rows
from ..training.adaptive import resolved_layers, stage_label
from ..fileio import atomic_write_json
from ..training.batches import load_data
from ..training.outdir import CHECKPOINT, HISTORY
from ..training.trainer import Trainer

RESULT = "parity.json"
FIGURE = "time_to_accuracy.png"
# where and how a run ran, or when it was evaluated: not what it computed
IGNORED_SETTINGS = frozenset({"out", "data", "download", "device", "graph", "log_every", "quiet", "eval_every"})
# the default targets: each seed's exact final accuracy minus these points
TARGET_POINTS = (0.3, 1.0)
RUNS = ("exact", "reuse", "control", "pytorch")
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


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def reuse_stages(history, layer):
    """The epochs of a run grouped by ``layer``'s reuse setting (in order of first use):
    label, setting, epochs, epoch_numbers, mean_r_c, mean_rel_error, mean_dw_cos
    (means over the epochs that recorded the statistic; None when none did)."""
    groups = {}
    for e in history:
        rec = e.get("layers", {}).get(layer)
        if rec is None:
            continue
        setting = rec.get("reuse")
        g = groups.setdefault(json.dumps(setting, sort_keys=True),
                              dict(label=stage_label(setting), setting=setting, epoch_numbers=[], recs=[]))
        g["epoch_numbers"].append(e.get("epoch"))
        g["recs"].append(rec)
    out = []
    for g in groups.values():
        recs = g.pop("recs")
        out.append(dict(g, epochs=len(recs), mean_r_c=_mean([r.get("r_c") for r in recs]),
                        mean_rel_error=_mean([r.get("rel_error") for r in recs]),
                        mean_dw_cos=_mean([r.get("dw_cos") for r in recs])))
    return out


def spread(values):
    """mean, sample standard deviation (n - 1; 0 for one value), min and max."""
    values = list(values)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values))


def _ratio(a, b):
    return a / b if b > 0 else None


def _seconds(exact_s, reuse_s):
    return dict(exact_seconds=exact_s, reuse_seconds=reuse_s, ratio=_ratio(exact_s, reuse_s))


def control_layers(layers):
    """The control's settings from resolved reuse layers ({name: setting or [settings]}): per
    layer its first setting with the exact gradients (forward and dX exact, dW corrected by
    every residual), as a one-stage ladder."""
    out = {}
    for name, stages in (layers or {}).items():
        first = stages[0] if isinstance(stages, list) else stages
        out[name] = [dict(first, forward="exact", dx_mode="exact", dw_sample=1.0, enabled=True)]
    return out


def seed_entry(seed, exact_history, reuse_history, exact_run, reuse_run, control_history=None,
               control_run=None):
    """One seed's numbers from the runs' histories (see the module docstring)."""
    ex, re_ = summarise(exact_history), summarise(reuse_history)
    layers = [n for n, rec in re_["layers"].items() if rec["reuse_epochs"] > 0]
    layer_times = {n: _seconds(ex["layers"].get(n, {}).get("seconds", 0.0), re_["layers"][n]["seconds"])
                   for n in layers}
    return dict(seed=seed, exact_run=exact_run, reuse_run=reuse_run, exact=ex, reuse=re_,
                diff_final_pts=100 * (re_["final_test_acc"] - ex["final_test_acc"]),
                diff_best_pts=100 * (re_["best_test_acc"] - ex["best_test_acc"]),
                # a reuse run that never reused is exact: no ratio of exact with exact
                time_ratio=_ratio(ex["train_seconds"], re_["train_seconds"]) if layers else None,
                reuse_ran=bool(layers),
                reuse_layers=layer_times,
                stages={n: reuse_stages(reuse_history, n) for n in layers},
                **(control_entry(ex, re_, summarise(control_history), control_run)
                   if control_history is not None else {}))


def control_entry(ex, re_, co, control_run):
    """A seed's control numbers: the control run's summary and its differences (points)."""
    return dict(control=co, control_run=control_run,
                control_diff_pts=100 * (co["final_test_acc"] - ex["final_test_acc"]),
                reuse_vs_control_pts=100 * (re_["final_test_acc"] - co["final_test_acc"]))


def aggregate(per_seed):
    """Across seeds: spread of the differences, mean accuracies, ratios of summed seconds."""
    def total(run, key):
        return sum(p[run][key] for p in per_seed)
    layers = sorted({n for p in per_seed for n in p["reuse_layers"]})
    layer_totals = {n: _seconds(*(sum(p[run]["layers"].get(n, {}).get("seconds", 0.0) for p in per_seed)
                                  for run in ("exact", "reuse")))
                    for n in layers}
    k = len(per_seed)
    control = {}
    if per_seed and all("control" in p for p in per_seed):
        control = dict(control_diff_pts=spread(p["control_diff_pts"] for p in per_seed),
                       reuse_vs_control_pts=spread(p["reuse_vs_control_pts"] for p in per_seed),
                       mean_control_final_acc=sum(p["control"]["final_test_acc"] for p in per_seed) / k)
    return dict(n_seeds=k, **control,
                diff_final_pts=spread(p["diff_final_pts"] for p in per_seed),
                diff_best_pts=spread(p["diff_best_pts"] for p in per_seed),
                mean_exact_final_acc=total("exact", "final_test_acc") / k,
                mean_reuse_final_acc=total("reuse", "final_test_acc") / k,
                mean_exact_best_acc=total("exact", "best_test_acc") / k,
                mean_reuse_best_acc=total("reuse", "best_test_acc") / k,
                train_seconds=dict(exact=total("exact", "train_seconds"), reuse=total("reuse", "train_seconds"),
                                   ratio=_ratio(total("exact", "train_seconds"), total("reuse", "train_seconds"))
                                   if all(p.get("reuse_ran", True) for p in per_seed) else None),
                layers=layer_totals)


def format_table(result):
    """The printed report: header, one row per seed, mean/spread rows, then the reuse stages."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    def pts(v):
        return f"{v:+.2f}"

    def sec(v):
        return f"{v:.1f} s"

    def ratio(v):
        return "-" if v is None else f"{v:.2f}x"

    def num(v, digits):
        return "-" if v is None else f"{v:.{digits}f}"
    per_seed, agg = result["per_seed"], result["aggregate"]
    layers = sorted(agg["layers"])
    n_test = result["test_images"]
    test = ("unknown (data not loaded)" if n_test is None else str(n_test)) + \
        (f" (--limit-test {result['limit_test']})" if result["limit_test"] else " (whole test set)")
    k, n_ep = agg["n_seeds"], result["epochs"]
    head = [f"parity: exact vs reuse ({result['strategy']}), {k} seed{'s' if k != 1 else ''} "
            f"({', '.join(str(s) for s in result['seeds'])}), {n_ep} epoch{'s' if n_ep != 1 else ''} each; "
            f"test images: {test}"]
    if result["exact_from"]:
        head.append(f"exact runs from {result['exact_from']}")
    rows = [("seed", "exact final", "reuse final", "diff final", "exact best", "reuse best", "diff best",
             "exact time", "reuse time", "time exact/reuse", *(f"{n} exact/reuse" for n in layers),
             "runs exact/reuse")]
    for p in per_seed:
        rows.append((str(p["seed"]), pct(p["exact"]["final_test_acc"]), pct(p["reuse"]["final_test_acc"]),
                     pts(p["diff_final_pts"]) + " pts", pct(p["exact"]["best_test_acc"]),
                     pct(p["reuse"]["best_test_acc"]), pts(p["diff_best_pts"]) + " pts",
                     sec(p["exact"]["train_seconds"]), sec(p["reuse"]["train_seconds"]), ratio(p["time_ratio"]),
                     *(ratio(p["reuse_layers"][n]["ratio"]) if n in p["reuse_layers"] else "-" for n in layers),
                     f"{p['exact_run']['source']}/{p['reuse_run']['source']}"))
    df, db, ts = agg["diff_final_pts"], agg["diff_best_pts"], agg["train_seconds"]
    rows.append(("mean +- std", pct(agg["mean_exact_final_acc"]), pct(agg["mean_reuse_final_acc"]),
                 f"{pts(df['mean'])} +- {df['std']:.2f}", pct(agg["mean_exact_best_acc"]),
                 pct(agg["mean_reuse_best_acc"]), f"{pts(db['mean'])} +- {db['std']:.2f}",
                 "sum " + sec(ts["exact"]), "sum " + sec(ts["reuse"]), ratio(ts["ratio"]) + " (sums)",
                 *(ratio(agg["layers"][n]["ratio"]) + " (sums)" for n in layers), ""))
    rows.append(("min / max", "", "", f"{pts(df['min'])} / {pts(df['max'])}", "", "",
                 f"{pts(db['min'])} / {pts(db['max'])}", "", "", "", *("" for _ in layers), ""))
    lines = head + [""] + align_rows(rows)
    if "control_diff_pts" in agg:
        crows = [("seed", "control final", "control - exact", "reuse - control", "run")]
        for p in per_seed:
            crows.append((str(p["seed"]), pct(p["control"]["final_test_acc"]),
                          pts(p["control_diff_pts"]) + " pts", pts(p["reuse_vs_control_pts"]) + " pts",
                          p["control_run"]["source"]))
        cd, rc = agg["control_diff_pts"], agg["reuse_vs_control_pts"]
        crows.append(("mean +- std", pct(agg["mean_control_final_acc"]), f"{pts(cd['mean'])} +- {cd['std']:.2f}",
                      f"{pts(rc['mean'])} +- {rc['std']:.2f}", ""))
        crows.append(("min / max", "", f"{pts(cd['min'])} / {pts(cd['max'])}",
                      f"{pts(rc['min'])} / {pts(rc['max'])}", ""))
        lines += ["", "control (exact gradients through the reuse code: the noise floor of a difference):"]
        lines += align_rows(crows)
    stage_rows = []
    with_cos = any(s["mean_dw_cos"] is not None for p in per_seed for st in p["stages"].values() for s in st)
    for p in per_seed:
        for n, stages in p["stages"].items():
            for s in stages:
                stage_rows.append((str(p["seed"]), n, s["label"], str(s["epochs"]), num(s["mean_r_c"], 4),
                                   num(s["mean_rel_error"], 3), *((num(s["mean_dw_cos"], 3),) if with_cos else ())))
    if stage_rows:
        lines += ["", "reuse stages (epochs of the reuse run grouped by the layer's setting):"]
        lines += align_rows([("seed", "layer", "stage", "epochs", "mean r_c", "mean sampled error",
                          *(("mean dw_cos",) if with_cos else ()))] + stage_rows)
    idle = [str(p["seed"]) for p in per_seed if not p.get("reuse_ran", True)]
    if idle:
        lines += ["", f"reuse never ran in seed{'s' if len(idle) > 1 else ''} {', '.join(idle)}: every layer of "
                  "the reuse run was exact in every epoch, so no time ratio is given for it"]
    lines += ["", "diff = reuse - exact in accuracy points; time = training seconds (layers: forward + "
              "backward) summed over epochs, ratios > 1 mean reuse was faster"]
    return "\n".join(lines)


def accuracy_curve(history):
    """[(epoch position, training seconds so far, test accuracy)] at every evaluation of a run,
    in order: the mid-epoch ones (eval_every) and each epoch's end; evaluation time excluded."""
    curve, before = [], 0.0
    for e in history:
        for m in e.get("mid_evals", []):
            curve.append((m["epoch"], before + m["seconds"], m["test_acc"]))
        before += e["seconds"]
        curve.append((e["epoch"], before, e["test_acc"]))
    return curve


def time_to(curve, accuracy):
    """Training seconds at the first evaluation at or above ``accuracy``; None if never reached."""
    return next((t for _, t, a in curve if a >= accuracy - 1e-12), None)


def seed_targets(exact_final, levels=()):
    """[(label, accuracy)]: exact's final accuracy minus TARGET_POINTS, then ``levels`` (percent)."""
    return ([(f"exact - {p:g} pts", exact_final - p / 100) for p in TARGET_POINTS]
            + [(f"{v:g} %", v / 100) for v in levels])


def time_to_targets(curves, targets):
    """Per target: its accuracy, each run's training seconds to reach it (None: not reached),
    and the ratios exact / run and pytorch / run (> 1: the run got there faster)."""
    out = []
    for label, acc in targets:
        secs = {run: time_to(c, acc) for run, c in curves.items()}
        out.append(dict(label=label, accuracy=acc, seconds=secs,
                        **{f"ratio_vs_{base}": {run: _ratio(secs[base], t) if None not in (secs[base], t) else None
                                                for run, t in secs.items()}
                           for base in ("exact", "pytorch") if base in secs}))
    return out


def aggregate_targets(per_seed):
    """Per target label (in order): per run, the seeds that reached it, the summed seconds when
    every seed did, and the ratios of those sums against exact and PyTorch."""
    labels = [t["label"] for t in per_seed[0]["time_to_targets"]] if per_seed else []
    out = []
    for i, label in enumerate(labels):
        rows = [p["time_to_targets"][i]["seconds"] for p in per_seed]
        runs = [r for r in RUNS if all(r in row for row in rows)]
        sums = {r: sum(row[r] for row in rows) if all(row[r] is not None for row in rows) else None for r in runs}
        out.append(dict(label=label, reached={r: sum(row[r] is not None for row in rows) for r in runs},
                        seconds=sums, **{f"ratio_vs_{base}": {r: _ratio(sums[base], t) if None not in (sums[base], t)
                                                              else None for r, t in sums.items()}
                                         for base in ("exact", "pytorch") if base in sums}))
    return out


def format_targets(result):
    """The time-to-accuracy block of the table: per seed and target, each run's seconds (and the
    ratio exact / run), then the sums over seeds."""
    per_seed = result["per_seed"]
    if not per_seed:
        return []
    runs = [r for r in RUNS if any(r in p["curves"] for p in per_seed)]

    def cell(t, ratio):
        if t is False:
            return "-"
        if t is None:
            return "not reached"
        return f"{t:.1f} s" + ("" if ratio is None else f" ({ratio:.2f}x)")
    rows = [("seed", "target", *runs)]
    for p in per_seed:
        for t in p["time_to_targets"]:
            rows.append((str(p["seed"]), f"{t['label']} ({100 * t['accuracy']:.2f}%)",
                         *(cell(t["seconds"].get(r, False), None if r == "exact" else t["ratio_vs_exact"].get(r))
                           for r in runs)))
    k = len(per_seed)
    for t in result["aggregate"]["time_to_targets"]:
        rows.append(("sum", t["label"], *(cell(False, None) if r not in t["reached"] else
                                          cell(t["seconds"][r], None if r == "exact" else t["ratio_vs_exact"][r])
                                          if t["reached"][r] == k else f"reached in {t['reached'][r]} of {k}"
                                          for r in runs)))
    return ["", "time to accuracy (training seconds to the first evaluation at or above the target, evaluation "
            "excluded; (x) = exact's seconds / the run's, > 1: faster than exact):"] + align_rows(rows)


def format_pytorch(result):
    """The PyTorch rows of the table (or the reason they were skipped)."""
    if result["pytorch"] is None:
        return []
    if result["pytorch"].get("skipped"):
        return ["", f"pytorch: skipped: {result['pytorch']['skipped']}"]
    rows = [("seed", "pytorch final", "pytorch best", "pytorch - exact", "pytorch time", "time pytorch/exact",
             "time pytorch/reuse", "run")]
    for p in result["per_seed"]:
        if "pytorch" in p:
            pt = p["pytorch"]
            rows.append((str(p["seed"]), f"{100 * pt['final_test_acc']:.2f}%", f"{100 * pt['best_test_acc']:.2f}%",
                         f"{p['pytorch_diff_pts']:+.2f} pts", f"{pt['train_seconds']:.1f} s",
                         f"{_ratio(pt['train_seconds'], p['exact']['train_seconds']):.2f}x",
                         f"{_ratio(pt['train_seconds'], p['reuse']['train_seconds']):.2f}x", p["pytorch_run"]["source"]))
    return ["", "the same recipe in PyTorch (same weights, batches, dropout masks and updates):"] + align_rows(rows)


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


def _count_test_images(cfg):
    """Test images the runs were evaluated on, when no run had to load the data: read
    the data (no download); None if they are not there."""
    from ..data import CorruptDataError, DataNotFoundError, load_cifar10
    try:
        n = len(load_cifar10(cfg["data"], download=False, progress=False)[2])
    except (DataNotFoundError, CorruptDataError):
        return None
    return min(n, cfg["limit_test"]) if cfg.get("limit_test") else n


def run(cfg, seeds, exact_from=None, quiet=False, data=None, control=False, targets=(), pytorch=None):
    """The protocol for a train config (its "reuse" the strategy, "out" the parity
    directory; any "seed" is replaced by each of ``seeds``). Returns the parity.json dict
    (its "table" the printed report). Every run directory is checked before anything is
    trained. control: also train each seed's control run; targets: accuracy levels in
    percent for the time to accuracy; pytorch: the seeds that get a PyTorch run (True:
    all) (module docstring)."""
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

    per_seed = []
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
        curves = {kind: accuracy_curve(h) for kind, (h, _) in got.items()}
        entry.update(curves=curves, time_to_targets=time_to_targets(
            curves, seed_targets(entry["exact"]["final_test_acc"], targets)))
        per_seed.append(entry)

    n_test = len(data[2]) if data is not None else _count_test_images(base)
    result = dict(strategy=strategy, seeds=seeds, epochs=base["epochs"], test_images=n_test,
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


def pytorch_entry(ex, history, run):
    """A seed's PyTorch numbers: the run's summary and its difference from exact (points)."""
    pt = summarise(history)
    return dict(pytorch=pt, pytorch_run=run, pytorch_diff_pts=100 * (pt["final_test_acc"] - ex["final_test_acc"]))


__all__ = ["run", "parse_seeds", "settings_differences", "inspect_run", "stage_label", "reuse_stages",
           "control_layers", "spread", "seed_entry", "aggregate", "format_table", "ParityError", "RESULT",
           "accuracy_curve", "time_to", "seed_targets", "time_to_targets", "aggregate_targets"]
