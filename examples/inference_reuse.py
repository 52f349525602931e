"""Deep reuse at inference on a saved model: train a small conv net briefly, save it, load it
into a fresh model, and compare exact and reuse test passes (a few seconds on a CPU).

    python examples/inference_reuse.py [--H 20] [--device cpu]

The same comparison for a trained CifarNet on CIFAR-10 is the evaluate command
(python -m minireuse evaluate --checkpoint RUN/model.npz; docs/inference.md).
"""
import argparse
import os
import tempfile

import numpy as np

from minireuse import backend
from minireuse.tools.evaluate import evaluate_model
from minireuse.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from minireuse.losses import SoftmaxCrossEntropy
from minireuse.models import Sequential
from minireuse.optim import SGD
from minireuse.reuse import ReuseConfig


def build(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Conv2D(3, 16, 5, padding="same", rng=rng, name="conv1"), ReLU(name="relu1"),
                       MaxPool2D(2, name="pool1"), Conv2D(16, 16, 5, padding="same", rng=rng, name="conv2"),
                       ReLU(name="relu2"), MaxPool2D(2, name="pool2"), Flatten(name="flatten"),
                       Dense(8 * 8 * 16, 4, rng=rng, name="logits")])


def images(rng, n):
    """uint8 32x32 images of 4 classes: a colour tint and a bright quadrant each."""
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 80, (n, 32, 32, 3))
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, 16 * r:16 * r + 16, 16 * c:16 * c + 16, k % 3] += 170
    return x.astype(np.uint8), y.astype(np.int64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--H", type=int, default=20)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    a = ap.parse_args(argv)
    backend.set_device(a.device)
    rng = np.random.default_rng(0)
    x_train, y_train = images(rng, 256)
    x_test, y_test = images(rng, 256)
    model, loss_fn = build(), SoftmaxCrossEntropy()
    opt = SGD(model, lr=0.02, momentum=0.9)
    xb = backend.to_device((x_train.astype(np.float32) / 255.0 - 0.5) / 0.25)
    yb = backend.to_device(y_train)
    for _ in range(3):                               # a few full-batch steps
        for i in range(0, 256, 64):
            loss_fn.forward(model.forward(xb[i:i + 64], train=True), yb[i:i + 64])
            model.backward(loss_fn.backward())
            opt.step()
    path = os.path.join(tempfile.mkdtemp(), "model.npz")
    model.save(path)                                 # a saved model ...
    fresh = build(seed=1)
    fresh.load(path)                                 # ... loaded into a fresh one
    report = evaluate_model(fresh, x_test, y_test, {"conv2": ReuseConfig(L=a.L, H=a.H)}, batch_size=64)
    ex, re_ = report["exact"], report["reuse"]
    conv2 = re_["layers"]["conv2"]
    print(f"exact: accuracy {ex['accuracy']:.3f}")
    print(f"reuse conv2 L={a.L} H={a.H}: accuracy {re_['accuracy']:.3f}, predictions as exact "
          f"{100 * re_['agreement']:.1f}%, r_c {conv2['r_c']:.4f}, relative error {conv2['rel_error']:.3f}")


if __name__ == "__main__":
    main()
