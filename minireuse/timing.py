"""Per-layer timers that never wait on the GPU inside a step.

On the CPU a timer reads perf_counter around each call. On the GPU it records
a pair of CUDA events around each call and only reads them in ``collect()``
(once per epoch), so timing adds no host synchronisation to a step.
"""
import time
from collections import defaultdict

from . import backend


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
