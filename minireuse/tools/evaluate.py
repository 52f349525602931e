"""Deep reuse at inference: a trained model's test accuracy and speed, exact and with reuse.

    python -m minireuse evaluate --checkpoint RUN/model.npz [--reuse fixed] [--reuse-config FILE]

Runs the test set through the model exactly, then with the reuse setting of each
configured layer (``--reuse-config``: {"layers": {"conv2": {"L": 64, "H": 32}}}, one
setting per layer; default: the model's fixed settings, adaptive.model_defaults), in the
same run, and prints side by side: accuracy and loss, how many predictions differ from the
exact ones, images/s of the whole forward, and per reuse layer its forward time,
r_c and relative output error against the exact layer on the same input (every
batch is measured). ``--json FILE`` writes the report.
"""
import os
import time

import numpy as np

from .. import backend
from ..training.checkpoint import load_weights
from ..losses import SoftmaxCrossEntropy
from ..models import MODELS
from ..reuse import ReuseConfig
from ..training.adaptive import load_settings, model_defaults, stage_label
from ..tables import align_rows
from ..timing import LayerTimer


def reuse_settings(reuse, reuse_config, model="cifarnet"):
    """{layer: ReuseConfig} to evaluate with ({} for 'off'; default: the model's fixed defaults)."""
    if reuse == "off":
        if reuse_config:
            raise ValueError("--reuse-config needs --reuse fixed")
        return {}
    if reuse != "fixed":
        raise ValueError(f"evaluate takes --reuse off or fixed (one setting per layer), got {reuse!r}")
    layers = load_settings(reuse_config)[0] if reuse_config else model_defaults(model)[1]
    out = {}
    for name, setting in layers.items():
        if isinstance(setting, list):
            raise ValueError(f"layer {name}: evaluate takes one setting per layer, got a ladder of {len(setting)}")
        cfg = ReuseConfig.coerce(setting)
        if cfg.forward == "exact":
            raise ValueError(f"layer {name}: forward 'exact' reuses in the backward only; at inference it is "
                             "the exact layer")
        out[name] = cfg.replace(measure_error=False)
    return out


def run_pass(model, loss_fn, batches, labels, reuse):
    """One pass over the batches with ``reuse`` ({layer: setting}, {} = exact): metrics, predictions.

    The first batch runs once untimed with these settings (module load, calibration, hash
    parameter upload); the timed loop reads nothing back (loss and predictions stay on the
    device until it ends)."""
    layers = model.reuse_layers()
    for layer in layers:
        layer.set_reuse(reuse.get(layer.name))
    model.forward(batches[0], train=False)
    for layer in layers:
        if layer.reuse_state is not None:
            layer.reuse_state.pop_stats(train=False)
    timer = LayerTimer([l.name for l in layers])
    preds, loss_sum = [], 0.0
    backend.synchronize()
    t0 = time.perf_counter()
    for xb, yb in zip(batches, labels):
        logits = model.forward(xb, train=False, timer=timer)
        loss_sum = loss_sum + loss_fn.forward(logits, yb).astype(np.float64) * len(yb)
        preds.append(logits.argmax(axis=1))
    backend.synchronize()
    seconds = time.perf_counter() - t0
    preds = np.concatenate([backend.asnumpy(p) for p in preds])
    loss_sum = float(backend.asnumpy(loss_sum))
    y = np.concatenate([backend.asnumpy(b) for b in labels])
    times = timer.collect()
    per_layer = {}
    for layer in layers:
        s, n = times.get((layer.name, "forward"), (0.0, 0))
        rec = dict(forward_ms=1e3 * s / max(n, 1), setting=None)
        if layer.name in reuse:
            stats = layer.reuse_state.pop_stats(train=False)
            rec.update(setting=stage_label(reuse[layer.name]), r_c=stats.get("r_c"),
                       rel_error=stats.get("rel_error"), impl=stats.get("impl"))
        per_layer[layer.name] = rec
        layer.set_reuse(None)
    return dict(accuracy=float((preds == y).mean()), loss=loss_sum / len(y), seconds=seconds,
                images_per_s=len(y) / seconds if seconds > 0 else 0.0, layers=per_layer), preds


