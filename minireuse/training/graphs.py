"""The whole training step recorded once as a CUDA graph and replayed every step (GPU only).

An eager CifarNet step is a few hundred kernel launches, each costing host time;
replaying a recorded graph is one launch. ``StepGraphs.run(xb, yb)`` replays the
step (forward, loss, backward, optimizer update, loss/accuracy sums) recorded for
the current settings, recording it first when needed, and returns False when the
caller must run this step eagerly instead.

What keeps a replay correct:

- static inputs: each batch is copied into buffers the graph reads (one
  device-to-device copy each); a batch of another shape (the last, smaller batch
  of an epoch) has its own graph, or runs eagerly during its warm-up;
- per-step values are read from device memory, never frozen launch arguments: the
  caller (step.Step, through the optimizer's and the layers' ``begin_step``) uploads
  the learning rate, Adam's bias corrections and the dropout key asynchronously
  before every step, replayed or not;
- memory: everything allocated while recording comes from a memory pool of that
  graph alone, kept as long as the graph, so later eager work never reuses the
  addresses the graph writes; parameters and optimizer state exist before
  recording and are updated in place;
- warm-up: a setting is recorded only after ``warmup`` eager steps with it
  (kernels compiled and loaded, cuBLAS set up, optimizer state created);
- outputs: the loss and accuracy sums are accumulated inside the graph into the
  trainer's persistent device array; reuse statistics recorded while capturing
  are summed inside the graph and handed to the layers by ``flush_stats``.

When it records again: the key of a graph is (input shapes and dtypes, every
conv/dense layer's reuse setting, ``measure_error`` included, and the table sizes
of that batch size's training call sites). A strategy that changes a setting, a
step that toggles error measurement, or a capacity the replays' statistics moved,
selects another key: its graph is recorded after its warm-up and kept, so
alternating settings (an error-sampling step every n steps) replay both graphs
instead of re-recording. At most ``max_graphs`` recordings live at once (each
holds its own memory pool); the least recently replayed one goes first.

What may be recorded: exact layers always; a deep-reuse layer when its step is free
of host synchronisation (``reuse_capturable``: the CUDA fast path is, the reference
path reads cluster counts on the host and is not). Mode 'auto' runs other steps
eagerly; mode 'on' raises GraphError. Sizes a reuse implementation fixes per call
(the CUDA path's cluster-table capacities) are frozen into a recording; an
implementation that wants a new recording when they change exposes them as
``ReuseState.capture_key()``.
"""
import warnings

import numpy as np

from .. import backend

MODES = ("auto", "on", "off")


class GraphError(RuntimeError):
    """A CUDA graph was required (--graph on) and cannot be used."""


def resolve_mode(mode, device):
    """'auto', 'on' or 'off' for a run on ``device``: graphs only ever run on the GPU."""
    if mode not in MODES:
        raise ValueError(f"graph must be one of {MODES}, got {mode!r}")
    if device != "gpu":
        if mode == "on":
            raise backend.DeviceError("graph 'on' records the training step as a CUDA graph, which needs a "
                                      "GPU; this run is on the CPU (use graph 'auto' or 'off')")
        return "off"
    return mode


def host_bound_setting(reuse):
    """Why a reuse setting's steps are never recorded, or None.

    dw_sample draws its rows on the host every step (a replay would freeze them);
    family 'pca' fits its planes with an eigendecomposition (cuSOLVER on a GPU)
    that is not known to be capturable.
    """
    if getattr(reuse, "dw_sample", 0) > 0:
        return "its dw_sample rows are drawn on the host every step"
    if getattr(reuse, "family", None) == "pca":
        return "its 'pca' planes are fitted by an eigendecomposition every step"
    return None


