"""A small conv net built and trained by hand with the Python API: explicit forward, loss,
backward and optimizer step, no command line, on synthetic images (a few seconds on a CPU).

    python examples/train_by_hand.py [--epochs 4] [--device cpu]

The images of each of 4 classes carry a colour tint and a bright quadrant; the net
learns them in a few epochs. Prints the loss and accuracy of every epoch.
"""
import argparse

import numpy as np

from minireuse import backend
from minireuse.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from minireuse.losses import SoftmaxCrossEntropy
from minireuse.models import Sequential
from minireuse.optim import SGD


def synthetic_images(rng, n, classes=4):
    """float32 NHWC images (n, 16, 16, 3) in [0, 1] and their labels."""
    y = rng.integers(0, classes, n)
    x = rng.uniform(0, 0.8, (n, 16, 16, 3))
    for k in range(classes):
        r, c = divmod(k, 2)
        x[y == k, 8 * r:8 * r + 8, 8 * c:8 * c + 8, k % 3] += 0.25
    return x.astype(np.float32), y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    a = ap.parse_args(argv)
    backend.set_device(a.device)
    rng = np.random.default_rng(0)
    model = Sequential([Conv2D(3, 16, 3, padding="same", rng=rng, name="conv1"), ReLU(name="relu1"),
                        MaxPool2D(2, name="pool1"), Flatten(name="flatten"),
                        Dense(8 * 8 * 16, 4, rng=rng, name="logits")])
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(model, lr=0.01, momentum=0.9)
    x, y = synthetic_images(rng, 512)
    x, y = backend.to_device(x), backend.to_device(y, dtype=np.int64)
    for epoch in range(a.epochs):
        order = rng.permutation(len(y))
        total, correct = 0.0, 0
        for i in range(0, len(y), 64):
            idx = backend.to_device(order[i:i + 64])
            xb, yb = x[idx], y[idx]
            logits = model.forward(xb, train=True)        # forward
            loss = loss_fn.forward(logits, yb)            # mean cross-entropy
            model.backward(loss_fn.backward())            # every layer's grads
            opt.step()                                    # SGD with momentum on every parameter
            total += float(backend.asnumpy(loss)) * len(yb)
            correct += int(backend.asnumpy((logits.argmax(axis=1) == yb).sum()))
        print(f"epoch {epoch + 1}: loss {total / len(y):.4f} accuracy {correct / len(y):.3f}")


if __name__ == "__main__":
    main()
