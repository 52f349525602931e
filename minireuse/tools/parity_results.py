"""The numbers and the printed tables of the accuracy-parity protocol (parity.py): one seed's
entry from its runs' histories, the spread across seeds, the stages each reuse layer went
through, time to accuracy (curves, targets, the seconds to reach them) and the PyTorch row."""
import json
import statistics

from ..tables import align_rows
from ..training.adaptive import stage_label
from .compare import summarise

# the default targets: each seed's exact final accuracy minus these points
TARGET_POINTS = (0.3, 1.0)
RUNS = ("exact", "reuse", "control", "pytorch")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


GRADIENT_MEASURES = ("dw_cos", "dw_gain", "dx_cos", "dx_gain")   # reuse.config.ReuseConfig.measure_error


def reuse_stages(history, layer):
    """The epochs of a run grouped by ``layer``'s reuse setting (in order of first use):
    label, setting, epochs, epoch_numbers, mean_r_c, mean_rel_error and mean_<g> for each
    gradient measure g of GRADIENT_MEASURES (means over the epochs that recorded the
    statistic; None when none did)."""
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
                        **{f"mean_{g}": _mean([r.get(g) for r in recs]) for g in GRADIENT_MEASURES}))
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
    shown = [g for g in GRADIENT_MEASURES
             if any(s.get(f"mean_{g}") is not None for p in per_seed for st in p["stages"].values() for s in st)]
    for p in per_seed:
        for n, stages in p["stages"].items():
            for s in stages:
                stage_rows.append((str(p["seed"]), n, s["label"], str(s["epochs"]), num(s["mean_r_c"], 4),
                                   num(s["mean_rel_error"], 3), *(num(s.get(f"mean_{g}"), 3) for g in shown)))
    if stage_rows:
        lines += ["", "reuse stages (epochs of the reuse run grouped by the layer's setting):"]
        lines += align_rows([("seed", "layer", "stage", "epochs", "mean r_c", "mean sampled error",
                              *(f"mean {g}" for g in shown))] + stage_rows)
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


def step_time_curve(history, steps_per_epoch, ms, reuse_ms=None):
    """accuracy_curve with the training seconds of ``steps_per_epoch`` steps of ``ms`` milliseconds
    per epoch, ``reuse_ms`` in the epochs whose record has a layer reusing (the setting at the
    epoch's end): the time of a run that shared the machine, from step times measured apart."""
    curve, before = [], 0.0
    for e in history:
        reused = reuse_ms is not None and any(rec.get("reuse") is not None for rec in e.get("layers", {}).values())
        per_epoch = steps_per_epoch * (reuse_ms if reused else ms) / 1e3
        for m in e.get("mid_evals", []):
            curve.append((m["epoch"], before + (m["epoch"] - (e["epoch"] - 1)) * per_epoch, m["test_acc"]))
        before += per_epoch
        curve.append((e["epoch"], before, e["test_acc"]))
    return curve


def time_to(curve, accuracy):
    """Training seconds at the first evaluation at or above ``accuracy``; None if never reached."""
    return next((t for _, t, a in curve if a >= accuracy - 1e-12), None)


def seed_targets(exact_final, levels=()):
    """[(label, accuracy)]: exact's final accuracy minus TARGET_POINTS, then ``levels`` (percent)."""
    return ([(f"exact - {p:g} pts", exact_final - p / 100) for p in TARGET_POINTS]
            + [(f"{v:g} %", v / 100) for v in levels])


def time_to_targets(curves, targets, reuse_ran=True):
    """Per target: its accuracy, each run's training seconds to reach it (None: not reached),
    and the ratios exact / run and pytorch / run (> 1: the run got there faster). A reuse
    run that never reused (reuse_ran False) trained exact: no ratio is given for it."""
    def ratio(base, run, secs):
        if None in (secs[base], secs[run]) or (not reuse_ran and "reuse" in (base, run)):
            return None
        return _ratio(secs[base], secs[run])
    out = []
    for label, acc in targets:
        secs = {run: time_to(c, acc) for run, c in curves.items()}
        out.append(dict(label=label, accuracy=acc, seconds=secs,
                        **{f"ratio_vs_{base}": {run: ratio(base, run, secs) for run in secs}
                           for base in ("exact", "pytorch") if base in secs}))
    return out


def aggregate_targets(per_seed):
    """Per target label (in order): per run, the seeds that reached it, the summed seconds when
    every seed did, and the ratios of those sums against exact and PyTorch."""
    labels = [t["label"] for t in per_seed[0]["time_to_targets"]] if per_seed else []
    reused = all(p.get("reuse_ran", True) for p in per_seed)

    def ratio(base, run, sums):
        if None in (sums[base], sums[run]) or (not reused and "reuse" in (base, run)):
            return None
        return _ratio(sums[base], sums[run])
    out = []
    for i, label in enumerate(labels):
        rows = [p["time_to_targets"][i]["seconds"] for p in per_seed]
        runs = [r for r in RUNS if all(r in row for row in rows)]
        sums = {r: sum(row[r] for row in rows) if all(row[r] is not None for row in rows) else None for r in runs}
        out.append(dict(label=label, reached={r: sum(row[r] is not None for row in rows) for r in runs},
                        seconds=sums, **{f"ratio_vs_{base}": {r: ratio(base, r, sums) for r in sums}
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
    ms = result.get("step_ms")
    timed = ("training seconds" if ms is None else "steps x " + ", ".join(f"{k} {v:g}" for k, v in ms.items())
             + " ms per step (--step-ms; reuse's only in the epochs where a layer reused)")
    return ["", f"time to accuracy ({timed}, to the first evaluation at or above the target, evaluation "
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


def pytorch_entry(ex, history, run):
    """A seed's PyTorch numbers: the run's summary and its difference from exact (points)."""
    pt = summarise(history)
    return dict(pytorch=pt, pytorch_run=run, pytorch_diff_pts=100 * (pt["final_test_acc"] - ex["final_test_acc"]))