def reuse_capturable(layer):
    """Whether a deep-reuse layer's current step can be recorded.

    Its ReuseState says so with ``capturable`` (True, or the ReuseConfig it holds
    for); without that attribute, a layer whose last call ran the CUDA fast path
    (impl 'cuda', which never reads device values on the host) is taken as
    capturable, and the reference path (cluster counts read on the host) is not;
    neither is a setting that host_bound_setting names.
    """
    if host_bound_setting(layer.reuse):
        return False
    state = layer.reuse_state
    flag = getattr(state, "capturable", None)
    if flag is not None:
        return flag is True or (flag is not False and flag == layer.reuse)
    last = getattr(state, "last", None)
    return bool(last) and last.get("impl") == "cuda"


def uncapturable_layers(model):
    """Names of the layers whose current step cannot be recorded, with the reason."""
    out = []
    for layer in model.layers:
        reuse = getattr(layer, "reuse", None)
        if reuse is not None and reuse.enabled:
            if not reuse_capturable(layer):
                why = host_bound_setting(reuse) or "its deep-reuse implementation synchronises with the host"
                out.append(f"{layer.name} ({why})")
        elif not getattr(layer, "capturable", True):
            out.append(layer.name)
    return out


def settings_key(model, batch=None):
    """What a recorded step depends on besides input shapes: each conv/dense layer's reuse
    setting and its ReuseState's ``capture_key(batch)`` (e.g. the fast path's table sizes
    of the training call sites of this batch size: other batch sizes and evaluation
    calls do not change the key)."""
    key = []
    for layer in model.reuse_layers():
        state = layer.reuse_state if layer.reuse is not None else None
        extra = state.capture_key(batch) if state is not None else None
        key.append((layer.name, layer.reuse, extra))
    return tuple(key)


class _Recorded:
    """One recorded step: its graph, static inputs, private memory pool, statistic sums."""

    def __init__(self, cp, xb, yb):
        self.x, self.y = cp.empty_like(xb), cp.empty_like(yb)
        self.graph = self.pool = None
        self.stat_sums = []          # (ReuseState, template entry, {field: device sum})
        self.unflushed = 0           # replays since the last flush_stats

    def copy_in(self, xb, yb, stream):
        for dst, src in ((self.x, xb), (self.y, yb)):
            if src.flags.c_contiguous:
                dst.data.copy_from_device_async(src.data, src.nbytes, stream)
            else:
                dst[...] = src


