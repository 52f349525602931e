"""One conv layer, exact and with deep reuse, on the same smooth image batch.

    python examples/reuse_layer.py [--batch 32] [--L 64] [--H 32]

Prints, per hash family, the remaining ratio r_c (clusters per neuron vector),
the relative error of the output against exact, and forward/backward times.
"""
import argparse

import numpy as np

from minireuse import backend
from minireuse.layers import Conv2D
from minireuse.timing import timed


def smooth_images(rng, n, size, channels):
    """Random images blurred by averaging shifted copies: neighbouring pixels look
    alike, as in real feature maps, so clusters form."""
    x = rng.standard_normal((n, size + 4, size + 4, channels))
    out = sum(x[:, i:i + size, j:j + size] for i in range(5) for j in range(5)) / 5.0
    return np.maximum(out, 0).astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--L", type=int, default=64)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    a = ap.parse_args(argv)
    backend.set_device(a.device)
    rng = np.random.default_rng(0)
    x = backend.to_device(smooth_images(rng, a.batch, 16, 64))
    conv = Conv2D(64, 64, 5, padding="same", rng=rng)
    exact_ms, y = timed(lambda: conv.forward(x))
    dy = backend.to_device(rng.standard_normal(y.shape).astype(np.float32))
    exact_bwd_ms, _ = timed(lambda: conv.backward(dy))
    print(f"exact              forward {exact_ms:7.1f} ms  backward {exact_bwd_ms:7.1f} ms")
    for family in ("origin", "offset"):
        setting = dict(L=a.L, H=a.H, family=family, dx_mode="cluster")
        conv.set_reuse(dict(setting, measure_error=True))     # one call that also runs exact
        conv.forward(x)
        stats = conv.reuse_state.pop_stats()
        conv.set_reuse(setting)                                # then a timed one that does not
        fwd_ms, _ = timed(lambda: conv.forward(x))
        bwd_ms, _ = timed(lambda: conv.backward(dy))
        print(f"reuse {family:<7} L={a.L} H={a.H}  forward {fwd_ms:7.1f} ms  backward {bwd_ms:7.1f} ms  "
              f"r_c {stats['r_c']:.4f}  relative error {stats['rel_error']:.3f}")
    conv.set_reuse(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
