"""Figures of training runs: python -m minireuse plot RUN [RUN ...] [-o FILE.png]

One figure from the history.json of each run, runs in the same colour on every
panel: test accuracy (solid) and train accuracy (dashed) per epoch; test and
train loss; per reuse layer, the mean r_c and the sampled relative error per
epoch, with the epochs where the strategy changed stage marked; seconds per epoch.
compare writes the same figure for its two runs beside compare.json.

Matplotlib is an optional extra (``pip install -e '.[plot]'``), imported only
here, with the non-interactive Agg backend (works without a display).
"""
import json
import os

from ..training.outdir import check_output_file

INSTALL = "pip install -e '.[plot]' (or pip install matplotlib)"


class PlotError(ValueError):
    """A figure cannot be made (no matplotlib, a run without history)."""


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError(f"plot needs matplotlib, which is not installed: {INSTALL}") from e
    return plt


def read_history(run):
    """(label, epochs) of a run directory (or its history.json)."""
    path = os.path.join(run, "history.json") if os.path.isdir(run) else run
    if not os.path.exists(path):
        raise PlotError(f"{path} does not exist: no history.json (no epoch finished yet?)")
    try:
        with open(path) as f:
            data = json.load(f)
        epochs = data["epochs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlotError(f"{path}: not a training history (expected the history.json that train writes)") from e
    if not epochs:
        raise PlotError(f"{path}: the run has no finished epoch yet")
    parts = os.path.normpath(os.path.dirname(os.path.abspath(path))).split(os.sep)
    return "/".join(p for p in parts[-2:] if p), epochs


def _layer_series(epochs, key):
    """{layer: ([epoch], [value])} of a per-layer statistic where it was recorded."""
    out = {}
    for e in epochs:
        for name, rec in e.get("layers", {}).items():
            v = rec.get(key)
            if v is not None and rec.get("reuse") is not None:
                xs, ys = out.setdefault(name, ([], []))
                xs.append(e["epoch"])
                ys.append(v)
    return out


def figure(runs):
    """A matplotlib Figure of the runs [(label, epochs)]."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (acc, loss, secs), (rc, err, harm) = axes
    for i, (label, epochs) in enumerate(runs):
        colour = f"C{i % 10}"
        ep = [e["epoch"] for e in epochs]
        point = "o" if len(ep) == 1 else None          # a line of one epoch would not show
        acc.plot(ep, [100 * e["test_acc"] for e in epochs], color=colour, marker=point, label=f"{label} test")
        acc.plot(ep, [100 * e["train_acc"] for e in epochs], color=colour, ls="--", marker=point,
                 label=f"{label} train")
        loss.plot(ep, [e["test_loss"] for e in epochs], color=colour, marker=point, label=f"{label} test")
        loss.plot(ep, [e["train_loss"] for e in epochs], color=colour, ls="--", marker=point,
                  label=f"{label} train")
        secs.plot(ep, [e["seconds"] for e in epochs], color=colour, marker="o", label=label)
        for ax, key, style in ((rc, "r_c", "-"), (err, "rel_error", "-"), (err, "dw_cos", "--")):
            for j, (name, (xs, ys)) in enumerate(sorted(_layer_series(epochs, key).items())):
                if key == "dw_cos":
                    ys = [1.0 - v for v in ys]
                ax.plot(xs, ys, color=colour, ls=style, marker="os^v"[j % 4],
                        label=f"{label} {name}" + (" 1 - dW cos" if key == "dw_cos" else ""))
        changes = sorted({ev["epoch"] for e in epochs for ev in e.get("reuse_events", []) if "epoch" in ev})
        for ax in (acc, rc, err):
            for x in changes:
                ax.axvline(x, color=colour, ls=":", lw=1)
        hs = [(e["epoch"], 100 * e["reuse_harm"]) for e in epochs if e.get("reuse_harm") is not None]
        if hs:
            harm.plot(*zip(*hs), color=colour, marker="o", label=label)
    titles = [(acc, "accuracy (%): test solid, train dashed; stage changes dotted"),
              (loss, "loss: test solid, train dashed"), (secs, "seconds per epoch"),
              (rc, "reuse layers: mean r_c per epoch"), (err, "reuse layers: sampled output error (solid), 1 - dW cosine (dashed)"),
              (harm, "harm probe: reuse loss / exact loss - 1 (%)")]
    for ax, title in titles:
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=7)
        elif ax in (rc, err, harm):
            ax.text(0.5, 0.5, "no reuse recorded in these runs", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return fig


def save_figure(run_dirs, path, labels=None):
    """Write the figure of the runs in run_dirs to path (PNG); returns path.

    labels: one per run (default: the last two parts of each run's directory)."""
    runs = [read_history(r) for r in run_dirs]
    if labels is not None:
        if len(labels) != len(runs):
            raise PlotError(f"--labels: expected {len(runs)} labels (one per run), got {len(labels)}")
        runs = [(label, epochs) for label, (_, epochs) in zip(labels, runs)]
    fig = figure(runs)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def accuracy_time_figure(panels):
    """A matplotlib Figure of time to accuracy: per panel (title, {run: [(epoch, training
    seconds, test accuracy)]}, [(target label, accuracy)]), test accuracy against cumulative
    training seconds for every run, the targets as dotted horizontal lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, curves, targets) in zip(axes[0], panels):
        for i, (run, curve) in enumerate(curves.items()):
            _, secs, accs = zip(*curve)
            ax.plot(secs, [100 * a for a in accs], color=f"C{i % 10}", marker="o", ms=3, label=run)
        for label, acc in targets:
            ax.axhline(100 * acc, color="grey", ls=":", lw=1)
            ax.annotate(label, (0, 100 * acc), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        va="bottom")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_accuracy_time_figure(panels, path):
    """Write accuracy_time_figure(panels) to path (PNG); returns path."""
    fig = accuracy_time_figure(panels)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def run(a):
    """The plot command."""
    out = a.output or os.path.join(a.runs[0] if os.path.isdir(a.runs[0]) else os.path.dirname(a.runs[0]),
                                   "history.png")
    check_output_file(out, "-o")
    print(save_figure(a.runs, out, a.labels.split(",") if a.labels else None))
    return 0


def add_arguments(p):
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or their history.json)")
    p.add_argument("-o", "--output", metavar="FILE.png", default=None,
                   help="where to write the figure (default: the first run's history.png)")
    p.add_argument("--labels", default=None, help="comma-separated names of the runs, in order")