class StepGraphs:
    """Recorded training steps of one run, keyed by batch shapes and layer settings.

    body(x, y): the step on static inputs (no host synchronisation; it must leave
    its results in persistent device arrays). The caller advances the step's per-step
    device state before ``run``. All steps of the run, eager ones included, must be
    issued on ``self.stream`` (``with graphs.stream:``).
    """

    MAX_GRAPHS = 4

    def __init__(self, body, model, mode="auto", warmup=1, max_graphs=MAX_GRAPHS):
        if mode not in ("auto", "on"):
            raise ValueError(f"StepGraphs mode must be 'auto' or 'on', got {mode!r}")
        if max_graphs < 1:
            raise ValueError(f"StepGraphs max_graphs must be at least 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.cp = backend.require_gpu()
        self.body, self.model = body, model
        self.mode, self.warmup = mode, warmup
        # a blocking stream: capture is not allowed on the legacy default stream, and
        # a blocking stream stays ordered with work issued there (data set-up, copies)
        self.stream = self.cp.cuda.Stream()
        self.graphs = {}
        self.warm = {}
        self.failed = {}
        self._failed_pools = []     # arrays of a failed recording may still point into them
        self.recordings = self.replays = self.evictions = 0

    def key(self, xb, yb):
        return (xb.shape, xb.dtype.str, yb.shape, yb.dtype.str, settings_key(self.model, xb.shape[0]))

    def run(self, xb, yb):
        """Replay the step for this batch (recording it first when due); False: run it eagerly."""
        key = self.key(xb, yb)
        rec = self.graphs.get(key)
        if rec is None:
            if key in self.failed:
                return False
            if self.warm.get(key, 0) < self.warmup:
                self.warm[key] = self.warm.get(key, 0) + 1
                return False
            blockers = uncapturable_layers(self.model)
            if blockers:
                if self.mode == "on":
                    raise GraphError("graph 'on': the training step cannot be recorded as a CUDA graph because of "
                                     f"{', '.join(blockers)}; use graph 'auto' (those steps run eagerly) or 'off'")
                return False
            rec = self._record(key, xb, yb)
            if rec is None:
                return False
        else:
            self.graphs[key] = self.graphs.pop(key)      # most recently used last
        with self.stream:
            rec.copy_in(xb, yb, self.stream)
            rec.graph.launch(self.stream)
            for layer in self.model.reuse_layers():      # statistics the replay copies back
                if layer.reuse_state is not None:
                    layer.reuse_state.after_replay(xb.shape[0])
        rec.unflushed += 1
        self.replays += 1
        return True

    def _evict(self):
        """Drop the least recently used recordings beyond max_graphs - 1 (their statistics
        are handed over first; each recording holds its memory pool)."""
        while len(self.graphs) >= self.max_graphs:
            self.flush_stats()
            oldest = next(iter(self.graphs))
            del self.graphs[oldest]
            self.warm.pop(oldest, None)
            self.evictions += 1

    def _record(self, key, xb, yb):
        cp = self.cp
        self._evict()
        rec = _Recorded(cp, xb, yb)
        states = [l.reuse_state for l in self.model.reuse_layers() if l.reuse_state is not None]
        before = [s.stats_count() for s in states]
        pool = cp.cuda.MemoryPool()
        error, graph = None, None
        with self.stream:
            with cp.cuda.using_allocator(pool.malloc), backend.capturing() as capture:
                self.stream.begin_capture()
                try:
                    self.body(rec.x, rec.y)
                    rec.stat_sums = self._sum_statistics(states, before)
                except Exception as e:   # an operation that synchronises, or any other failure
                    error = e
                finally:
                    try:
                        graph = self.stream.end_capture()
                    except Exception as e:
                        error = error or e
            for s, n in zip(states, before):   # what capturing recorded was no step
                s.forget_stats_since(n)
            if error is not None:
                reason = f"{type(error).__name__}: {error}"
                if self.mode == "on":
                    raise GraphError(f"recording the training step as a CUDA graph failed: {reason}") from error
                warnings.warn(f"recording the training step as a CUDA graph failed ({reason}); "
                              "steps with these settings run eagerly", RuntimeWarning, stacklevel=3)
                self.failed[key] = reason
                self._failed_pools.append(pool)
                return None
            for _, _, sums in rec.stat_sums:
                for s in sums.values():
                    s.fill(0)
        capture.succeeded()
        rec.graph, rec.pool = graph, pool
        self.graphs[key] = rec
        self.recordings += 1
        return rec

    def _sum_statistics(self, states, before):
        """Inside the capture: add each device-valued statistic the step recorded into a sum
        (allocated here, zeroed after the capture), so every replay counts."""
        cp = self.cp
        out = []
        for state, n in zip(states, before):
            for entry in state.stats_since(n):
                sums = {}
                for field, value in entry.items():
                    if backend.is_cupy_array(value):
                        sums[field] = cp.empty(value.shape, dtype=np.float64)
                        sums[field] += value
                out.append((state, dict(entry), sums))
        return out

    def flush_stats(self):
        """Hand the reuse statistics of the replays since the last flush to the layers'
        ReuseStates (means over the replays, once per replay); synchronises."""
        for rec in self.graphs.values():
            n, rec.unflushed = rec.unflushed, 0
            if n == 0:
                continue
            for state, template, sums in rec.stat_sums:
                entry = dict(template)
                for field, s in sums.items():
                    entry[field] = backend.asnumpy(s) / n
                    s.fill(0)
                state.add_replayed_stats(entry, n)
