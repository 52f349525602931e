"""Train one recipe twice from the same seed, exact and with deep reuse, and compare.

    python -m minireuse compare --data DIR --epochs N --reuse adaptive --out runs/cmp

writes OUT/exact/ and OUT/reuse/ (each a normal training run), OUT/compare.json and,
with matplotlib (.[plot]), the figure of both runs OUT/compare.png; prints a
side-by-side table.
"""
import os

from . import plot
from ..fileio import atomic_write_json
from ..tables import align_rows
from ..training.outdir import clear_run, refuse_existing_run
from ..training.trainer import Trainer


def summarise(history):
    """Totals of one run's history: accuracies, wall time, time in conv/dense layers, mean r_c."""
    epochs = history
    layer_names = sorted({n for e in epochs for n in e.get("layers", {})})
    per_layer = {}
    for name in layer_names:
        recs = [e["layers"][name] for e in epochs if name in e.get("layers", {})]
        r_cs = [r["r_c"] for r in recs if r.get("r_c") is not None]
        errs = [r["rel_error"] for r in recs if r.get("rel_error") is not None]
        per_layer[name] = dict(seconds=sum(r["forward_s"] + r["backward_s"] for r in recs),
                               mean_r_c=sum(r_cs) / len(r_cs) if r_cs else None,
                               reuse_epochs=sum(1 for r in recs if r.get("reuse") is not None),
                               mean_rel_error=sum(errs) / len(errs) if errs else None)
    return dict(final_test_acc=epochs[-1]["test_acc"], best_test_acc=max(e["test_acc"] for e in epochs),
                train_seconds=sum(e["seconds"] for e in epochs),
                conv_seconds=sum(v["seconds"] for k, v in per_layer.items() if k.startswith("conv")),
                layers=per_layer)


def format_table(exact, reuse, strategy):
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    def sec(v):
        return f"{v:.1f} s"
    # a reuse run that never reused compared exact with exact: its speed ratios say nothing
    ran = any(rec["reuse_epochs"] > 0 for rec in reuse["layers"].values())

    def ratio(a, b):
        return f"{a / max(b, 1e-12):.2f}x" if ran else "-"
    rows = [("", "exact", f"reuse ({strategy})", "ratio exact/reuse"),
            ("final test accuracy", pct(exact["final_test_acc"]), pct(reuse["final_test_acc"]),
             f"{100 * (reuse['final_test_acc'] - exact['final_test_acc']):+.2f} pts"),
            ("best test accuracy", pct(exact["best_test_acc"]), pct(reuse["best_test_acc"]),
             f"{100 * (reuse['best_test_acc'] - exact['best_test_acc']):+.2f} pts"),
            ("training time", sec(exact["train_seconds"]), sec(reuse["train_seconds"]),
             ratio(exact["train_seconds"], reuse["train_seconds"])),
            ("conv layers time", sec(exact["conv_seconds"]), sec(reuse["conv_seconds"]),
             ratio(exact["conv_seconds"], reuse["conv_seconds"]))]
    for name, rec in reuse["layers"].items():
        ex = exact["layers"].get(name, {})
        if rec["mean_r_c"] is None and rec["reuse_epochs"] == 0:
            continue
        rows.append((f"{name} time", sec(ex.get("seconds", 0.0)), sec(rec["seconds"]),
                     f"{ex.get('seconds', 0.0) / max(rec['seconds'], 1e-12):.2f}x"))
        rows.append((f"{name} mean r_c", "1", "-" if rec["mean_r_c"] is None else f"{rec['mean_r_c']:.4f}",
                     f"reuse in {rec['reuse_epochs']} epochs"))
        if rec["mean_rel_error"] is not None:
            rows.append((f"{name} sampled error", "0", f"{rec['mean_rel_error']:.3f}", ""))
    lines = align_rows(rows)
    if not ran:
        lines.append(f"reuse never ran: every layer of the reuse run was exact in every epoch ({strategy} "
                     "never started it), so no speed ratio is given")
    return "\n".join(lines)


def run(cfg, strategy, quiet=False, data=None, overwrite=False):
    """Train exact then with reuse; returns (exact summary, reuse summary, table text).

    Runs already in OUT/exact or OUT/reuse are refused before anything is trained, unless
    ``overwrite``."""
    out = cfg["out"]
    runs = {"exact": os.path.join(out, "exact"), "reuse": os.path.join(out, "reuse")}
    if not overwrite:
        for path in runs.values():
            refuse_existing_run(path)
    summaries = {}
    for name, reuse in (("exact", "off"), ("reuse", strategy)):
        c = dict(cfg, out=runs[name], reuse=reuse)
        if reuse == "off":
            c["reuse_layers"], c["reuse_options"] = None, None
        trainer = Trainer(c, data=data, quiet=quiet)
        if overwrite:
            clear_run(trainer.out)
        data = trainer.data      # load the data once for both runs
        summaries[name] = summarise(trainer.fit())
    table = format_table(summaries["exact"], summaries["reuse"], strategy)
    atomic_write_json(os.path.join(out, "compare.json"), dict(summaries, strategy=strategy, settings={
        k: v for k, v in cfg.items() if k not in ("reuse_layers",)}, table=table))
    try:
        figure = plot.save_figure([os.path.join(out, "exact"), os.path.join(out, "reuse")],
                                  os.path.join(out, "compare.png"))
        table += f"\nfigure: {figure}"
    except plot.PlotError as e:          # no matplotlib: the table is the result
        table += f"\nno figure: {e}"
    return summaries["exact"], summaries["reuse"], table
