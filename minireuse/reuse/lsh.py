"""Locality-sensitive hashing of neuron vectors (array-module reference).

A neuron vector is one row of one column group: Xg[n, g] of length L. Each of H
random projections gives one bit, ``bit_h = [x . r_h > b_h]``, and the H bits,
packed into one integer, are the vector's code. Vectors with equal codes (in the
same group) are close in angle ('origin': planes through the origin, b = 0) or in
position ('offset': b_h drawn at the scale of the projections, so the planes cut
through the cloud of inputs instead of all meeting at zero; 'centred': b_h =
mean + u_h * std of the projections onto r_h over the vectors hashed, so the
planes cut through the cloud wherever it lies, even far from the origin; 'pca':
no random planes at all, the planes are the principal axes of the vectors hashed
and the H bits are cuts along them, see pca_params). Codes are uint32 up to 32
bits and uint64 beyond (up to 64).

Random hash parameters are always drawn on the host with NumPy, so the CPU and the GPU
paths (reference and CUDA) see the very same planes for a seed.
"""
import numpy as np

from .. import backend

# Rows hashed per step: keeps the (rows, G, H) projections near 16 MB whatever N is.
HASH_CHUNK_ELEMENTS = 1 << 22
# 'pca': the principal axes are fitted on every k-th vector, at most this many per group,
PCA_FIT_VECTORS = 4096
# and an axis' cuts spread evenly over its mean +- PCA_SPAN / 2 standard deviations.
PCA_SPAN = 4.0


def draw_hash_params(L, H, G, seed, shared):
    """Host arrays (planes (Gp, L, H) ~ N(0, 1/L), unit offsets (Gp, H) ~ N(0, 1)).

    Gp = 1 when the planes are shared by every group, else G. The offsets are
    drawn right after the planes from the same generator (the contract the CUDA
    path relies on).
    """
    gp = 1 if shared else G
    rng = np.random.default_rng(seed)
    planes = rng.normal(0.0, 1.0 / np.sqrt(L), size=(gp, L, H))
    unit_offsets = rng.normal(0.0, 1.0, size=(gp, H))
    return planes, unit_offsets


def pad_bits(planes, unit_offsets, bits):
    """(planes (Gp, L, bits), offsets (Gp, bits)): planes (Gp, L, H) and offsets (Gp, H) zero-padded
    to ``bits`` hash bits (the CUDA kernels' compiled widths); the extra bits are masked off."""
    xp = backend.get_array_module(planes)
    H = planes.shape[2]
    p = xp.zeros(planes.shape[:2] + (bits,), dtype=planes.dtype)
    p[:, :, :H] = planes
    o = xp.zeros(unit_offsets.shape[:1] + (bits,), dtype=unit_offsets.dtype)
    o[:, :H] = unit_offsets
    return p, o


def input_scale(x):
    """RMS of all entries of x: the std of a projection with N(0, 1/L) entries.

    A 0-d array on x's device (no host synchronisation).
    """
    xp = backend.get_array_module(x)
    return xp.sqrt(xp.mean(x * x))


def offsets(unit_offsets, family, scale):
    """The thresholds b (Gp, H): zero for 'origin', unit offsets times the input scale for 'offset'.

    ('centred' depends on the projections, not on a scale: see centred_offsets.)
    """
    xp = backend.get_array_module(unit_offsets)
    if family == "origin":
        return xp.zeros_like(unit_offsets)
    if family != "offset":
        raise ValueError(f"lsh.offsets: got family {family!r}, expected 'offset' or 'origin'")
    return unit_offsets * scale


