"""The one place that chooses between the reference path and the CUDA fast path.

The layers call ``dense_forward/backward`` and ``conv2d_forward/backward``;
``resolve_impl`` picks the implementation from the arrays and ``config.impl``.
The reference files (lsh.py, clustering.py, matmul.py, conv.py) import nothing
of the fast path; the fast path (reuse/cuda/) is imported here on first use only.
"""
import warnings

import numpy as np

from .. import backend
from .common import use_pixel_aligned
from .conv import general_conv_backward, general_conv_forward, pixel_conv_backward, pixel_conv_forward
from .matmul import reuse_matmul_backward, reuse_matmul_forward

_cuda_import = {}


def cuda_module():
    """(minireuse.reuse.cuda or None, the import error or None), imported once."""
    if not _cuda_import:
        try:
            from . import cuda
            _cuda_import.update(module=cuda, error=None)
        except Exception as e:  # ImportError, or a CUDA/compiler error raised on import
            _cuda_import.update(module=None, error=e)
    return _cuda_import["module"], _cuda_import["error"]


def resolve_impl(config, *arrays):
    """'cuda' or 'reference' for these arrays under config.impl (NumPy arrays import the fast path only
    for impl 'cuda').

    'auto' picks the CUDA kernels for float32 CuPy arrays when minireuse.reuse.cuda
    imports, the reference path otherwise (NumPy, other dtypes, import failure);
    the kernels implement every ReuseConfig option. 'cuda' on NumPy arrays runs
    the kernels' host build while ``cuda.using_device(cuda.HostDevice())`` is active
    (how the fast path is tested without a GPU), and is refused otherwise.
    """
    xp = backend.get_array_module(*arrays)
    if config.impl == "reference":
        return "reference"
    if xp is np:
        if config.impl != "cuda":
            return "reference"
        module, _ = cuda_module()
        if module is None or module.device().kind != "host":
            raise ValueError("ReuseConfig.impl: got 'cuda' with NumPy arrays, expected CuPy arrays "
                             "(move the model to the GPU) or impl 'auto'/'reference'")
        return "cuda"        # the fast path on its host build (cuda.using_device(HostDevice()))
    if config.impl == "auto" and any(a is not None and a.dtype != np.float32 for a in arrays):
        return "reference"
    module, error = cuda_module()
    if module is not None:
        return "cuda"
    if config.impl == "cuda":
        raise backend.DeviceError(f"impl 'cuda' was requested but minireuse.reuse.cuda failed to import: "
                                  f"{type(error).__name__}: {error}") from error
    warnings.warn(f"deep reuse falls back to the CuPy reference path: minireuse.reuse.cuda failed to "
                  f"import ({type(error).__name__}: {error})", RuntimeWarning, stacklevel=3)
    return "reference"


def _fast():
    return cuda_module()[0]


def dense_forward(x, W, b, config, state, train=True):
    """Dense layer product with deep reuse: (y, cache); picks the CUDA or reference path."""
    if not config.enabled:
        raise ValueError("ReuseConfig.enabled is False: the layer should run its exact path")
    if resolve_impl(config, x, W, b) == "cuda":
        y, cache = _fast().cuda_reuse_matmul_forward(x, W, b, config, state, train=train)
        return y, ("cuda", cache)
    y, cache = reuse_matmul_forward(x, W, b, config, state, train)
    return y, ("reference", cache)


def dense_backward(dy, cache, input_grad=True):
    """(dx, dW, db) for dense_forward's cache; dx None when not input_grad (a first layer)."""
    impl, inner = cache
    if inner is None:
        raise RuntimeError("deep-reuse backward called after a forward with train=False")
    if impl == "cuda":
        return _fast().cuda_reuse_matmul_backward(dy, inner, input_grad)
    return reuse_matmul_backward(dy, inner, input_grad)


def conv2d_forward(x, W, b, stride, pads, config, state, train=True):
    """Conv2D product with deep reuse: (y, cache). CUDA, pixel-aligned or general path."""
    if not config.enabled:
        raise ValueError("ReuseConfig.enabled is False: the layer should run its exact path")
    if resolve_impl(config, x, W, b) == "cuda":
        y, cache = _fast().cuda_reuse_conv_forward(x, W, b, stride, pads, config, state, train=train)
        return y, ("cuda", cache)
    if use_pixel_aligned(config, x.shape[3]):
        y, cache = pixel_conv_forward(x, W, b, stride, pads, config, state, train)
        return y, ("pixel", cache)
    y, cache = general_conv_forward(x, W, b, stride, pads, config, state, train)
    return y, ("general", cache)


def conv2d_backward(dy, cache, input_grad=True):
    """(dx, dW, db) for conv2d_forward's cache; dx None when not input_grad (a first layer)."""
    kind, inner = cache
    if inner is None:
        raise RuntimeError("deep-reuse backward called after a forward with train=False")
    if kind == "cuda":
        return _fast().cuda_reuse_conv_backward(dy, inner, input_grad)
    if kind == "pixel":
        return pixel_conv_backward(dy, inner, input_grad)
    return general_conv_backward(dy, inner, input_grad)
