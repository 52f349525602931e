"""The capacity side of the CUDA fast path: workspace and the cluster tables' capacities.

- workspace: ``Arena`` carves typed arrays from one allocation (one memset);
- capacity: ``CapacityTracker`` sizes the cluster tables of one call site from the
  statistics of earlier calls, without ever waiting for the GPU; ``CudaState``, kept in
  ReuseState.fast_path, holds the trackers of a layer's call sites.
"""
import math

import numpy as np

from ... import backend
from .runtime import STAT_COUNT, STAT_MAX_DISTINCT, STAT_OVERFLOW, STAT_TABLE_FULL, device


# ---------------------------------------------------------------- workspace

class Arena:
    """Typed arrays carved from one allocation, so one memset clears them all."""

    ALIGN = 256

    def __init__(self):
        self._parts = []
        self.nbytes = 0

    def add(self, name, shape, dtype):
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        self._parts.append((name, shape, dtype, self.nbytes))
        size = int(np.prod(shape)) * dtype.itemsize
        self.nbytes += -(-size // self.ALIGN) * self.ALIGN
        return self

    def allocate(self, fill_byte=0):
        """dict name -> array, every byte set to fill_byte (one memset)."""
        d = device()
        buf = d.xp.empty(max(self.nbytes, self.ALIGN), dtype=np.uint8)
        d.memset(buf, fill_byte)
        return {name: d.carve(buf, off, shape, dtype) for name, shape, dtype, off in self._parts}


# ---------------------------------------------------------------- capacity

def round_capacity(need, limit):
    """The next size of the form {4,5,6,7} * 2**e >= need (at least 32), at most limit."""
    need = max(32, int(math.ceil(need)))
    e = max(0, need.bit_length() - 3)
    cap = -(-need // (1 << e)) * (1 << e)
    return max(1, min(cap, limit))


class CapacityTracker:
    """Clusters per group of one call site (a shape, training or evaluation), sized from earlier calls.

    Calibration: the first call that is not being captured hashes its rows into a
    table of the largest capacity and reads the distinct count (the one host wait
    of a call site's life); the capacity starts at HEADROOM times that.
    Afterwards the statistics of every call (max distinct codes per group, overflow
    and table-full counts) go back to the host through a ring of pinned slots
    (``device().reader``); each call reads the newest slot whose copy has landed and
    never waits, so a GPU running several calls behind still feeds capacity back
    (with that lag). A captured call copies into the reader's own device array inside
    the graph; ``after_replay`` queues that array's copy into the ring after each
    replay and reads the newest landed slot, so replays adapt capacity too (a changed
    capacity selects another recording).
    The capacity grows to HEADROOM x the observed need when a group overflowed or
    came within the margin, and shrinks when SHRINK x too large; a table that filled
    up doubles it.
    """

    HEADROOM = 1.25
    SHRINK = 2

    def __init__(self, rows, H, batch=None, train=True):
        self.limit = max(1, min(rows, 1 << H))
        self.rows = rows
        self.batch, self.train = batch, train
        self.capacity = None        # None until calibrated
        self.last = None            # the statistics last read: STAT_* vector
        self._reader = None
        self._calls = 0
        self._applied = 0
        self.captured = False       # a recorded graph copies this call site's statistics

    def fallback_capacity(self):
        """Capacity of a call that cannot calibrate (captured before any eager call)."""
        return round_capacity(max(1024, self.rows // 8), self.limit)

    def calibrate(self, need):
        """Set the capacity from a measured need (distinct codes of the largest group)."""
        self.capacity = round_capacity(max(1, need) * self.HEADROOM, self.limit)
        return self.capacity

    def begin_call(self):
        """The capacity for this call (None: calibrate first), after reading statistics that landed."""
        if not device().capturing():
            self.poll()
        return self.capacity

    def poll(self):
        """Apply the newest statistics that landed and were not applied yet."""
        if self._reader is None:
            return
        got = self._reader.latest()
        if got is None or got[1] is None or got[1] <= self._applied:
            return
        stats, self._applied = got
        self.last = np.asarray(stats).copy()
        if self.capacity is not None:
            self.capacity = self.next_capacity(self.last, self.capacity, self.limit)

    def overflowed(self):
        """Whether the newest statistics read showed rows computed exactly (overflow or a full
        table): the backward then computes their dW with one GEMM instead of atomics."""
        return self.last is not None and int(self.last[STAT_OVERFLOW]) > 0

    @classmethod
    def next_capacity(cls, stats, capacity, limit):
        need = int(stats[STAT_MAX_DISTINCT])
        if stats[STAT_TABLE_FULL] > 0:
            need = max(need, 2 * capacity)
        if need * cls.HEADROOM > capacity or need * cls.SHRINK < capacity:
            return round_capacity(need * cls.HEADROOM, limit)
        return capacity

    def end_call(self, stats):
        """Queue the asynchronous copy of this call's statistics (captured into a graph when capturing)."""
        if self._reader is None:
            self._reader = device().reader(STAT_COUNT)
        self._calls += 1
        if device().capturing():
            # only a recording that ended well is ever replayed: a failed one (graph 'auto'
            # then runs eagerly) must not make later replays read what it never wrote
            backend.on_capture_success(self._mark_captured)
        self._reader.request(stats, self._calls)

    def _mark_captured(self):
        self.captured = True

    def after_replay(self):
        """A graph that captured this call site was replayed: read its statistics when they land."""
        if self.captured and self._reader is not None:
            self._calls += 1
            self._reader.replayed(self._calls)
            self.poll()


class CudaState:
    """What the CUDA path keeps in ReuseState.fast_path: the capacity trackers of its call sites."""

    def __init__(self):
        self.trackers = {}

    def tracker(self, key, rows, H, batch=None, train=True):
        key = tuple(key) + ("train" if train else "eval",)
        if key not in self.trackers:
            self.trackers[key] = CapacityTracker(rows, H, batch, train)
        return self.trackers[key]

    def capture_key(self, batch=None):
        """The capacities a recorded training step freezes: ((call site, capacity), ...) of the
        training call sites of this batch size (all training call sites when batch is None)."""
        return tuple(sorted((key, t.capacity) for key, t in self.trackers.items()
                            if t.train and (batch is None or t.batch == batch)))

    def after_replay(self, batch=None):
        for t in self.trackers.values():
            if t.train and (batch is None or t.batch == batch):
                t.after_replay()


def cuda_state(state):
    if not isinstance(state.fast_path, CudaState):
        state.fast_path = CudaState()
    return state.fast_path
