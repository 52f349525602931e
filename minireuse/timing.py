"""Every timer of minireuse: CUDA event pairs on the GPU, perf_counter on the CPU.

- ``Clock``: times calls and reads them all at the end (benchmarks);
- ``timed(fn)``: one call, waited for (layer benchmarks, scripts);
- ``LayerTimer``: per-layer forward/backward times of training steps, read once
  per epoch, so timing adds no host synchronisation to a step.
"""
import time
from collections import defaultdict

from . import backend


class Clock:
    """Times in ms of the calls passed to ``time``: CUDA events on ``stream`` (the current
    stream when None), read once by ``times()``; on the CPU, perf_counter."""

    def __init__(self, gpu=None, stream=None):
        self.gpu = backend.device() == "gpu" if gpu is None else gpu
        self.stream = stream
        self.marks = []

    def time(self, fn, *args):
        """fn(*args), timed; returns its result."""
        if self.gpu:
            cp = backend.require_gpu()
            stream = self.stream or cp.cuda.get_current_stream()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            out = fn(*args)
            end.record(stream)
            self.marks.append((start, end))
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            self.marks.append(1e3 * (time.perf_counter() - t0))
        return out

    def times(self):
        """ms of every timed call (waits for the last one on the GPU)."""
        if not self.gpu:
            return list(self.marks)
        cp = backend.require_gpu()
        if self.marks:
            self.marks[-1][1].synchronize()
        return [cp.cuda.get_elapsed_time(a, b) for a, b in self.marks]


def timed(fn):
    """(milliseconds, fn()) of one call, waited for."""
    clock = Clock()
    out = clock.time(fn)
    return clock.times()[0], out


class LayerTimer:
    def __init__(self, names):
        self.names = set(names)
        self.gpu = backend.device() == "gpu"
        self._pending = defaultdict(list)   # (layer, phase) -> [(start, end)] events or seconds
        self._open = None
        self._last_event = None

    def start(self, name, phase):
        if name not in self.names:
            return
        if self.gpu:
            cp = backend.require_gpu()
            ev = cp.cuda.Event()
            ev.record()
            self._open = (name, phase, ev)
        else:
            self._open = (name, phase, time.perf_counter())

    def stop(self, name):
        if self._open is None or self._open[0] != name:
            return
        _, phase, begin = self._open
        if self.gpu:
            cp = backend.require_gpu()
            end = cp.cuda.Event()
            end.record()
            self._pending[(name, phase)].append((begin, end))
            self._last_event = end
        else:
            self._pending[(name, phase)].append(time.perf_counter() - begin)
        self._open = None

    def mark(self, name, phase):
        """A position in the calls of (name, phase) since the last collect: ``since(mark)``
        gives the calls after it."""
        return len(self._pending.get((name, phase), ()))

    def since(self, name, phase, mark):
        """The timings (opaque: read them with ``seconds``) of the calls of (name, phase) after
        ``mark``; valid until the next collect."""
        return list(self._pending.get((name, phase), ())[mark:])

    def seconds(self, timings):
        """Total seconds of timings from ``since`` (waits for them on the GPU)."""
        if not timings:
            return 0.0
        if not self.gpu:
            return float(sum(timings))
        cp = backend.require_gpu()
        timings[-1][1].synchronize()
        return sum(cp.cuda.get_elapsed_time(a, b) for a, b in timings) / 1e3

    def collect(self):
        """{(layer, phase): (total seconds, calls)} since the last collect; clears."""
        out = {}
        if self.gpu and self._pending:
            cp = backend.require_gpu()
            self._last_event.synchronize()
            for key, pairs in self._pending.items():
                out[key] = (sum(cp.cuda.get_elapsed_time(a, b) for a, b in pairs) / 1e3, len(pairs))
        else:
            out = {key: (sum(v), len(v)) for key, v in self._pending.items()}
        self._pending = defaultdict(list)
        return out
