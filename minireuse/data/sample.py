"""The images every benchmark times on: the first CIFAR-10 training images, or a fixture.

Benchmarks never time on zeros or constant data: without the data they use smooth
random images (a coarse random grid upsampled, plus a little noise) and say so.
"""
import numpy as np


def sample_images(data_dir, n, seed):
    """(uint8 NHWC images (n, 32, 32, 3), int64 labels, a line saying where they came from)."""
    try:
        from .cifar import load_cifar10
        x, y = load_cifar10(data_dir, download=False, progress=False)[:2]
        return x[:n], y[:n], f"CIFAR-10 training images 0..{min(n, len(x)) - 1} from {data_dir}"
    except Exception as e:   # missing or unreadable data: time on a fixture, and say so
        rng = np.random.default_rng(seed)
        coarse = rng.uniform(0, 255, size=(n, 4, 4, 3))
        images = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) + rng.normal(0, 8, (n, 32, 32, 3))
        return (np.clip(images, 0, 255).astype(np.uint8), rng.integers(0, 10, n),
                f"NOT CIFAR-10: a fixed random fixture ({type(e).__name__}: {str(e).splitlines()[0]})")
