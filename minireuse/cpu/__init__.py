"""The CPU fast path: the exact step's hot operations on NumPy arrays, on every core.

The layers' array code is the educational version and the oracle; it runs one
NumPy operation at a time, and NumPy's ufuncs and copies use one core (only BLAS
uses them all). The functions of this package compute the same results with less
memory traffic and split the elementwise work over a pool of threads (NumPy
releases the GIL inside its loops):

    module       replaces (the twin, in the layer)            how
    conv.py      im2col, col2im, Conv2D's GEMMs and dX         padding per shard of
                                                               images; a K that is not a
                                                               multiple of 16 widened to
                                                               one by a bias column; dX
                                                               of a stride-1 conv as the
                                                               convolution of dY with the
                                                               flipped kernel (no col2im)
    sparse.py    the reuse path's R @ P and R^T @ dY            a numba kernel (kernels.py)
    ops.py       LocalResponseNorm, MaxPool2D, ReLU             window sums by shifted
                                                               adds, D^-0.75 by square
                                                               roots, the pool's first
                                                               maximum kept as a byte
                                                               (its backward a numba
                                                               kernel)

A layer calls them when ``supports(x)``: NumPy float arrays while the fast path is
on (``use_fast_path``). The tests run every layer both ways on asymmetric random
data. ``set_threads(n)`` sizes this pool and BLAS's together (``--threads``).
The numba kernels (kernels.py; numba is the ``fast`` extra) run only where one beat
threaded NumPy by a clear measured margin; without numba, NumPy and scipy do it all
(``use_compiled(False)`` or MINIREUSE_NUMBA=0 choose that where numba is installed:
its runtime costs about 130 MB of resident memory).
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..checks import describe_range, in_range

# MINIREUSE_NUMBA=0 keeps the numba kernels off (numba's runtime holds about 130 MB)
_state = {"fast": True, "threads": None, "pool": None, "kernels": None, "tried": False,
          "compiled": os.environ.get("MINIREUSE_NUMBA", "1") != "0"}

# below this many elements a shard's work is shorter than handing it to a thread
MIN_SHARD_ELEMENTS = 1 << 16
# elementwise passes walk their shard in pieces this large: a few such arrays fit in L2
CHUNK_ELEMENTS = 1 << 14


def threads():
    """The number of threads the fast path uses (default: every core of this process)."""
    if _state["threads"] is None:
        _state["threads"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return _state["threads"]


def set_threads(n):
    """Use ``n`` threads for the fast path and for BLAS (threadpoolctl); None = every core.

    Returns the number now in use.
    """
    if n is not None and not in_range(n, 1, integer=True):
        raise ValueError(f"threads must be {describe_range(1, integer=True)} (or None for every core), got {n!r}")
    _state["threads"] = None if n is None else int(n)
    if _state["pool"] is not None:
        _state["pool"].shutdown()
        _state["pool"] = None
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=threads(), user_api="blas")
    return threads()


def use_fast_path(on=True):
    """Switch the CPU fast path on or off (off: every layer runs its array code)."""
    _state["fast"] = bool(on)


@contextlib.contextmanager
def fast_path(on):
    """``with fast_path(False):`` runs the block on the array code (the oracle of the tests)."""
    before = _state["fast"]
    use_fast_path(on)
    try:
        yield
    finally:
        use_fast_path(before)


def use_compiled(on=True):
    """Switch the numba kernels of kernels.py on (where numba is installed) or off (NumPy/scipy)."""
    _state["compiled"] = bool(on)


def compiled_kernels():
    """The kernels module where numba is installed and the kernels are on, else None."""
    if not _state["compiled"]:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            from . import kernels
        except ImportError:         # numba not installed: NumPy and scipy do it all
            return None
        _state["kernels"] = kernels
    return _state["kernels"]


def describe():
    """'numpy, fast path, 2 threads' (or 'numpy, array code' with the fast path off)."""
    if not _state["fast"]:
        return "numpy, array code"
    return f"numpy, fast path, {threads()} threads" + (", numba" if compiled_kernels() else "")


def supports(*arrays):
    """True when the fast path is on and every array is a NumPy float32/float64 array."""
    return _state["fast"] and all(type(a) is np.ndarray and a.dtype in (np.float32, np.float64)
                                  for a in arrays)


def _pool():
    if _state["pool"] is None:
        _state["pool"] = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="minireuse-cpu")
    return _state["pool"]


def shards(n, elements_per_item=1):
    """Contiguous (lo, hi) ranges that split range(n) over the threads.

    Fewer shards when the items hold few elements: a thread costs more than it saves.
    """
    count = max(1, min(threads(), n, (n * elements_per_item) // MIN_SHARD_ELEMENTS))
    bounds = [n * k // count for k in range(count + 1)]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def parallel(fn, n, elements_per_item=1, chunk_elements=None):
    """Call fn(lo, hi) for the shards of range(n), concurrently; the caller's thread runs the first.

    fn must write disjoint parts of its outputs for disjoint ranges. With
    ``chunk_elements``, each shard is walked in pieces of about that many elements,
    so that a sequence of elementwise passes over one piece stays in the core's cache.
    """
    parts = shards(n, elements_per_item)
    if chunk_elements:
        step = max(1, chunk_elements // max(elements_per_item, 1))
        body = fn

        def fn(lo, hi):
            for a in range(lo, hi, step):
                body(a, min(a + step, hi))
    if len(parts) == 1:
        fn(*parts[0])
        return
    errors = np.geterr()     # NumPy's error handling is per thread: the workers take the caller's

    def in_worker(lo, hi):
        with np.errstate(**errors):
            fn(lo, hi)

    futures = [_pool().submit(in_worker, lo, hi) for lo, hi in parts[1:]]
    fn(*parts[0])
    for f in futures:
        f.result()
