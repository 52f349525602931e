"""Hashing on the fast path (kernels input_rms, hash_rows_h{8,16,32,64}); twin: reuse/lsh.py.

``Rows`` names what is hashed: the rows of X (N, K), or the padded pixels of an
NHWC image (the pixel-aligned conv path), which the kernels read from the
unpadded input.
"""
import dataclasses

import numpy as np

from .. import lsh as reference
from .capacity import Arena
from .runtime import (MAX_GRID_Y, RMS_BLOCKS, SMEM_LIMIT, STAT_COUNT, check, device, i32, launch, pad_hash_params,
                      padded_hash_params, PROBE_LIMIT)
from ...kernels import runtime as kernel_runtime


@dataclasses.dataclass
class Rows:
    """The rows that are hashed: rows of X (N, K), or the padded pixels of an NHWC image.

    For pixels, K is the channel count and every row maps back to a pixel of
    the unpadded input x (B, h, w, K), or to a zero padding pixel.
    """

    x: object
    rows: int
    K: int
    hp: int = 0
    wp: int = 0
    h: int = 0
    w: int = 0
    top: int = 0
    left: int = 0

    @classmethod
    def matrix(cls, X):
        return cls(X, X.shape[0], X.shape[1])

    @classmethod
    def pixels(cls, x, pads):
        b, h, w, c = x.shape
        hp, wp = h + pads[0] + pads[1], w + pads[2] + pads[3]
        return cls(x, b * hp * wp, c, hp, wp, h, w, pads[0], pads[2])

    def geometry(self):
        return tuple(i32(v) for v in (self.hp, self.wp, self.h, self.w, self.top, self.left))


def small_arena(G):
    """The per-call statistics and scratch of one clustering: one allocation, one memset."""
    return (Arena().add("distinct", (G,), np.int32).add("stats", (STAT_COUNT,), np.int32)
            .add("r_c", (), np.float32).add("scale", (), np.float32).add("ticket", (), np.uint32)
            .add("partials", (RMS_BLOCKS,), np.float32))


def launch_input_rms(x, small):
    n = x.size
    grid = (kernel_runtime.grid_blocks(device().runner, -(-n // (256 * 8)), RMS_BLOCKS),)
    launch("input_rms", grid, (256,), (x, np.int64(n), small["partials"], small["ticket"], small["scale"]))


def launch_hash(rows, L, G, planes, offsets, H, scale, codes=None, table=None):
    """hash_rows_h{HB}: codes and/or table insertion (table: dict keys, vals, T, distinct, capacity, slots, stats)."""
    hb = planes.shape[-1]
    in_smem = (hb + L * hb) * 4 <= SMEM_LIMIT
    smem = (hb + L * hb) * 4 if in_smem else hb * 4
    if G > MAX_GRID_Y:
        raise ValueError(f"G: {G} groups exceed the grid limit {MAX_GRID_Y}; use a larger L")
    t = table or {}
    grid = (kernel_runtime.grid_blocks(device().runner, -(-rows.rows // 128), 8192), G)
    launch(f"hash_rows_h{hb}", grid, (128,), (
        rows.x, i32(rows.rows), i32(rows.K), i32(L), i32(G), *rows.geometry(),
        planes, offsets, i32(H), i32(planes.shape[0] == 1), i32(in_smem), scale, codes,
        t.get("keys"), t.get("vals"), i32(t.get("T", 0)), t.get("distinct"), i32(t.get("capacity", 0)),
        i32(PROBE_LIMIT), t.get("slots"), t.get("stats")), shared_mem=smem)


def centred_thresholds(vectors, planes, unit_offsets):
    """The 'centred' family's thresholds (Gp, HB) = mean + unit offsets * std of the projections
    of vectors (n, G, L) onto planes (Gp, L, HB), on the device and without a host wait: the
    reference's own functions (lsh.projection_stats, lsh.centred_offsets) on the device's arrays.
    Padding bits (zero planes and offsets) get threshold 0 and are masked off by the kernels."""
    mean, std = reference.projection_stats(vectors, planes)
    return reference.centred_offsets(unit_offsets, mean, std).astype(np.float32, copy=False)


def pca_hash_params(vectors, H, shared):
    """The 'pca' family's planes (Gp, L, HB) and thresholds (Gp, HB), fitted to vectors (n, G, L)
    on the device and without a host wait: the reference's lsh.pca_params on the device's
    arrays, zero-padded to the compiled width (the kernels mask the padding bits off)."""
    planes, thresholds = reference.pca_params(vectors, H, shared)
    return pad_hash_params(planes.astype(np.float32, copy=False), thresholds.astype(np.float32, copy=False))


def family_hash_params(state, config, G, vectors):
    """Planes (Gp, L, HB) and offsets (Gp, HB) for the hash kernels under config's family:
    the drawn parameters, padded ('offset', 'origin': unit offsets the kernels scale), with the
    'centred' thresholds computed from, or the 'pca' planes and thresholds fitted to, the
    vectors (n, G, L) that ``vectors()`` gives (called only for those two families)."""
    if config.family == "pca":
        return pca_hash_params(vectors(), config.H, config.shared_planes)
    planes, offsets = padded_hash_params(state, config, G)
    if config.family == "centred":
        offsets = centred_thresholds(vectors(), planes, offsets)
    return planes, offsets


def input_scale(x):
    """s = sqrt(mean(x * x)) as a 0-d float32 device array (kernel input_rms); twin: lsh.input_scale."""
    check("x", x, np.float32)
    small = small_arena(1).allocate(0)
    launch_input_rms(x, small)
    return small["scale"]


def hash_rows(X, L, planes, offsets):
    """Codes (N, G) of the rows of X (N, K) in groups of L (kernel hash_rows_h*): uint32, or
    uint64 beyond 32 bits, as lsh.hash_codes gives them.

    planes (Gp, L, H), offsets (Gp, H): thresholds b (already scaled), as
    lsh.hash_codes takes them (which takes the split groups instead of X).
    """
    check("X", X, np.float32, (None, None))
    return _hash_codes(Rows.matrix(X), L, planes, offsets)


def hash_pixels(x, pads, L, planes, offsets):
    """Codes (B*Hp*Wp, Q) (uint32, or uint64 beyond 32 bits) of every padded pixel of x (B, H, W, C) per group of L channels."""
    check("x", x, np.float32, (None, None, None, None))
    if x.shape[3] % L:
        raise ValueError(f"L: expected a divisor of the {x.shape[3]} channels, got {L}")
    return _hash_codes(Rows.pixels(x, pads), L, planes, offsets)


def _hash_codes(rows, L, planes, offsets):
    G = -(-rows.K // L)
    gp = 1 if planes.shape[0] == 1 else G
    check("planes", planes, np.float32, (gp, L, None))
    check("offsets", offsets, np.float32, (gp, planes.shape[2]))
    H = planes.shape[2]
    p, o = pad_hash_params(planes, offsets)
    xp = device().xp
    codes = xp.empty((rows.rows, G), dtype=np.uint64 if p.shape[2] > 32 else np.uint32)
    one = xp.ones((), dtype=np.float32)
    launch_hash(rows, L, G, p, o, H, one, codes=codes)
    return codes
