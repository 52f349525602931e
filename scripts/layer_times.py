"""Per-layer CPU times of a CifarNet training step: forward and backward of every layer.

    PYTHONPATH=. python scripts/layer_times.py [--data DIR] [--steps 10] [--batch 128]
        [--rows exact,default,fastest] [--threads N] [--array-code] [--weights FILE]

The rows are bench step's: exact, `make cifar`'s default setting while it reuses
(conv2 L64 H32, backward only) and the fastest (conv2 pca L64 H16, reuse forward).
The rows take turns step by step, so that a drift of the machine slows every row
alike; each time is the median over the steps after the first. The images are
CIFAR-10's first training images (a random fixture where DIR has no CIFAR-10; the
report says which). --array-code times the layers' array code (the oracle) instead
of the CPU fast path. --weights starts every row from the weights of a model.npz or
checkpoint.npz (a trained network's dY is mostly zeros, which the exact backward skips:
docs/cpu.md); without it, from CifarNet's initialisation of seed 0. Only ratios from one
run compare: the machine may drift.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minireuse import cpu  # noqa: E402
from minireuse.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from minireuse.data.sample import sample_images  # noqa: E402
from minireuse.losses import SoftmaxCrossEntropy  # noqa: E402
from minireuse.models import MODELS  # noqa: E402
from minireuse.tools.bench_step import PCA_FAST  # noqa: E402
from minireuse.training.adaptive import DEFAULT_LADDERS  # noqa: E402

ROWS = {"exact": None, "default": {name: ladder[0] for name, ladder in DEFAULT_LADDERS.items()},
        "fastest": PCA_FAST}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rows", default="exact,default,fastest")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--array-code", action="store_true")
    p.add_argument("--weights", default=None, help="model.npz or checkpoint.npz to start from")
    args = p.parse_args(argv)
    args.rows = args.rows.split(",")
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: expected names from {', '.join(ROWS)}, got {', '.join(unknown)}")
    if args.steps < 2:
        p.error(f"--steps: expected at least 2 (the first step is not counted), got {args.steps}")
    if args.batch < 1:
        p.error(f"--batch: expected at least 1, got {args.batch}")
    if args.weights is not None and not Path(args.weights).is_file():
        p.error(f"--weights: expected a model.npz or checkpoint.npz file, got {args.weights!r} (no such file)")
    return args


def main(argv=None):
    args = parse(argv)
    cpu.set_threads(args.threads)
    cpu.use_fast_path(not args.array_code)
    images, labels, source = sample_images(args.data, args.batch, 0)
    x = ((images.astype(np.float32) / 255.0 - np.asarray(CIFAR10_MEAN, np.float32))
         / np.asarray(CIFAR10_STD, np.float32)).astype(np.float32)
    models = {row: MODELS["cifarnet"](seed=0, reuse=ROWS[row]) for row in args.rows}
    if args.weights is not None:
        from minireuse.training.checkpoint import load_weights
        for model in models.values():
            load_weights(model, args.weights)
    names = [layer.name for layer in models[args.rows[0]].layers]
    times = {row: {(n, d): [] for n in names for d in ("fwd", "bwd")} | {"step": []} for row in args.rows}
    loss = SoftmaxCrossEntropy()
    for _ in range(args.steps):
        for row, model in models.items():
            t = times[row]
            start = time.perf_counter()
            h = x
            for layer in model.layers:
                t0 = time.perf_counter()
                h = layer.forward(h, True)
                t[layer.name, "fwd"].append(time.perf_counter() - t0)
            loss.forward(h, labels)
            g = loss.backward()
            for layer in reversed(model.layers):
                t0 = time.perf_counter()
                g = layer.backward(g)
                t[layer.name, "bwd"].append(time.perf_counter() - t0)
            t["step"].append(time.perf_counter() - start)

    def ms(values):
        return 1e3 * float(np.median(values[1:]))
    start = f"the weights of {args.weights}" if args.weights else "CifarNet's initialisation (seed 0)"
    print(f"{cpu.describe()}, batch {args.batch}, median of {args.steps - 1} steps after the first; {source}; {start}")
    print(f"{'layer':10s}" + "".join(f"{row + ' fwd / bwd ms':>24s}" for row in args.rows))
    print(f"{'step':10s}" + "".join(f"{ms(times[row]['step']):24.1f}" for row in args.rows))
    for n in names:
        print(f"{n:10s}" + "".join(f"{ms(times[row][n, 'fwd']):15.1f} /{ms(times[row][n, 'bwd']):7.1f}"
                                   for row in args.rows))
    return times


if __name__ == "__main__":
    main()
