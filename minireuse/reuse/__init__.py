"""Adaptive deep reuse: LSH-clustered neuron vectors, one product per cluster.

Reading order (the educational reference path, NumPy and CuPy alike):
    lsh.py         hash parameters, projections, bit packing
    clustering.py  ids, centroids, cluster sums (the sparse assignment matrix)
    matmul.py      the reuse product y = X @ W + b, forward and backward
    conv.py        conv glue: general (im2col) path and pixel-aligned path
    config.py      ReuseConfig (a setting) and ReuseState (per-layer state, statistics)
    dispatch.py    the entry points the layers call, and the choice of implementation

The layers call ``conv2d_forward/backward`` and ``dense_forward/backward``
(dispatch.py); on CuPy arrays these run the CUDA fast path (reuse/cuda/, each file
beside its twin here) when it imports and ``config.impl`` allows.
"""
from .clustering import assign_clusters, centroids, cluster_sums
from .common import use_pixel_aligned
from .config import ReuseConfig, ReuseState
from .conv import (general_conv_backward, general_conv_forward, general_conv_forward_assigned,
                   pixel_conv_backward, pixel_conv_forward, pixel_conv_forward_assigned)
from .dispatch import conv2d_backward, conv2d_forward, dense_backward, dense_forward, resolve_impl
from .lsh import draw_hash_params, hash_codes
from .matmul import reuse_matmul_backward, reuse_matmul_forward, reuse_matmul_forward_assigned

__all__ = ["ReuseConfig", "ReuseState", "conv2d_forward", "conv2d_backward", "dense_forward",
           "dense_backward", "reuse_matmul_forward", "reuse_matmul_backward",
           "reuse_matmul_forward_assigned", "general_conv_forward", "general_conv_forward_assigned",
           "general_conv_backward", "pixel_conv_forward",
           "pixel_conv_forward_assigned", "pixel_conv_backward", "use_pixel_aligned", "resolve_impl",
           "assign_clusters", "centroids", "cluster_sums", "draw_hash_params", "hash_codes"]
