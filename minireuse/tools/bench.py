"""Layer-level benchmark: exact and deep-reuse forward/backward of CifarNet's layers.

    python -m minireuse bench layers [--layers conv1,conv2,fc3] [--L 16,64] [--H 12,20]
                              [--family offset,origin,centred,pca] [--paths pixel,general]
                              [--forward reuse,exact] [--dw-sample 0,0.125] [--weights FILE] [--json FILE]

Inputs are real CIFAR-10 images (a deterministic random fixture, said so in the
output, when the data cannot be loaded) passed through the preceding layers of a
randomly initialised CifarNet, or of a trained one (--weights RUN/model.npz):
conv1 sees the normalised images, conv2 the output of conv1 + ReLU + pool + LRN,
fc3 that of conv2 + ReLU + LRN + pool, flattened. Each mode is timed as forward
then backward of the same layer object, alternating with the exact layer (medians
after warm-up; CUDA events on the GPU); a mode's speed-ups are ratios against
those paired exact runs.
rel_error = ||y - y_exact|| / ||y_exact|| (0 with --forward exact, which times
reuse in the backward only).
"""
import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from .. import backend
from ..training.checkpoint import load_weights
from ..data.sample import sample_images
from ..tables import align_rows
from ..timing import timed

LAYERS = ("conv1", "conv2", "fc3")   # CifarNet's layers benchmarked by default


def default_L(c_in):
    """Sub-vector lengths tried by default: 3, 15 for a 3-channel input (a pixel, or 5 of its
    5x5 patch columns), else 16, 64 (CifarNet: conv1 K = 75, conv2 K = 1600, fc3 K = 4096)."""
    return [3, 15] if c_in == 3 else [16, 64]


