"""An AlexNet-style net for 32x32 CIFAR-10 inputs, and VGG-19 for the same inputs.

AlexNet (Krizhevsky et al. 2012) as adapted to CIFAR-10 in the deep-reuse papers'
setting: the five convolutions keep the published channel widths (64, 192, 384,
256, 256) and LRN after the first two; for 32x32 inputs the first conv is 5x5
with stride 1 (not 11x11 stride 4), pooling is 2x2 stride 2 after conv1, conv2
and conv5 (32 -> 16 -> 8 -> 4), and the three dense layers are 1024, 1024 and
the classes (4096 wide in the published net, sized for 224x224 inputs) with
dropout 0.5 before the first two.

VGG-19 (Simonyan and Zisserman 2015, configuration E): sixteen 3x3 convolutions
in five stages (2 x 64, 2 x 128, 4 x 256, 4 x 512, 4 x 512), 2x2 max pooling after
each stage (32 -> 1), and the classifier used for CIFAR-10 (512 -> 512 -> 512 ->
classes, dropout 0.5). Every convolution is followed by BatchNorm: without it the
nineteen-layer net trains from scratch only with a careful schedule and
initialisation; with it, the default recipe trains it.
"""
import numpy as np

from ..layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, LocalResponseNorm, MaxPool2D, ReLU
from ..layers.init import he_normal
from .sequential import Sequential


def alexnet(num_classes=10, dropout=0.5, seed=0, dtype=None, reuse=None):
    rng = np.random.default_rng(seed)
    reuse = reuse or {}
    kw = dict(dtype=dtype, rng=rng)
    lrn = dict(depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)
    layers = []
    for i, (c_in, c_out, k, pool, norm) in enumerate([(3, 64, 5, True, True), (64, 192, 5, True, True),
                                                       (192, 384, 3, False, False), (384, 256, 3, False, False),
                                                       (256, 256, 3, True, False)], start=1):
        layers += [Conv2D(c_in, c_out, k, padding="same", weight_init=he_normal, name=f"conv{i}",
                          reuse=reuse.get(f"conv{i}"), **kw), ReLU(name=f"relu{i}")]
        if pool:
            layers.append(MaxPool2D(2, 2, name=f"pool{i}"))
        if norm:
            layers.append(LocalResponseNorm(**lrn, name=f"norm{i}"))
    layers.append(Flatten(name="flatten"))
    for i, (n_in, n_out) in enumerate([(4 * 4 * 256, 1024), (1024, 1024)], start=6):
        layers += [Dropout(dropout, seed=seed + i, name=f"dropout{i}"),
                   Dense(n_in, n_out, weight_init=he_normal, name=f"fc{i}", reuse=reuse.get(f"fc{i}"), **kw),
                   ReLU(name=f"relu{i}")]
    layers.append(Dense(1024, num_classes, name="logits", reuse=reuse.get("logits"), **kw))
    return Sequential(layers, name="alexnet")


VGG19_STAGES = [(64, 2), (128, 2), (256, 4), (512, 4), (512, 4)]


def vgg19(num_classes=10, dropout=0.5, seed=0, dtype=None, reuse=None):
    rng = np.random.default_rng(seed)
    reuse = reuse or {}
    kw = dict(dtype=dtype, rng=rng)
    layers, c_in, n = [], 3, 0
    for stage, (width, convs) in enumerate(VGG19_STAGES, start=1):
        for j in range(1, convs + 1):
            n += 1
            name = f"conv{stage}_{j}"
            layers += [Conv2D(c_in, width, 3, padding="same", bias=False, weight_init=he_normal, name=name,
                              reuse=reuse.get(name), **kw),
                       BatchNorm(width, dtype=dtype, name=f"bn{stage}_{j}"), ReLU(name=f"relu{stage}_{j}")]
            c_in = width
        layers.append(MaxPool2D(2, 2, name=f"pool{stage}"))
    layers.append(Flatten(name="flatten"))
    for i, (n_in, n_out) in enumerate([(512, 512), (512, 512)], start=1):
        layers += [Dropout(dropout, seed=seed + i, name=f"dropout{i}"),
                   Dense(n_in, n_out, weight_init=he_normal, name=f"fc{i}", reuse=reuse.get(f"fc{i}"), **kw),
                   ReLU(name=f"relu_fc{i}")]
    layers.append(Dense(512, num_classes, name="logits", reuse=reuse.get("logits"), **kw))
    return Sequential(layers, name="vgg19")