def evaluate_model(model, x_test, y_test, settings, batch_size=256, repeats=1, error_batches=8):
    """The report of an exact pass and, when ``settings`` is not empty, a reuse pass, over the
    same device batches (timed passes: the best of ``repeats``, each after one untimed warm-up
    batch with its own settings).
    The relative output error of each reuse layer comes from an untimed pass over the first
    ``error_batches`` batches with error measurement on (it computes the exact layer too)."""
    from ..data import CIFAR10_MEAN, CIFAR10_STD, BatchIterator
    it = BatchIterator(x_test, y_test, batch_size, shuffle=False, augment=False, drop_last=False,
                       mean=CIFAR10_MEAN, std=CIFAR10_STD)
    batches, labels = zip(*list(it))
    loss_fn = SoftmaxCrossEntropy()
    passes = {"exact": {}, **({"reuse": settings} if settings else {})}
    report = {}
    for name, reuse in passes.items():
        best = None
        for _ in range(max(1, repeats)):
            result, preds = run_pass(model, loss_fn, batches, labels, reuse)
            if best is None or result["seconds"] < best[0]["seconds"]:
                best = (result, preds)
        report[name] = best
    out = {k: v[0] for k, v in report.items()}
    if "reuse" in report:
        out["reuse"]["agreement"] = float((report["reuse"][1] == report["exact"][1]).mean())
        measured = {k: v.replace(measure_error=True) for k, v in settings.items()}
        n = max(1, min(error_batches, len(batches)))
        errors, _ = run_pass(model, loss_fn, batches[:n], labels[:n], measured)
        for name, rec in out["reuse"]["layers"].items():
            if rec["setting"] is not None:
                rec["rel_error"] = errors["layers"][name]["rel_error"]
                rec["error_images"] = sum(len(b) for b in labels[:n])
    return out


def format_report(report):
    ex = report["exact"]
    re_ = report.get("reuse")
    rows = [("", "exact") + (("reuse", "difference / ratio") if re_ else ())]

    def row(label, e, r=None, d=""):
        rows.append((label, e) + ((r, d) if re_ else ()))
    row("test accuracy", f"{100 * ex['accuracy']:.2f}%", re_ and f"{100 * re_['accuracy']:.2f}%",
        re_ and f"{100 * (re_['accuracy'] - ex['accuracy']):+.2f} pts")
    row("test loss", f"{ex['loss']:.4f}", re_ and f"{re_['loss']:.4f}", re_ and f"{re_['loss'] - ex['loss']:+.4f}")
    if re_:
        row("predictions as exact", "100%", f"{100 * re_['agreement']:.2f}%", "")
    row("images/s (whole forward)", f"{ex['images_per_s']:.0f}", re_ and f"{re_['images_per_s']:.0f}",
        re_ and f"{re_['images_per_s'] / ex['images_per_s']:.2f}x")
    if re_:
        for name, rec in re_["layers"].items():
            if rec["setting"] is None:
                continue
            e_ms = ex["layers"][name]["forward_ms"]
            row(f"{name} forward ms/batch", f"{e_ms:.1f}", f"{rec['forward_ms']:.1f}",
                f"{e_ms / max(rec['forward_ms'], 1e-12):.2f}x")
            row(f"{name} setting", "exact", rec["setting"], "")
            row(f"{name} r_c / output error", "1 / 0", f"{rec['r_c']:.4f} / {rec['rel_error']:.3f}", "")
    return "\n".join(align_rows([tuple("" if c is None else c for c in r) for r in rows]))


def run(a):
    """The evaluate command (see the module docstring)."""
    from .bench import git_commit
    from ..data import load_cifar10
    from ..fileio import atomic_write_json
    from ..training.outdir import check_output_file
    if a.json:
        check_output_file(a.json, "--json")
    settings = reuse_settings(a.reuse, a.reuse_config, a.model)
    backend.set_device(a.device)
    model = MODELS[a.model]()
    load_weights(model, a.checkpoint)
    for name in settings:
        model.layer(name)                         # an unknown layer name fails here, before the data
    _, _, x_test, y_test = load_cifar10(a.data, download=a.download, progress=not a.quiet)
    if a.limit_test:
        x_test, y_test = x_test[:a.limit_test], y_test[:a.limit_test]
    report = evaluate_model(model, x_test, y_test, settings, a.batch_size, a.repeats)
    report.update(checkpoint=os.path.abspath(a.checkpoint), model=a.model, test_images=len(y_test),
                  device=backend.describe_device(), commit=git_commit(),
                  batch_size=a.batch_size)
    print(format_report(report))
    if a.json:
        atomic_write_json(a.json, report)
    return 0


def add_arguments(p, positive_int):
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="RUN/model.npz or RUN/checkpoint.npz of a trained model")
    p.add_argument("--model", default="cifarnet", choices=sorted(MODELS))
    p.add_argument("--reuse", choices=["off", "fixed"], default="fixed",
                   help="off: the exact pass only; fixed: also the reuse pass")
    p.add_argument("--reuse-config", metavar="FILE", default=None,
                   help="JSON {\"layers\": {\"conv2\": {\"L\": 64, \"H\": 32}}} (one setting per layer); "
                        "default: conv2 L64 H32")
    p.add_argument("--data", default="data", help="directory holding CIFAR-10")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--limit-test", type=positive_int, default=None, help="only the first N test images")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--repeats", type=positive_int, default=1, help="timed passes each (the fastest is kept)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--json", metavar="FILE", default=None, help="write the report here")
    p.add_argument("--quiet", action="store_true")
