"""A stand-in for the few CuPy calls of backend.AsyncReader / DeviceScalars on a CPU-only
machine: a device that runs the queued copies and event records only as far as the test
lets it, so a host running many operations ahead of the GPU can be played out exactly."""
import ctypes
import types

import numpy as np


class FakeArray:
    """A 'device' array: host memory the queued copies read and write by address."""

    def __init__(self, values):
        self.values = np.ascontiguousarray(values)
        self.dtype, self.size, self.shape = self.values.dtype, self.values.size, self.values.shape
        self.flags = self.values.flags
        self.data = types.SimpleNamespace(ptr=self.values.ctypes.data)


class FakeEvent:
    def __init__(self, device):
        self.device, self.done = device, False

    def record(self, stream=None):
        self.done = False
        self.device.enqueue(lambda: setattr(self, "done", True), self)

    def synchronize(self):
        self.device.run_until(self)


class FakeDevice:
    """One stream. ``lag``: how many queued operations the device leaves unrun after each
    new one (the GPU that far behind the host). Work issued while ``graph`` is a list is
    recorded there instead (a capture); ``replay(graph)`` queues it again."""

    memcpyDeviceToHost, memcpyDeviceToDevice, memcpyHostToDevice = 2, 3, 1

    def __init__(self, lag=0):
        self.lag, self.queue, self.graph = lag, [], None
        stream = types.SimpleNamespace(ptr=0, is_capturing=lambda: self.graph is not None)
        runtime = types.SimpleNamespace(memcpyAsync=self.memcpy_async, memcpyDeviceToHost=2,
                                        memcpyDeviceToDevice=3, memcpyHostToDevice=1)
        self.cuda = types.SimpleNamespace(
            runtime=runtime, get_current_stream=lambda: stream, Event=lambda **_: FakeEvent(self),
            alloc_pinned_memory=lambda n: bytearray(b"\xab" * n))     # uninitialised, as pinned memory is

    def zeros(self, n, dtype):
        return FakeArray(np.zeros(n, dtype))

    def memcpy_async(self, dst, src, nbytes, kind, stream):
        op = lambda: ctypes.memmove(dst, src, nbytes)
        if self.graph is not None:
            self.graph.append(op)
        else:
            self.enqueue(op)

    def enqueue(self, op, marker=None):
        self.queue.append((op, marker))
        while len(self.queue) > self.lag:
            self.queue.pop(0)[0]()

    def run_until(self, marker):
        while any(m is marker for _, m in self.queue):
            self.queue.pop(0)[0]()

    def replay(self, graph):
        for op in graph:
            self.enqueue(op)