def pad_to_groups(a, L, axis):
    """a with ``axis`` zero-padded to G * L entries, G = ceil(length / L) (a itself when L divides it)."""
    xp = backend.get_array_module(a)
    k = a.shape[axis]
    extra = -(-k // L) * L - k
    if not extra:
        return a
    shape = list(a.shape)
    shape[axis] = extra
    return xp.concatenate([a, xp.zeros(shape, dtype=a.dtype)], axis=axis)


def split_groups(X, L):
    """(N, K) -> (N, G, L) with G = ceil(K / L); the last group is zero-padded."""
    return pad_to_groups(X, L, 1).reshape(X.shape[0], -(-X.shape[1] // L), L)


def project(Xg, planes):
    """Projections (N, G, H) of every neuron vector onto its group's H planes."""
    xp = backend.get_array_module(Xg, planes)
    n, g, L = Xg.shape
    if planes.shape[0] == 1:   # shared planes: one GEMM over all (row, group) vectors
        return (Xg.reshape(n * g, L) @ planes[0]).reshape(n, g, -1)
    return xp.matmul(Xg.transpose(1, 0, 2), planes).transpose(1, 0, 2)


def projection_stats(Xg, planes):
    """(mean, std) (Gp, H) of the projections of the vectors Xg (N, G, L) onto planes (Gp, L, H).

    Over every (row, group) for shared planes (Gp = 1), per group otherwise; on
    Xg's device (no host synchronisation). The mean is the projection of the mean
    vector (projecting is linear); the variance sums squared deviations from it,
    chunk by chunk like hash_codes, so a large common offset of the inputs cancels
    before squaring rather than after (E[p^2] - E[p]^2 would lose it in float32).
    """
    xp = backend.get_array_module(Xg, planes)
    n, g, L = Xg.shape
    gp, _, h = planes.shape
    axes = (0, 1) if gp == 1 else (0,)
    mean = project(Xg.mean(axis=axes).reshape(1, gp, L), planes)[0]            # (Gp, H)
    squares = xp.zeros((gp, h), dtype=mean.dtype)
    for rows in row_chunks(n, g, h):
        deviation = project(Xg[rows], planes) - mean
        squares += (deviation * deviation).sum(axis=axes).reshape(gp, h)
    return mean, xp.sqrt(squares / (n * g // gp))


def centred_offsets(unit_offsets, mean, std):
    """The 'centred' thresholds b (Gp, H) = mean + unit offsets * std of the projections."""
    return mean + unit_offsets * std


def principal_axes(Xg, shared):
    """(mean (Gp, L), std (Gp, L), axes (Gp, L, L)) of the vectors Xg (N, G, L).

    axes[g][:, j] is group g's j-th principal axis (by decreasing variance) and
    std[g, j] the standard deviation of the vectors along it; per group (Gp = G)
    or over the vectors of every group (shared: Gp = 1). Fitted on every k-th
    vector, at most PCA_FIT_VECTORS per group, on Xg's device (no host wait).
    """
    xp = backend.get_array_module(Xg)
    n, g, L = Xg.shape
    V = Xg.reshape(n * g, 1, L) if shared else Xg
    V = V[::max(1, -(-V.shape[0] // PCA_FIT_VECTORS))].transpose(1, 0, 2)      # (Gp, m, L)
    mean = V.mean(axis=1)
    D = V - mean[:, None, :]
    variance, axes = xp.linalg.eigh(D.transpose(0, 2, 1) @ D / D.shape[1])     # ascending
    return mean, xp.sqrt(xp.maximum(variance[:, ::-1], 0)), axes[:, :, ::-1]


def allot_cuts(std, H):
    """(axis (Gp, H), cut (Gp, H), cuts (Gp, L)): the principal axis that each of H bits cuts.

    Bit after bit goes to the axis whose cells are widest, std_j / (cuts_j + 1): in
    closed form, the H largest std_j / k over axes j and k = 1..H. Axis j then has
    cuts_j cuts, numbered cut = 1..cuts_j, and its bits are a thermometer code of
    cuts_j + 1 levels. Ties (equal spreads) go to the lower axis and the lower k: the sort
    is stable, so NumPy and CuPy allot the same cuts. No loop; no host wait on CuPy 14
    (CuPy 13's argsort synchronises with the host through Thrust, one reason 'pca'
    steps are never recorded as graphs: training.graphs.host_bound_setting).
    """
    xp = backend.get_array_module(std)
    gp, L = std.shape
    width = std[:, :, None] / xp.arange(1, H + 1, dtype=std.dtype)            # (Gp, L, H)
    top = xp.argsort(-width.reshape(gp, L * H), axis=1, kind="stable")[:, :H]
    axis, cut = top // H, top % H + 1
    cuts = (axis[:, :, None] == xp.arange(L)).sum(axis=1)
    return axis, cut, cuts


def pca_params(Xg, H, shared):
    """(planes (Gp, L, H), thresholds (Gp, H)) of the 'pca' family, fitted to the vectors Xg (N, G, L).

    The planes are principal axes of the vectors (principal_axes), the bits cuts
    along them (allot_cuts): axis j with c cuts is cut at its mean plus
    (k / (c + 1) - 1/2) * PCA_SPAN standard deviations, k = 1..c, so the codes are
    the cells of a grid over the main axes, finer along the axes the vectors
    spread most. Refitted on every call, like 'centred', and with no random draw.
    """
    xp = backend.get_array_module(Xg)
    mean, std, axes = principal_axes(Xg, shared)
    axis, cut, cuts = allot_cuts(std, H)
    planes = xp.take_along_axis(axes, axis[:, None, :], axis=2)                 # (Gp, L, H)
    levels = xp.take_along_axis(cuts, axis, axis=1) + 1
    spread = xp.take_along_axis(std, axis, axis=1)
    centre = (mean[:, None, :] @ planes)[:, 0, :]                                # mean . plane
    thresholds = centre + (cut / levels - 0.5).astype(Xg.dtype) * (PCA_SPAN * spread)
    return planes, thresholds


def code_dtype(H, xp):
    """The dtype of H-bit codes: uint32 up to 32 bits, uint64 beyond."""
    return xp.uint32 if H <= 32 else xp.uint64


def pack_bits(bits):
    """(..., H) booleans -> (...) codes of code_dtype(H), bit h worth 2**h.

    Packed as one dot product with the powers of two, exact while the sum fits
    the float's mantissa: float32 up to 24 bits, float64 (53) up to 32. Beyond,
    the low and the high 32 bits are packed apart and joined with a shift. A BLAS
    call, faster than a loop over the bits or summing shifted int64 bits.
    """
    xp = backend.get_array_module(bits)
    h = bits.shape[-1]
    if h > 32:
        low = pack_bits(bits[..., :32]).astype(xp.uint64)
        high = pack_bits(bits[..., 32:]).astype(xp.uint64)
        return low | (high << xp.uint64(32))
    dtype = xp.float32 if h <= 24 else xp.float64
    powers = 2.0 ** xp.arange(h, dtype=dtype)
    return (bits.astype(dtype) @ powers).astype(xp.uint32)


def row_chunks(n, g, h):
    """Slices of the N rows such that the (rows, G, H) projections hold at most HASH_CHUNK_ELEMENTS."""
    rows = max(1, HASH_CHUNK_ELEMENTS // (g * h))
    return [slice(start, start + rows) for start in range(0, n, rows)]


def hash_codes(Xg, planes, offsets):
    """Codes (N, G) of code_dtype(H): bit h of (n, g) is [Xg[n, g] . planes[g][:, h] > offsets[g, h]].

    planes (Gp, L, H) and offsets (Gp, H) with Gp = 1 (shared) or G. Rows are
    hashed in chunks so the projections never hold more than HASH_CHUNK_ELEMENTS.
    """
    xp = backend.get_array_module(Xg, planes, offsets)
    n, g, _ = Xg.shape
    h = planes.shape[-1]
    codes = xp.empty((n, g), dtype=code_dtype(h, xp))
    for rows in row_chunks(n, g, h):
        codes[rows] = pack_bits(project(Xg[rows], planes) > offsets)
    return codes
