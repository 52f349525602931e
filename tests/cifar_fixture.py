"""Small CIFAR-10 copies in the official python layout, for tests (random pixels).

The official files are protocol-2 pickles written by Python 2, where bytes and text are
both `str` (BINSTRING opcodes) and numpy lives in numpy.core.multiarray.
python2_strings=True imitates that; False writes what Python 3 writes under protocol 2
(bytes through _codecs.encode), as ../shared/data/make_cifar10.py does.
"""
import io
import os
import pickle
import shutil
import struct
import tarfile

import numpy as np

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 str, the way the official files hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def dumps(obj, python2_strings=False):
    if python2_strings:
        buf = io.BytesIO()
        _Python2Pickler(buf, protocol=2).dump(obj)
        raw = buf.getvalue()
    else:
        raw = pickle.dumps(obj, protocol=2)
    # GLOBAL opcodes hold the module name as text, so this keeps the pickle valid.
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def planar_rows(images):
    """(n, 32, 32, 3) uint8 -> (n, 3072) rows: R plane, G plane, B plane."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_cifar_fixture(root, n_per_batch=4, n_test=None, archive=False, seed=0,
                        python2_strings=False):
    """Write root/cifar-10-batches-py/ (or, with archive=True, only
    root/cifar-10-python.tar.gz holding it) with random images and labels.

    Returns (x_train, y_train, x_test, y_test) as load_cifar10 should give them:
    uint8 NHWC images and int64 labels.
    """
    rng = np.random.default_rng(seed)
    n_test = n_per_batch if n_test is None else n_test
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    parts = {}
    for i, name in enumerate(TRAIN_FILES + ["test_batch"]):
        n = n_test if name == "test_batch" else n_per_batch
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=n)
        parts[name] = (x, y)
        label = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
        batch = {b"batch_label": label.encode(), b"labels": [int(v) for v in y],
                 b"data": planar_rows(x), b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            f.write(dumps(batch, python2_strings))
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": [c.encode() for c in CLASSES],
            b"num_vis": 3072}
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        f.write(dumps(meta, python2_strings))
    if archive:
        with tarfile.open(os.path.join(root, "cifar-10-python.tar.gz"), "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        shutil.rmtree(folder)
    x_train = np.concatenate([parts[n][0] for n in TRAIN_FILES])
    y_train = np.concatenate([parts[n][1] for n in TRAIN_FILES]).astype(np.int64)
    return x_train, y_train, parts["test_batch"][0], parts["test_batch"][1].astype(np.int64)
