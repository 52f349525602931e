"""What the training and command-line tests share: a learnable data set and a short CPU
configuration for a Trainer, a train command on the small CIFAR-10 fixture (conftest's
``data``), the command line run in a fresh interpreter, a model's parameters."""
import json
import os
import subprocess
import sys

import numpy as np

from minireuse import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def learnable_data(n_train=192, n_test=64, seed=0):
    """Images whose class sets a colour tint and a bright quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 4, size=n)
        x = rng.integers(0, 80, size=(n, 32, 32, 3))
        for k in range(4):
            r, c = divmod(k, 2)
            x[y == k, 16 * r:16 * r + 16, 16 * c:16 * c + 16, k % 3] += 170
        return x.astype(np.uint8), y.astype(np.int64)
    return make(n_train) + make(n_test)


def config(tmp_path, **kw):
    cfg = dict(epochs=2, batch_size=32, lr=0.02, warmup_epochs=0.0, device="cpu", out=str(tmp_path / "run"),
               augment=True, log_every=2)
    cfg.update(kw)
    return cfg


def params(model):
    return {k: backend.asnumpy(l.params[n]).copy() for k, l, n in model.named_parameters()}


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "minireuse", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def base(data, out, *extra):
    """argv of a short CPU train run on the fixture into ``out``."""
    return ["train", "--data", data, "--device", "cpu", "--out", str(out), "--quiet", "--limit-train", "64",
            "--batch-size", "32", "--no-download", *extra]


def history(out):
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)
