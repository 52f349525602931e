"""A run's data: the CIFAR-10 images of its settings, their batches epoch by epoch, the
evaluations within an epoch, and the memory a CPU run needs (checked before any data is read)."""
import math

import numpy as np

from ..data import CIFAR10_MEAN, CIFAR10_STD, BatchIterator, load_cifar10

# CIFAR-10's training and test images, for the memory estimate made before they are read
CIFAR_IMAGES = (50000, 10000)


def load_data(cfg, progress=True):
    """(train images, labels, test images, labels) of a run's settings (limit_train, limit_test)."""
    xtr, ytr, xte, yte = load_cifar10(cfg["data"], download=cfg["download"], progress=progress)
    if cfg["limit_train"]:
        xtr, ytr = xtr[:cfg["limit_train"]], ytr[:cfg["limit_train"]]
    if cfg["limit_test"]:
        xte, yte = xte[:cfg["limit_test"]], yte[:cfg["limit_test"]]
    return xtr, ytr, xte, yte


def batches(cfg, x, y, train):
    """The batch iterator of a run's training or test images (it moves the uint8 images to the
    device once); epoch_batches gives a training epoch's batches."""
    return BatchIterator(x, y, cfg["batch_size"], shuffle=train,
                         rng=np.random.default_rng(cfg["seed"]) if train else None,
                         augment=train and cfg["augment"], drop_last=False, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def epoch_batches(train_iter, seed, epoch, start=0):
    """The batches of training epoch ``epoch`` from step ``start`` on: every epoch's shuffle and
    augmentation come from (seed, epoch) alone, so a resumed run sees the same batches."""
    train_iter.rng = np.random.default_rng([seed, epoch])
    return train_iter.epoch(start)


def mid_epoch_evaluations(steps, eval_every):
    """The step counts within an epoch of ``steps`` steps after which the test set is evaluated
    before the epoch's end, every ``eval_every`` of an epoch (none for 1)."""
    points = {round(k * eval_every * steps) for k in range(1, math.ceil(1 / eval_every - 1e-9))}
    return sorted(p for p in points if 0 < p < steps)


def available_memory():
    """Bytes of memory the system can give without swapping (MemAvailable of /proc/meminfo),
    or None where that is not known (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def step_memory_bytes(model, batch, images):
    """A deliberately simple upper estimate of a CPU training run's peak memory, in bytes:
    the ``images`` as uint8 (32x32x3 each), the parameters four times (weights, gradients,
    two optimizer slots), and for one step every layer's output twice (kept for the
    backward, then its gradient) plus the largest conv im2col matrix twice (the forward's
    columns, the backward's column gradient), at the parameters' precision."""
    itemsize = max((p.dtype.itemsize for l in model.layers for p in l.params.values()), default=4)
    params = sum(int(np.prod(p.shape)) for l in model.layers for p in l.params.values())
    shape, outputs, columns = (batch, 32, 32, 3), 0, 0
    for layer in model.layers:
        W = layer.params.get("W")
        out = layer.output_shape(shape)
        if W is not None and W.ndim == 4:              # a conv: one im2col row per output pixel
            columns = max(columns, int(np.prod(out[:-1])) * int(np.prod(W.shape[:-1])))
        outputs += int(np.prod(out))
        shape = out
    return images * 32 * 32 * 3 + itemsize * (4 * params + 2 * outputs + 2 * columns)


def check_memory(model, batch, images):
    """Refuse, before any data is read, a CPU run whose estimated peak (step_memory_bytes)
    exceeds the memory available now (the GPU's memory is not estimated)."""
    need, have = step_memory_bytes(model, batch, images), available_memory()
    if have is not None and need > have:
        raise ValueError(f"training {model.name} with batches of "
                         f"{batch} needs about {need / 2**30:.1f} GiB of memory, but {have / 2**30:.1f} GiB are "
                         "available: lower --batch-size")
