"""What the reference path and the fast paths of deep reuse share beyond the technique
itself: the error measures of measure_error, dw_sample's correction of the centroid dW,
and the pixel-aligned path's choice and geometry. The CUDA path (reuse/cuda/) imports
these from here, not from the reference files it is tested against.
"""
import dataclasses

from .. import backend
from .clustering import group_keys


def relative_error(y, y_exact):
    """||y - y_exact|| / ||y_exact|| as a 0-d device array."""
    xp = backend.get_array_module(y, y_exact)
    return xp.linalg.norm(y - y_exact) / xp.linalg.norm(y_exact)


def cosine(a, b):
    """Cosine similarity of two arrays of one shape, as a 0-d device array."""
    xp = backend.get_array_module(a, b)
    return (a * b).sum() / (xp.linalg.norm(a) * xp.linalg.norm(b))


def record_gradient(stats, name, approx, exact):
    """Store how a reuse gradient compares with the exact one in a stats entry:
    ``{name}_cos``, the cosine, and ``{name}_gain`` = <approx, exact> / <exact, exact>,
    the share of the exact gradient it carries (1: none lost; 0.5: as if its learning
    rate were halved along the exact direction). 0-d device arrays."""
    a, e = approx.reshape(-1), exact.reshape(-1)
    dot = (a * e).sum()
    stats[f"{name}_cos"] = cosine(a, e)
    stats[f"{name}_gain"] = dot / (e * e).sum()


@dataclasses.dataclass
class DwCorrection:
    """dw_sample's unbiased correction of the centroid dW: scale * residual^T @ dY[rows]."""

    rows: object         # (m,) sampled row indices: start, start + step, ...
    residual: object     # (m, K) x - its centroids, for the sampled rows
    scale: float         # the sampling step

    @classmethod
    def drawn(cls, draw, n, xp, residuals):
        """The correction of a systematic sample of n rows: draw(n) -> (start, step)
        (ReuseState.sample_rows), residuals(rows) -> (m, K) for those rows."""
        start, step = draw(n)
        rows = xp.arange(start, n, step)
        return cls(rows, residuals(rows), step)

    def dW(self, dy):
        return self.scale * (self.residual.T @ dy[self.rows])


def row_residuals(X, C, ids, rows):
    """(m, K): X[rows] minus the centroids that stand for them (C (G, Cmax, L), ids (N, G))."""
    xp = backend.get_array_module(X, C)
    g, cmax, L = C.shape
    k = X.shape[1]
    near = xp.take(C.reshape(g * cmax, L), group_keys(ids[rows], cmax), axis=0)   # (m, G, L)
    return X[rows] - near.reshape(len(rows), g * L)[:, :k]


def dw_sample_draw(config, state, train):
    """draw(n) -> (start, step) of this call's dw_sample rows, or None (off, or evaluation)."""
    if not train or config.dw_sample <= 0:
        return None
    return lambda n: state.sample_rows(n, config.dw_sample)


def use_pixel_aligned(config, c_in):
    """Whether config asks for the pixel-aligned path on an input with c_in channels."""
    if config.pixel_aligned == "auto":
        return c_in % config.L == 0 and config.shared_planes
    if config.pixel_aligned and c_in % config.L:
        raise ValueError(f"ReuseConfig.pixel_aligned: got True with L={config.L}, expected L to divide "
                         f"the {c_in} input channels (or pixel_aligned 'auto'/False)")
    return bool(config.pixel_aligned)


def pixel_index(batch, hp, wp, kh, kw, stride, xp):
    """(N, kh*kw) int32: the padded pixel read by kernel offset t = (i, j) of output n.

    Output n = (image, oy, ox) starts its window at pixel (image, oy*stride, ox*stride)
    of the padded input; offset (i, j) moves it by i rows and j columns.
    """
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    window_start = (xp.arange(batch)[:, None, None] * (hp * wp) + xp.arange(oh)[None, :, None] * (stride * wp)
                    + xp.arange(ow)[None, None, :] * stride).reshape(-1, 1)
    shift = (xp.arange(kh)[:, None] * wp + xp.arange(kw)[None, :]).reshape(1, -1)
    return (window_start + shift).astype(xp.int32)


def pixel_residuals(pixels, C, pixel_ids, where):
    """(m, kh*kw*c_in): the im2col rows of m outputs minus their centroid rows.

    where (m, T): the padded pixel each output reads per kernel offset (pixel_index rows).
    """
    xp = backend.get_array_module(pixels, C)
    q, cmax, L = C.shape
    m, t = where.shape
    keys = xp.take(pixel_ids, where, axis=0) + xp.arange(q, dtype=pixel_ids.dtype) * cmax      # (m, T, Q)
    near = xp.take(C.reshape(q * cmax, L), keys, axis=0)                                       # (m, T, Q, L)
    return (xp.take(pixels, where, axis=0) - near).reshape(m, t * q * L)
