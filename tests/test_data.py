"""CIFAR-10 loading, restricted unpickling, download checks, normalisation,
augmentation and batching. Everything runs on small fixtures under tmp_path."""
import hashlib
import io
import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest

from cifar_fixture import dumps, write_cifar_fixture
from minireuse import backend
from minireuse.data import (CIFAR10_MEAN, CIFAR10_STD, OFFICIAL_MD5, OFFICIAL_URL, BatchIterator,
                            CorruptDataError, DataNotFoundError, channel_stats, check_archive,
                            crop_flip, limit, load_cifar10, normalize, random_crop_flip,
                            safe_load_pickle, verify_md5)


@pytest.fixture(params=["cpu", "gpu"])
def device(request):
    """Runs a test body once per backend; the GPU case is skipped without a usable GPU."""
    if request.param == "gpu" and not backend.gpu_available():
        pytest.skip("no usable GPU (cupy missing or no CUDA device)")
    previous = backend.device()
    backend.set_device(request.param)
    yield request.param
    backend.set_device(previous)


@pytest.fixture
def no_network(monkeypatch):
    """urlopen fails as it does on a machine without network; records the URLs asked for."""
    asked = []

    def refuse(url, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return asked


class FakeResponse(io.BytesIO):
    """What urlopen returns, serving fixed bytes, optionally failing part way."""

    def __init__(self, payload, fail_after=None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}
        self.fail_after = fail_after

    def read(self, size=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def serve(monkeypatch, payload, fail_after=None):
    asked = []

    def opener(url, *args, **kwargs):
        asked.append(url)
        return FakeResponse(payload, fail_after)

    monkeypatch.setattr(urllib.request, "urlopen", opener)
    return asked


def fixture_archive_bytes(tmp_path):
    src = tmp_path / "src"
    expected = write_cifar_fixture(src, n_per_batch=3, archive=True, seed=3)
    return (src / "cifar-10-python.tar.gz").read_bytes(), expected


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("python2_strings", [False, True])
@pytest.mark.parametrize("layout", ["folder", "folder_itself", "archive"])
def test_layouts_load_as_nhwc(tmp_path, no_network, layout, python2_strings):
    expected = write_cifar_fixture(tmp_path, n_per_batch=4, n_test=3, archive=layout == "archive",
                                   seed=1, python2_strings=python2_strings)
    data_dir = tmp_path / "cifar-10-batches-py" if layout == "folder_itself" else tmp_path
    got = load_cifar10(data_dir)
    assert [a.shape for a in got] == [(20, 32, 32, 3), (20,), (3, 32, 32, 3), (3,)]
    assert [a.dtype for a in got] == [np.uint8, np.int64, np.uint8, np.int64]
    assert all(a.flags["C_CONTIGUOUS"] for a in got)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert no_network == []


def test_pixel_mapping_from_planar_rows(tmp_path):
    write_cifar_fixture(tmp_path, n_per_batch=5, seed=2)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x_train, y_train, _, _ = load_cifar10(tmp_path, download=False)
    k = 3  # image 3 of data_batch_2 is image 5 + 3 of the training set
    row = raw[b"data"][k]
    for c, y, x in [(0, 0, 0), (0, 1, 30), (1, 7, 2), (2, 31, 5), (2, 4, 31)]:
        assert x_train[5 + k, y, x, c] == row[c * 1024 + y * 32 + x]
    assert y_train[5 + k] == raw[b"labels"][k]


def test_archive_with_unofficial_md5_is_read(tmp_path):
    write_cifar_fixture(tmp_path, n_per_batch=2, archive=True)
    assert not verify_md5(tmp_path / "cifar-10-python.tar.gz", OFFICIAL_MD5)
    assert load_cifar10(tmp_path, download=False)[0].shape == (10, 32, 32, 3)


def test_corrupt_batch_is_named(tmp_path):
    write_cifar_fixture(tmp_path, n_per_batch=2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(CorruptDataError, match=r"data_batch_3.*\(n, 3072\).*\(2, 3000\)"):
        load_cifar10(tmp_path, download=False)
    path.write_bytes(dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(CorruptDataError, match=r"data_batch_3.*labels must lie in \[0, 10\)"):
        load_cifar10(tmp_path, download=False)
    path.write_bytes(b"not a pickle")
    with pytest.raises(CorruptDataError, match="data_batch_3.*not a readable CIFAR-10 pickle"):
        load_cifar10(tmp_path, download=False)


def test_archive_missing_a_batch_is_refused(tmp_path):
    import tarfile
    write_cifar_fixture(tmp_path, n_per_batch=2)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py" / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(CorruptDataError, match=r"cifar-10-python.tar.gz: the archive lacks .*test_batch"):
        load_cifar10(tmp_path, download=False)


# ---------------------------------------------------------------- restricted unpickler

class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload, refused", [(_RunsShell, "system"), (_CallsEval, r"__builtin__\.eval")])
def test_malicious_pickle_is_refused(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": payload(marker), b"labels": []}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=f"refused global .*{refused}"):
        safe_load_pickle(io.BytesIO(blob))
    assert not marker.exists()


def test_malicious_batch_file_is_refused_by_loader(tmp_path):
    write_cifar_fixture(tmp_path, n_per_batch=2)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": _RunsShell(marker)}, protocol=2))
    with pytest.raises(CorruptDataError, match="test_batch.*refused global"):
        load_cifar10(tmp_path, download=False)
    assert not marker.exists()


def test_only_the_latin1_codec_is_allowed():
    blob = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x0a\x00\x00\x00zlib_codec\x86R."
    with pytest.raises(pickle.UnpicklingError, match="zlib_codec"):
        safe_load_pickle(io.BytesIO(blob))


def test_numpy_2_module_names_are_accepted():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = safe_load_pickle(io.BytesIO(pickle.dumps({b"a": a, b"s": np.int64(7), b"e": b""}, protocol=2)))
    np.testing.assert_array_equal(out[b"a"], a)
    assert out[b"s"] == 7 and out[b"e"] == b""


# ---------------------------------------------------------------- download

def test_corrupt_download_is_refused_and_deleted(tmp_path, monkeypatch):
    payload, _ = fixture_archive_bytes(tmp_path)
    dest = tmp_path / "dest"
    asked = serve(monkeypatch, payload)  # a valid CIFAR tar, but not the official MD5
    with pytest.raises(CorruptDataError, match="corrupt and was deleted.*MD5"):
        load_cifar10(dest, progress=False)
    assert asked == [OFFICIAL_URL]
    assert os.listdir(dest) == []


def test_verified_download_is_kept_and_read(tmp_path, monkeypatch):
    payload, expected = fixture_archive_bytes(tmp_path)
    dest = tmp_path / "dest"
    serve(monkeypatch, payload)
    got = load_cifar10(dest, archive_url="http://mirror/c.tgz", progress=False,
                       archive_md5=hashlib.md5(payload).hexdigest().upper())
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert os.listdir(dest) == ["cifar-10-python.tar.gz"]


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    payload, _ = fixture_archive_bytes(tmp_path)
    dest = tmp_path / "dest"
    serve(monkeypatch, payload, fail_after=len(payload) // 3)
    with pytest.raises(DataNotFoundError, match="ConnectionResetError"):
        load_cifar10(dest, progress=False, archive_md5=hashlib.md5(payload).hexdigest())
    assert os.listdir(dest) == []


def test_check_archive_and_verify_md5(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"cifar")
    good = hashlib.md5(b"cifar").hexdigest()
    assert verify_md5(path, good) and not verify_md5(path, OFFICIAL_MD5)
    check_archive(path, good)
    with pytest.raises(CorruptDataError, match=f"f.bin: MD5 is {good}, expected {OFFICIAL_MD5}"):
        check_archive(path, OFFICIAL_MD5)


def test_not_found_names_directory_and_remedy(tmp_path, no_network):
    where = tmp_path / "nothing" / ".." / "empty"
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(where, progress=False)
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    root = str((tmp_path / "empty").resolve())
    assert f"CIFAR-10 not found in {root}." in msg
    for needle in ["cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1", "test_batch",
                   "URLError", f"python ../shared/data/make_cifar10.py {root}", "Pillow"]:
        assert needle in msg
    assert no_network == [OFFICIAL_URL]
    assert not os.path.exists(root), "a failed download should create nothing"


def test_not_found_without_download_mentions_incomplete_folder(tmp_path, no_network):
    write_cifar_fixture(tmp_path, n_per_batch=2)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(DataNotFoundError, match=r"(?s)lacks data_batch_4.*download=False"):
        load_cifar10(tmp_path, download=False)
    assert no_network == []


def test_limit():
    x, y = np.arange(10), np.arange(10) * 2
    assert limit(x, y, None)[0] is x
    np.testing.assert_array_equal(limit(x, y, 3)[1], [0, 2, 4])
    with pytest.raises(ValueError):
        limit(x, y, -1)


# ---------------------------------------------------------------- normalisation

def test_channel_stats_and_normalize(device):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    x[..., 2] //= 3  # channels with different statistics
    mean, std = channel_stats(backend.to_device(x), chunk=11)
    ref = x.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-5)
    assert mean.dtype == std.dtype == np.float32 and isinstance(mean, np.ndarray)
    out = normalize(backend.to_device(x), CIFAR10_MEAN, CIFAR10_STD)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(backend.asnumpy(out), (x / 255.0 - CIFAR10_MEAN) / CIFAR10_STD,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- augmentation

class _ForcedRng:
    """Stands in for a Generator: centred crops, every image flipped."""

    def integers(self, low, high, size):
        return np.full(size, (high - 1) // 2)

    def random(self, n):
        return np.zeros(n)


def crop_flip_loop(x, top, left, flip, pad):
    """Reference: pad each image explicitly, slice its window, mirror it."""
    n, h, w, _ = x.shape
    out = np.empty_like(x)
    for i in range(n):
        padded = np.pad(x[i], ((pad, pad), (pad, pad), (0, 0)))
        window = padded[top[i]:top[i] + h, left[i]:left[i] + w]
        out[i] = window[:, ::-1] if flip[i] else window
    return out


def test_forced_flip_reverses_columns(device):
    x = np.random.default_rng(1).standard_normal((3, 6, 5, 2)).astype(np.float32)
    out = random_crop_flip(backend.to_device(x), _ForcedRng(), pad=4)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(backend.asnumpy(out), x[:, :, ::-1])


def test_crop_flip_matches_loop_reference(device):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 7, 5, 3)).astype(np.float32) + 3.0  # never zero
    pad = 3
    top, left = rng.integers(0, 2 * pad + 1, 9), rng.integers(0, 2 * pad + 1, 9)
    top[:2], left[:2] = [0, 2 * pad], [2 * pad, 0]  # extreme corners
    flip = rng.random(9) < 0.5
    out = crop_flip(backend.to_device(x), top, left, flip, pad)
    np.testing.assert_array_equal(backend.asnumpy(out), crop_flip_loop(x, top, left, flip, pad))


def test_random_crops_are_windows_of_the_padded_image(device):
    x = np.random.default_rng(3).integers(1, 256, size=(16, 6, 8, 3), dtype=np.uint8)
    pad = 2
    out = backend.asnumpy(random_crop_flip(backend.to_device(x), np.random.default_rng(4), pad))
    assert out.shape == x.shape and out.dtype == np.uint8
    seen_flip = set()
    for i in range(len(x)):
        matches = [(t, l, f) for t in range(2 * pad + 1) for l in range(2 * pad + 1) for f in (False, True)
                   if np.array_equal(out[i], crop_flip_loop(x[i:i + 1], [t], [l], [f], pad)[0])]
        assert len(matches) == 1, f"image {i} is not exactly one window of its padded copy"
        seen_flip.add(matches[0][2])
    assert seen_flip == {False, True}
    again = random_crop_flip(backend.to_device(x), np.random.default_rng(4), pad)
    np.testing.assert_array_equal(backend.asnumpy(again), out)


# ---------------------------------------------------------------- batches

def labelled_images(n):
    """Images whose pixel (0, 0, 0) encodes their index, with labels = index."""
    x = np.random.default_rng(5).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x, np.arange(n)


def host_batches(it, **kwargs):
    return [(backend.asnumpy(xb), backend.asnumpy(yb)) for xb, yb in it.epoch(**kwargs)]


@pytest.mark.parametrize("drop_last, n_batches", [(False, 5), (True, 4)])
def test_batches_cover_each_example_once(device, drop_last, n_batches):
    x, y = labelled_images(37)
    it = BatchIterator(x, y, 8, shuffle=True, rng=np.random.default_rng(0), drop_last=drop_last,
                       mean=CIFAR10_MEAN, std=CIFAR10_STD)
    assert len(it) == n_batches
    batches = host_batches(it)
    assert len(batches) == n_batches
    labels = np.concatenate([yb for _, yb in batches])
    assert len(labels) == (32 if drop_last else 37)
    assert len(set(labels.tolist())) == len(labels)
    assert not np.array_equal(labels, np.arange(len(labels))), "not shuffled"
    for xb, yb in batches:
        assert xb.dtype == np.float32 and yb.dtype == np.int64
        np.testing.assert_allclose(xb, normalize(x[yb], CIFAR10_MEAN, CIFAR10_STD), rtol=1e-6)


def test_unshuffled_batches_keep_order(device):
    x, y = labelled_images(10)
    batches = host_batches(BatchIterator(x, y, 4))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in batches]), y)
    np.testing.assert_allclose(batches[0][0], x[:4] / np.float32(255), rtol=1e-6)


@pytest.mark.parametrize("augment", [False, True])
def test_same_seed_same_batches_and_resume(device, augment):
    x, y = labelled_images(30)

    def make(seed):
        return BatchIterator(x, y, 7, shuffle=True, rng=np.random.default_rng(seed), augment=augment)

    first, second = make(9), make(9)
    full = host_batches(first)
    for (xa, ya), (xb, yb) in zip(full, host_batches(second)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(host_batches(first)[0][1], full[0][1]), "epochs should differ"

    resumed = host_batches(make(9), start=2)
    assert len(resumed) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    with pytest.raises(ValueError, match="start"):
        next(make(9).epoch(start=6))


def test_batch_iterator_needs_rng_to_shuffle():
    x, y = labelled_images(4)
    with pytest.raises(ValueError, match="rng"):
        BatchIterator(x, y, 2, shuffle=True)
