"""A dense network with deep reuse on its dense layers, trained exactly and with reuse from
the same seed on synthetic clustered data (a few seconds on a CPU).

    python examples/dense_reuse.py [--L 8] [--H 12] [--device cpu]

Inputs are noisy copies of a few prototypes, so neuron vectors cluster: the reuse run
computes one product per cluster (r_c = clusters per neuron vector) and reaches about
the accuracy of the exact run. Prints, per run, the final accuracy, and for the reuse
run each dense layer's r_c and relative output error.
"""
import argparse

import numpy as np

from minireuse import backend
from minireuse.layers import Dense, ReLU
from minireuse.losses import SoftmaxCrossEntropy
from minireuse.models import Sequential
from minireuse.optim import SGD
from minireuse.reuse import ReuseConfig


def clustered_data(rng, n, dim=32, classes=5, prototypes=20):
    protos = rng.standard_normal((prototypes, dim)) * 2
    which = rng.integers(0, prototypes, n)
    x = protos[which] + rng.standard_normal((n, dim)) * 0.6
    return x.astype(np.float32), (which % classes).astype(np.int64)


def train(reuse, x, y, epochs, seed=0):
    rng = np.random.default_rng(seed)
    model = Sequential([Dense(32, 64, rng=rng, reuse=reuse, name="fc1"), ReLU(name="relu1"),
                        Dense(64, 64, rng=rng, reuse=reuse, name="fc2"), ReLU(name="relu2"),
                        Dense(64, 5, rng=rng, name="logits")])
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(model, lr=0.05, momentum=0.9)
    order_rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        order = order_rng.permutation(len(y))
        for i in range(0, len(y), 128):
            idx = backend.to_device(order[i:i + 128])
            logits = model.forward(x[idx], train=True)
            loss_fn.forward(logits, y[idx])
            model.backward(loss_fn.backward())
            opt.step()
    if reuse is not None:           # one measured pass for the statistics
        for layer in model.reuse_layers()[:2]:
            layer.reuse_state.pop_stats()
            layer.set_reuse(reuse.replace(measure_error=True))
    logits = model.forward(x, train=True)
    accuracy = float(backend.asnumpy((logits.argmax(axis=1) == y).mean()))
    stats = {l.name: l.reuse_state.pop_stats() for l in model.reuse_layers()[:2]} if reuse is not None else {}
    return accuracy, stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=8)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    a = ap.parse_args(argv)
    backend.set_device(a.device)
    x, y = clustered_data(np.random.default_rng(0), 2048)
    x, y = backend.to_device(x), backend.to_device(y, dtype=np.int64)
    exact, _ = train(None, x, y, a.epochs)
    reused, stats = train(ReuseConfig(L=a.L, H=a.H), x, y, a.epochs)
    print(f"exact: accuracy {exact:.3f}")
    print(f"reuse L={a.L} H={a.H}: accuracy {reused:.3f}")
    for name, s in stats.items():
        print(f"  {name}: r_c {s['r_c']:.4f}, relative error {s['rel_error']:.3f}")


if __name__ == "__main__":
    main()
