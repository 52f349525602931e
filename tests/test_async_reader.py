"""backend.AsyncReader against a device that runs far behind the host (tests/fake_stream.py):
answers keep landing, eagerly and under replays of a recorded graph, and each answer's
tag is the request it came from."""
import numpy as np
import pytest

from minireuse import backend

from fake_stream import FakeArray, FakeDevice


@pytest.fixture
def fake_device(monkeypatch):
    def install(lag):
        device = FakeDevice(lag)
        monkeypatch.setattr(backend, "_cupy", device)
        monkeypatch.setattr(backend, "_gpu_checked", {"usable": True}, raising=False)
        return device
    return install


def test_answers_land_while_the_device_runs_many_requests_behind(fake_device):
    fake_device(lag=2 * 8)                       # 8 requests (a copy and an event each) behind
    reader = backend.AsyncReader(1, np.int32, xp=backend._cupy)
    tags, values, arrays = [], [], []
    for step in range(1, 41):
        arrays.append(FakeArray(np.array([step], np.int32)))    # alive until its copy ran
        reader.request(arrays[-1], step)
        got = reader.latest()
        if got is not None:
            values.append(int(got[0][0]))
            tags.append(got[1])
    assert tags and tags[-1] >= 40 - 8 and values == tags


def test_replays_that_never_synchronise_still_answer(fake_device):
    device = fake_device(lag=3 * 3)              # three replays behind
    reader = backend.AsyncReader(1, np.int32, xp=device)
    stats = FakeArray(np.zeros(1, np.int32))
    device.graph = []                            # record: the copy becomes part of the graph
    reader.request(stats, "captured")
    graph, device.graph = device.graph, None
    answers = []
    for step in range(1, 31):
        device.enqueue(lambda step=step: stats.values.__setitem__(0, step))   # the replay's kernels
        device.replay(graph)
        reader.replayed(step)
        got = reader.latest()
        if got is not None:
            answers.append((int(got[0][0]), got[1]))
    assert answers and answers[-1][1] >= 30 - 3
    assert all(value == tag for value, tag in answers)


def test_pinned_slots_start_at_zero(fake_device):
    fake_device(lag=0)
    host, _ = backend._pinned_slots(3, 2, np.float64)
    assert not host.any()
    reader = backend.AsyncReader(2, np.float64, xp=backend._cupy)
    reader.replayed("before any replay wrote")
    assert reader.wait() == (pytest.approx([0.0, 0.0]), "before any replay wrote")