def comma_list(kind):
    def parse(s):
        try:
            return [kind(v) for v in s.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {s!r}")
    return parse


def add_arguments(parser):
    parser.add_argument("--model", default="cifarnet", choices=["alexnet", "cifarnet", "vgg19"],
                        help="whose layers, on the real activations of a randomly initialised model "
                             "(or of a trained one: --weights)")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="the model's parameters from a model.npz or checkpoint.npz (a trained "
                             "model's activations are far less isotropic than a random one's)")
    parser.add_argument("--layers", type=comma_list(str), default=None,
                        help=f"comma-separated layer names (default: {','.join(LAYERS)} for cifarnet, every "
                             "conv layer for the other models)")
    parser.add_argument("--L", type=comma_list(int), default=None,
                        help="sub-vector lengths (default per layer: 3,15 for 3 input channels, else 16,64)")
    parser.add_argument("--H", type=comma_list(int), default=[12, 20],
                        help="hash bits, 1..64 (default 12,20)")
    parser.add_argument("--family", type=comma_list(str), default=["offset", "origin"],
                        help="hash families: offset, origin, centred and/or pca (default offset,origin)")
    parser.add_argument("--paths", type=comma_list(str), default=["pixel", "general"],
                        help="conv paths: pixel (pixel-aligned, when L divides c_in) and/or general")
    parser.add_argument("--dx-mode", type=comma_list(str), default=["cluster"], help="exact and/or cluster")
    parser.add_argument("--forward", type=comma_list(str), default=["reuse"],
                        help="reuse (default) and/or exact (exact forward, reuse in the backward only)")
    parser.add_argument("--dw-sample", type=comma_list(float), default=[0.0],
                        help="fractions of rows whose residuals correct dW (ReuseConfig.dw_sample; default 0)")
    parser.add_argument("--impl", default="auto", choices=["auto", "reference", "cuda"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--data", default="data", help="directory with CIFAR-10 (cifar-10-batches-py/)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- inputs

def load_images(data_dir, batch, seed):
    """(uint8 NHWC images, a line saying where they came from)."""
    images, _, source = sample_images(data_dir, batch, seed)
    return images, source


def build_model(name, seed):
    from ..models import MODELS
    return MODELS[name](seed=seed)


def default_layers(model_name, model):
    """CifarNet's conv1, conv2, fc3; every conv layer of the other models."""
    if model_name == "cifarnet":
        return list(LAYERS)
    return [l.name for l in model.layers if type(l).__name__ == "Conv2D"]


def layer_inputs(images, layers, seed, model=None):
    """{name: (layer, its input)} for a randomly initialised model (CifarNet by default)."""
    from ..data import CIFAR10_MEAN, CIFAR10_STD, normalize
    model = model if model is not None else build_model("cifarnet", seed)
    x = normalize(backend.to_device(images), CIFAR10_MEAN, CIFAR10_STD)
    return {name: (model.layer(name), model.input_of(name, x)) for name in layers}


def modes(name, layer, args):
    """[(label, reuse config dict or None)] for one layer: exact first, then the grid."""
    from ..reuse import ReuseConfig
    c_in = getattr(layer, "c_in", None)
    grid = [("exact", None)]
    for L in args.L or default_L(c_in):
        for path in args.paths if c_in is not None else ["general"]:
            if path == "pixel" and c_in % L:
                continue
            for H, family, dx_mode, forward, dw_sample in itertools.product(
                    args.H, args.family, args.dx_mode, args.forward, args.dw_sample):
                cfg = dict(L=L, H=H, family=family, dx_mode=dx_mode, forward=forward, impl=args.impl,
                           pixel_aligned=(path == "pixel"), seed=args.seed, dw_sample=dw_sample)
                ReuseConfig.coerce(cfg)  # validate before timing anything
                grid.append((mode_label(path, cfg), cfg))
    return grid


def mode_label(path, cfg):
    """'pixel L=16 H=12 offset dx=cluster', plus 'forward=exact' and 'dw_sample=p' where not the default."""
    label = f"{path} L={cfg['L']} H={cfg['H']} {cfg['family']} dx={cfg['dx_mode']}"
    if cfg["forward"] != "reuse":
        label += f" forward={cfg['forward']}"
    if cfg.get("dw_sample", 0):
        label += f" dw_sample={cfg['dw_sample']:g}"
    return label


# ---------------------------------------------------------------- timing

def time_once(layer, x, dy):
    """(forward ms, backward ms, output) of one training step of the layer."""
    tf, y = timed(lambda: layer.forward(x, train=True))
    tb, _ = timed(lambda: layer.backward(dy))
    return tf, tb, y


def time_modes(layer, x, dy, cfg, repeats, warmup):
    """Medians {'reuse', 'exact': (fwd ms, bwd ms)} of setting cfg and the exact layer; last outputs.

    The two are timed alternately, so a change of load on a shared machine
    touches both sides of each speed-up alike.
    """
    sides = [("reuse", cfg), ("exact", None)] if cfg is not None else [("exact", None)]
    times = {side: ([], []) for side, _ in sides}
    outputs = {}
    for i in range(warmup + repeats):
        for side, setting in sides:
            layer.set_reuse(setting)
            tf, tb, outputs[side] = time_once(layer, x, dy)
            if i >= warmup:
                times[side][0].append(tf)
                times[side][1].append(tb)
    medians = {side: (float(np.median(f)), float(np.median(b))) for side, (f, b) in times.items()}
    return medians, outputs


def bench_layer(name, layer, x, grid, args, progress):
    """One row per mode of grid (exact first); speed-ups against the exact runs paired with it."""
    xp = backend.get_array_module(x)
    layer.set_reuse(None)
    y_exact = layer.forward(x, train=False)
    dy = xp.asarray(np.random.default_rng(args.seed).standard_normal(y_exact.shape), dtype=y_exact.dtype)
    rows = []
    for label, cfg in grid:
        if cfg is None:
            medians, _ = time_modes(layer, x, dy, None, args.repeats, args.warmup)
            medians["reuse"] = medians["exact"]
            row = dict(impl=("numpy" if xp is np else "cupy") + "-exact", r_c=1.0, rel_error=0.0)
        else:
            medians, outputs = time_modes(layer, x, dy, cfg, args.repeats, args.warmup)
            layer.set_reuse(cfg)
            last = layer.reuse_state.last
            y = outputs["reuse"]
            row = dict(impl=last["impl"], r_c=float(backend.asnumpy(last["r_c"])),
                       rel_error=float(xp.linalg.norm(y - y_exact) / xp.linalg.norm(y_exact)), config=cfg)
            layer.reuse_state.pop_stats()
        (fwd, bwd), (exact_fwd, exact_bwd) = medians["reuse"], medians["exact"]
        row.update(layer=name, mode=label, fwd_ms=fwd, bwd_ms=bwd, total_ms=fwd + bwd,
                   exact_fwd_ms=exact_fwd, exact_bwd_ms=exact_bwd,
                   speedup_fwd=exact_fwd / fwd, speedup_bwd=exact_bwd / bwd,
                   speedup_total=(exact_fwd + exact_bwd) / (fwd + bwd))
        rows.append(row)
        progress.update(1)
    layer.set_reuse(None)
    return rows


# ---------------------------------------------------------------- report

def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def format_table(rows):
    head = ["layer", "mode", "impl", "fwd ms", "bwd ms", "total ms", "x fwd", "x bwd", "x total", "r_c",
            "rel err"]
    body = [[r["layer"], r["mode"], r["impl"], f"{r['fwd_ms']:.1f}", f"{r['bwd_ms']:.1f}",
             f"{r['total_ms']:.1f}", f"{r['speedup_fwd']:.2f}", f"{r['speedup_bwd']:.2f}", f"{r['speedup_total']:.2f}",
             f"{r['r_c']:.4f}", f"{r['rel_error']:.3f}"] for r in rows]
    return "\n".join(align_rows([head] + body, right_from=3))


def run_layer_bench(args):
    """Run the grid; returns the report dict (device, commit, data, rows)."""
    from tqdm import tqdm
    backend.set_device(args.device)
    model_name = getattr(args, "model", "cifarnet")
    model = build_model(model_name, args.seed)
    weights = getattr(args, "weights", None)
    if weights:
        load_weights(model, weights)
    names = [l.name for l in model.reuse_layers()]
    layers = args.layers or default_layers(model_name, model)
    unknown = sorted(set(layers) - set(names))
    if unknown:
        raise ValueError(f"--layers: unknown {unknown}; {model_name}'s conv/dense layers are {names}")
    images, source = load_images(args.data, args.batch, args.seed)
    inputs = layer_inputs(images, layers, args.seed, model)
    grids = {name: modes(name, layer, args) for name, (layer, _) in inputs.items()}
    rows = []
    with tqdm(total=sum(len(g) for g in grids.values()), disable=args.quiet, file=sys.stderr,
              desc="bench") as progress:
        for name, (layer, x) in inputs.items():
            rows += bench_layer(name, layer, x, grids[name], args, progress)
    return dict(device=backend.describe_device(), commit=git_commit(), data=source, batch=args.batch,
                repeats=args.repeats, warmup=args.warmup, model=model_name, weights=weights, rows=rows)


def run(args):
    report = run_layer_bench(args)
    print(f"device: {report['device']}; commit: {report['commit']}; batch {report['batch']}; "
          f"medians of {report['repeats']} after {report['warmup']} warm-up")
    print(f"inputs: {report['data']}" + (f"; weights: {report['weights']}" if report.get("weights") else ""))
    print(format_table(report["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minireuse.tools.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
