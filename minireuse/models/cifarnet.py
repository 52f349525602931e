"""CifarNet as in TF-slim's cifarnet.py, NHWC, 32x32x3 inputs."""
import numpy as np

from ..layers import Conv2D, Dense, Dropout, Flatten, LocalResponseNorm, MaxPool2D, ReLU
from ..layers.init import constant, truncated_normal
from .sequential import Sequential


def cifarnet(num_classes=10, dropout=0.5, seed=0, dtype=None, reuse=None):
    """conv5x5x64-relu, pool, LRN, conv5x5x64-relu, LRN, pool, fc384-relu, dropout, fc192-relu, fc10.

    Initialisation follows TF-slim: conv weights truncated normal (std 5e-2), the
    fully connected ones truncated normal (std 0.04; 1/192 for the logits), biases
    0.1 in conv2 and the hidden dense layers. ``reuse`` maps layer names
    ('conv1', 'conv2', 'fc3', 'fc4', 'logits') to deep-reuse settings.
    """
    rng = np.random.default_rng(seed)
    reuse = reuse or {}
    lrn = dict(depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)
    kw = dict(dtype=dtype, rng=rng)
    return Sequential([
        Conv2D(3, 64, 5, padding="same", weight_init=truncated_normal(5e-2), name="conv1",
               reuse=reuse.get("conv1"), **kw),
        ReLU(name="relu1"),
        MaxPool2D(2, 2, name="pool1"),
        LocalResponseNorm(**lrn, name="norm1"),
        Conv2D(64, 64, 5, padding="same", weight_init=truncated_normal(5e-2), bias_init=constant(0.1),
               name="conv2", reuse=reuse.get("conv2"), **kw),
        ReLU(name="relu2"),
        LocalResponseNorm(**lrn, name="norm2"),
        MaxPool2D(2, 2, name="pool2"),
        Flatten(name="flatten"),
        Dense(8 * 8 * 64, 384, weight_init=truncated_normal(0.04), bias_init=constant(0.1), name="fc3",
              reuse=reuse.get("fc3"), **kw),
        ReLU(name="relu3"),
        Dropout(dropout, seed=seed, name="dropout3"),
        Dense(384, 192, weight_init=truncated_normal(0.04), bias_init=constant(0.1), name="fc4",
              reuse=reuse.get("fc4"), **kw),
        ReLU(name="relu4"),
        Dense(192, num_classes, weight_init=truncated_normal(1 / 192.0), name="logits",
              reuse=reuse.get("logits"), **kw),
    ], name="cifarnet")


def mlp(sizes, seed=0, dtype=None):
    """A small ReLU MLP (used by tests and examples on toy problems)."""
    rng = np.random.default_rng(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(a, b, rng=rng, dtype=dtype, name=f"fc{i}"))
        if i < len(sizes) - 2:
            layers.append(ReLU(name=f"relu{i}"))
    return Sequential(layers, name="mlp")


def _models():
    from .alexnet import alexnet, vgg19
    return {"cifarnet": cifarnet, "alexnet": alexnet, "vgg19": vgg19}


MODELS = _models()
