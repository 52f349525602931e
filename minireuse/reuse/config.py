"""Deep-reuse settings (ReuseConfig) and per-layer mutable state (ReuseState).

A ReuseConfig is a frozen value: the adaptive schedule swaps whole configs
between steps (``config.replace(H=20)``). A ReuseState belongs to one layer and
keeps what must survive between calls: the hash planes on the right device, a
state of the GPU fast path, and the statistics of every call.
"""
import dataclasses

import numpy as np

from .. import backend
from . import lsh

FAMILIES = ("offset", "origin", "centred", "pca")
DX_MODES = ("exact", "cluster")
FORWARDS = ("reuse", "exact")
IMPLS = ("auto", "reference", "cuda")
MAX_H = 64


def _bad(field, value, expected):
    return ValueError(f"ReuseConfig.{field}: got {value!r}, expected {expected}")


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class ReuseConfig:
    """One deep-reuse setting of a layer.

    L: sub-vector (group) length; H: hash bits per group (1..64; codes are uint32
    up to 32 bits, uint64 beyond);
    family: 'offset' (planes with offsets at the scale of the input), 'origin'
    (random hyperplanes through the origin, the published family), 'centred'
    (thresholds at the mean of each projection plus its unit offset times its std,
    over the vectors hashed in the call) or 'pca' (no random planes: cuts along the
    principal axes of the vectors hashed in the call, more along the axes they
    spread most; lsh.pca_params);
    dx_mode: 'exact' (dY @ W^T) or 'cluster' (gradient of the clustered forward);
    shared_planes: one set of H planes for every group (False: one per group);
    pixel_aligned: conv only; 'auto' uses it when L divides c_in and planes are shared;
    measure_error: also compute the exact product and record the relative error (0
    with forward 'exact'), and in the backward how the reuse gradients compare with
    the exact ones: dW's cosine and gain ('dw_cos', 'dw_gain'), and dX's where it is
    clustered ('dx_cos', 'dx_gain'; gain = <reuse, exact> / <exact, exact>, the share
    of the exact gradient that reaches the update);
    impl: 'auto' (CUDA kernels for cupy arrays when they load), 'reference', 'cuda';
    forward: 'reuse' (the clustered product) or 'exact' (the exact product, with the
    inputs still hashed and clustered so that the backward reuses the clusters);
    dw_sample: fraction p of the product's rows (im2col rows / output pixels) whose exact
    residual x - centroid corrects the reuse dW: every round(1/p)-th row from a random
    start, scaled by round(1/p), so dW is the centroid dW plus an unbiased estimate of
    what it misses (0: off; 1: the exact dW). The start comes from ReuseState's
    generator, which the trainer reseeds every step.
    """

    L: int = 16
    H: int = 12
    family: str = "offset"
    dx_mode: str = "exact"
    enabled: bool = True
    shared_planes: bool = True
    pixel_aligned: object = "auto"
    seed: int = 0
    measure_error: bool = False
    impl: str = "auto"
    forward: str = "reuse"
    dw_sample: float = 0.0

    def __post_init__(self):
        if not _is_int(self.L) or self.L < 1:
            raise _bad("L", self.L, "an int >= 1")
        if not _is_int(self.H) or not 1 <= self.H <= MAX_H:
            raise _bad("H", self.H, f"an int in 1..{MAX_H}")
        if self.family not in FAMILIES:
            raise _bad("family", self.family, f"one of {FAMILIES}")
        if self.dx_mode not in DX_MODES:
            raise _bad("dx_mode", self.dx_mode, f"one of {DX_MODES}")
        for name in ("enabled", "shared_planes", "measure_error"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _bad(name, getattr(self, name), "True or False")
        if not (isinstance(self.pixel_aligned, (bool, np.bool_)) or self.pixel_aligned == "auto"):
            raise _bad("pixel_aligned", self.pixel_aligned, "'auto', True or False")
        if not _is_int(self.seed) or self.seed < 0:
            raise _bad("seed", self.seed, "an int >= 0")
        if self.impl not in IMPLS:
            raise _bad("impl", self.impl, f"one of {IMPLS}")
        if self.forward not in FORWARDS:
            raise _bad("forward", self.forward, f"one of {FORWARDS}")
        if (isinstance(self.dw_sample, (bool, np.bool_)) or not isinstance(self.dw_sample, (int, float, np.number))
                or not 0.0 <= float(self.dw_sample) <= 1.0):
            raise _bad("dw_sample", self.dw_sample, "a number in [0, 1]")

    @classmethod
    def coerce(cls, value):
        """A ReuseConfig from a ReuseConfig, a dict of its fields, or True (the defaults)."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"ReuseConfig: unknown field(s) {unknown}; expected some of {sorted(names)}")
            return cls(**value)
        raise ValueError(f"ReuseConfig.coerce: got {value!r}, expected a ReuseConfig, a dict of its fields "
                         "or True")

    def check_fits(self, layer):
        """Raise ValueError, with the layer's numbers, unless this setting can run on ``layer``
        (a Conv2D or Dense): L at most the width K of its rows (kh x kw x c_in, or n_in), since a
        wider L only pads every row with zeros at L / K times the memory; pixel_aligned True
        only on a conv whose input channels L divides."""
        shape = tuple(layer.params["W"].shape)
        K = int(np.prod(shape[:-1]))
        if self.L > K:
            width = " x ".join(str(d) for d in shape[:-1]) + f" = {K}" if len(shape) > 2 else str(K)
            raise ValueError(f"reuse setting of layer {layer.name}: L={self.L} is wider than the layer's rows "
                             f"(K = {width}); expected L <= {K}")
        c_in = getattr(layer, "c_in", None)
        if self.pixel_aligned is True and (c_in is None or c_in % self.L):
            raise ValueError(f"reuse setting of layer {layer.name}: pixel_aligned True needs a conv layer whose "
                             f"input channels L divides (L={self.L}, c_in={c_in}); use 'auto' or False")

    def replace(self, **changes):
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return dataclasses.asdict(self)


class ReuseState:
    """Per-layer state: cached hash parameters, the fast path's state, call statistics.

    Every forward implementation (reference or CUDA) calls ``record`` once per call;
    with measure_error the backward adds 'dw_cos', 'dw_gain' (and 'dx_cos', 'dx_gain'
    with dx_mode 'cluster') to the entry its forward recorded. Training calls and evaluation calls (``train=False``) are kept
    apart: ``stats`` / ``pop_stats()`` and ``eval_stats`` / ``pop_stats(train=False)``. r_c is clusters per hashed vector: im2col neuron vectors on
    the general path, pixel slices on the pixel-aligned path.
    Statistics stay on the device as they are recorded (no host synchronisation in
    a training step); ``pop_stats`` converts them to floats and clears the list.
    """

    def __init__(self):
        self._hash_params = {}
        self.fast_path = None     # owned by the CUDA fast path (its call sites' table sizes)
        self.stats = []           # one dict per training call since the last pop_stats()
        self.eval_stats = []      # the same for evaluation calls (train=False)
        self.last = None          # the most recent entry of either
        self._rng = None          # draws dw_sample's rows; reseed() sets it every training step

    def hash_params(self, L, H, G, family, seed, shared, xp, dtype, pad_to=None):
        """(planes (Gp, L, H), unit offsets (Gp, H)) as xp arrays of dtype, drawn once per key.

        pad_to: return them zero-padded from H to pad_to bits instead (the CUDA kernels'
        compiled bit widths); the one cache of hash parameters for both paths."""
        key = (L, H, G, family, seed, shared, xp.__name__, np.dtype(dtype).str, pad_to)
        if key not in self._hash_params:
            if pad_to is None:
                planes, unit_offsets = lsh.draw_hash_params(L, H, G, seed, shared)
                self._hash_params[key] = (xp.asarray(planes, dtype=dtype), xp.asarray(unit_offsets, dtype=dtype))
            else:
                self._hash_params[key] = lsh.pad_bits(*self.hash_params(L, H, G, family, seed, shared, xp, dtype),
                                                      pad_to)
        return self._hash_params[key]

    def reseed(self, seed):
        """Seed the generator of dw_sample's rows (the trainer passes (seed, epoch, step), like dropout's)."""
        self._rng = np.random.default_rng(seed)

    def sample_rows(self, n, fraction):
        """(start, step) of dw_sample's systematic sample: rows start, start + step, ... of n,
        step = round(1 / fraction), start drawn uniformly in [0, step) from the state's
        generator (seeded with 0 until reseeded). Every row is sampled with probability
        1 / step, so step times the sampled sum estimates the full sum without bias; the
        rows are an arange on any device (no index upload)."""
        if self._rng is None:
            self._rng = np.random.default_rng(0)
        step = max(1, min(n, int(round(1.0 / fraction))))
        return int(self._rng.integers(step)), step

    def capture_key(self, batch=None):
        """What a captured training step of this batch size freezes besides the setting (the
        fast path's table sizes), or None when this layer has not run the fast path."""
        key = getattr(self.fast_path, "capture_key", None)
        return key(batch) if key is not None else None

    def after_replay(self, batch=None):
        """A recorded training step of this batch size was replayed (the fast path reads the
        statistics the replay copies back and adapts its table sizes)."""
        hook = getattr(self.fast_path, "after_replay", None)
        if hook is not None:
            hook(batch)

    def record(self, r_c, n_clusters, impl, pixel_aligned=False, rel_error=None, train=True, **extra):
        """Store one call's statistics; r_c and rel_error may be device scalars."""
        entry = dict(r_c=r_c, n_clusters=n_clusters, rel_error=rel_error,
                     pixel_aligned=bool(pixel_aligned), impl=impl, **extra)
        (self.stats if train else self.eval_stats).append(entry)
        self.last = entry
        return entry

    # the statistics' protocol of a step recorded once and replayed (training.graphs)
    def stats_count(self):
        """How many training calls are recorded (a mark for stats_since and forget_stats_since)."""
        return len(self.stats)

    def stats_since(self, mark):
        """The training calls' entries recorded after ``mark``."""
        return self.stats[mark:]

    def forget_stats_since(self, mark):
        """Drop the entries recorded after ``mark`` (those of a recording, which was no step)."""
        del self.stats[mark:]

    def add_replayed_stats(self, entry, times):
        """``entry`` for each of ``times`` replayed training calls."""
        self.stats.extend([entry] * times)
        self.last = entry

    def pop_stats(self, train=True):
        """Means over the training (or, train=False, evaluation) calls since the last pop
        (host floats), then forget them.

        Returns {} when nothing was recorded, else calls, r_c, clusters_per_group
        (mean n_g), rel_error, dw_cos, dw_gain, dx_cos and dx_gain (means over the
        calls that measured them, or None), pixel_aligned (fraction of calls) and impl (the last one).
        """
        if train:
            entries, self.stats = self.stats, []
        else:
            entries, self.eval_stats = self.eval_stats, []
        if not entries:
            return {}
        return dict(
            calls=len(entries),
            r_c=float(np.mean([float(backend.asnumpy(e["r_c"])) for e in entries])),
            clusters_per_group=float(np.mean([backend.asnumpy(e["n_clusters"]).mean() for e in entries])),
            rel_error=_mean_measured(entries, "rel_error"),
            dw_cos=_mean_measured(entries, "dw_cos"),
            dw_gain=_mean_measured(entries, "dw_gain"),
            dx_cos=_mean_measured(entries, "dx_cos"),
            dx_gain=_mean_measured(entries, "dx_gain"),
            pixel_aligned=float(np.mean([e["pixel_aligned"] for e in entries])),
            impl=entries[-1]["impl"],
        )


def _mean_measured(entries, key):
    """Mean (host float) of entry[key] over the entries that hold a value for it, or None."""
    values = [float(backend.asnumpy(e[key])) for e in entries if e.get(key) is not None]
    return float(np.mean(values)) if values else None
