"""CIFAR-10: loading the official python layout, normalisation, augmentation, batches.

    x_train, y_train, x_test, y_test = load_cifar10("data")    # uint8 NHWC, int64
    batches = BatchIterator(x_train, y_train, 128, shuffle=True, rng=rng, augment=True,
                            mean=CIFAR10_MEAN, std=CIFAR10_STD)
    for xb, yb in batches:        # float32 NHWC on the selected device, int64 labels
        ...

The loader reads `DIR/cifar-10-batches-py/`, `DIR` itself when it is that folder, or
`DIR/cifar-10-python.tar.gz` (straight from the archive, nothing extracted). When none
is there it downloads the official archive, checks its MD5 and only then gives it its
final name. The pickles are read with a restricted unpickler that builds numpy arrays
and builtin containers and refuses every other global.

Augmentation and batching are written once for numpy and cupy: the arrays decide the
module (backend.get_array_module), while every random draw comes from a host
numpy Generator, so a run gives the same batches on the CPU and on the GPU.
"""
import hashlib
import http.client
import os
import pickle
import posixpath
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from .. import backend

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CIFAR10_CLASSES)
IMAGE_SHAPE = (32, 32, 3)
ROW_SIZE = 32 * 32 * 3

# Per-channel mean and std of the official training set, in [0, 1] scale (the values
# published with most CIFAR-10 training code; channel_stats gives them from data).
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

_DOWNLOAD_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60


class DataNotFoundError(FileNotFoundError):
    """No CIFAR-10 copy was found and none could be downloaded."""


class CorruptDataError(ValueError):
    """A CIFAR-10 file or archive is present but does not hold what the format says."""


# ---------------------------------------------------------------- restricted unpickling

def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # Python 3 writes bytes under protocol 2 as _codecs.encode(str, "latin1"); only that
    # codec is let through, so a pickle cannot reach the other (compressing) codecs.
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(
            f"refused _codecs.encode with encoding {encoding!r} (only 'latin1' is allowed)")
    return text.encode("latin-1", errors)


# numpy 1 pickles name numpy.core.multiarray, numpy 2 names numpy._core.multiarray; the
# functions are taken from live objects so neither (deprecated) module is imported.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): bytes,   # how Python 3 writes b"" under protocol 2
    ("builtins", "bytes"): bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: CIFAR-10 pickles only need numpy arrays "
                "and builtin containers") from None


def safe_load_pickle(fileobj, encoding="bytes"):
    """Unpickle numpy arrays, dicts, lists, tuples, bytes, str and numbers only.

    Any other global (os.system, builtins.eval, ...) raises pickle.UnpicklingError naming
    it, before anything is called. encoding="bytes" reads Python 2 str as bytes, as the
    official CIFAR-10 files (protocol 2, written by Python 2) need.
    """
    return _RestrictedUnpickler(fileobj, encoding=encoding).load()


# ---------------------------------------------------------------- reading and checking

def _batch_arrays(obj, source):
    """(x uint8 (n,32,32,3), y int64 (n,)) from one unpickled batch dict, checked."""
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{source}: expected a dict, got {type(obj).__name__}")
    missing = [k for k in (b"data", b"labels") if k not in obj]
    if missing:
        raise CorruptDataError(f"{source}: missing key(s) {missing}; keys present: {sorted(obj, key=repr)}")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != ROW_SIZE or data.shape[0] == 0:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise CorruptDataError(f"{source}: b'data' must be a uint8 array of shape (n, {ROW_SIZE}), "
                               f"n > 0; got {desc}")
    try:
        labels = np.asarray(obj[b"labels"])
    except ValueError:  # a ragged list
        labels = np.asarray(None)
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise CorruptDataError(f"{source}: b'labels' must hold {data.shape[0]} integers, "
                               f"got {labels.dtype} array of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise CorruptDataError(f"{source}: labels must lie in [0, {NUM_CLASSES}), "
                               f"found range [{labels.min()}, {labels.max()}]")
    # Rows are channel-planar: 1024 R values, then G, then B, each row-major over (y, x).
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, labels.astype(np.int64)


def _read_batch(fileobj, source):
    try:
        obj = safe_load_pickle(fileobj)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CorruptDataError(f"{source}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from e
    return _batch_arrays(obj, source)


def _images(parts):
    # One C-contiguous NHWC copy of the planar views: concatenate alone would keep their
    # channel-planar memory order, which makes every later per-image gather crawl.
    out = np.empty((sum(len(p) for p in parts),) + IMAGE_SHAPE, dtype=np.uint8)
    return np.concatenate(parts, out=out)


def _assemble(batches):
    """(x_train, y_train, x_test, y_test) from {file name: (x, y)}."""
    x_train = _images([batches[f][0] for f in TRAIN_FILES])
    y_train = np.concatenate([batches[f][1] for f in TRAIN_FILES])
    x_test, y_test = batches[TEST_FILE]
    return x_train, y_train, _images([x_test]), y_test


def _load_folder(folder):
    batches = {}
    for name in TRAIN_FILES + (TEST_FILE,):
        path = folder / name
        with open(path, "rb") as f:
            batches[name] = _read_batch(f, str(path))
    return _assemble(batches)


def _load_archive(path):
    """Read the batches straight out of the tar (gzip or not), extracting nothing to disk."""
    wanted = set(TRAIN_FILES + (TEST_FILE,))
    batches = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = posixpath.basename(member.name)
                if member.isfile() and name in wanted and name not in batches:
                    batches[name] = _read_batch(tar.extractfile(member), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CorruptDataError(f"{path}: not a readable tar archive ({type(e).__name__}: {e})") from e
    missing = sorted(wanted - set(batches))
    if missing:
        raise CorruptDataError(f"{path}: the archive lacks {missing} (expected under {FOLDER_NAME}/)")
    return _assemble(batches)


# ---------------------------------------------------------------- MD5 and download

def file_md5(path):
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_DOWNLOAD_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(path, expected):
    """True when the file's MD5 equals `expected` (hex, any case)."""
    return file_md5(path) == expected.lower()


def check_archive(path, expected_md5):
    """Raise CorruptDataError unless the file's MD5 equals `expected_md5`."""
    got = file_md5(path)
    if got != expected_md5.lower():
        raise CorruptDataError(f"{path}: MD5 is {got}, expected {expected_md5.lower()}")


def _download(url, dest, expected_md5, progress):
    """Fetch url into dest: a temporary file in dest's folder, renamed only once its MD5
    matched, so an interrupted or corrupt download never looks like a complete one."""
    from tqdm import tqdm  # only downloads need it

    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}",
                          disable=not progress) as bar:
                    for chunk in iter(lambda: resp.read(_DOWNLOAD_CHUNK), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            check_archive(tmp, expected_md5)
            os.replace(tmp, dest)
        except CorruptDataError as e:
            raise CorruptDataError(f"the download of {url} is corrupt and was deleted ({e}). "
                                   + _how_to_supply(dest.parent)) from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


# ---------------------------------------------------------------- finding the data

def _missing_files(folder):
    return [n for n in TRAIN_FILES + (TEST_FILE,) if not (folder / n).is_file()]


def _how_to_supply(root):
    return (f"To supply the data, put the official {ARCHIVE_NAME} ({OFFICIAL_URL}) or its "
            f"extracted {FOLDER_NAME}/ folder in {root}; or, on a machine with this repository's "
            f"shared copy, run `python ../shared/data/make_cifar10.py {root}` "
            "(needs Pillow: pip install pillow).")


def _not_found_message(root, candidates, reason):
    files = ", ".join(TRAIN_FILES + (TEST_FILE,))
    lines = [f"CIFAR-10 not found in {root}.",
             f"Looked for {root / FOLDER_NAME}/ and {root}/ holding {files}, "
             f"and for the archive {root / ARCHIVE_NAME}."]
    for folder in candidates:
        missing = _missing_files(folder)
        if folder.is_dir() and len(missing) < len(TRAIN_FILES) + 1:
            lines.append(f"{folder}/ is incomplete: it lacks {', '.join(missing)}.")
    lines.append(reason)
    lines.append(_how_to_supply(root))
    return "\n".join(lines)


def load_cifar10(data_dir, download=True, archive_url=OFFICIAL_URL, progress=True,
                 archive_md5=OFFICIAL_MD5):
    """(x_train, y_train, x_test, y_test): uint8 NHWC (n, 32, 32, 3) images, int64 labels.

    Looks in this order for DIR/cifar-10-batches-py/, DIR itself as that folder, and
    DIR/cifar-10-python.tar.gz. An archive already on disk is read whatever its MD5
    (copies rebuilt locally differ from the official one); a downloaded one must match
    archive_md5. Raises DataNotFoundError when nothing is found and the download is off
    or fails, CorruptDataError when what was found does not hold valid batches.
    """
    root = Path(data_dir).expanduser().resolve()
    candidates = (root / FOLDER_NAME, root)
    for folder in candidates:
        if not _missing_files(folder):
            return _load_folder(folder)
    archive = root / ARCHIVE_NAME
    if archive.is_file():
        return _load_archive(archive)
    if not download:
        reason = "Downloading was turned off (download=False)."
    else:
        try:
            _download(archive_url, archive, archive_md5, progress)
            return _load_archive(archive)
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused, ...
            reason = f"Downloading {archive_url} failed: {type(e).__name__}: {e}."
    raise DataNotFoundError(_not_found_message(root, candidates, reason))


def limit(x, y, n):
    """The first n examples of (x, y); all of them when n is None."""
    if n is None:
        return x, y
    if n < 0:
        raise ValueError(f"limit must be >= 0 or None, got {n}")
    return x[:n], y[:n]


# ---------------------------------------------------------------- normalisation

def channel_stats(x, chunk=1 << 20):
    """Per-channel (mean, std) of uint8 channel-last images, in [0, 1] scale.

    Sums run in float64 over chunks of pixels, so a whole training set never becomes a
    float64 copy. Returns host float32 arrays of shape (C,), for numpy or cupy input.
    """
    xp = backend.get_array_module(x)
    pixels = x.reshape(-1, x.shape[-1])
    total = xp.zeros(x.shape[-1], dtype=xp.float64)
    total_sq = xp.zeros(x.shape[-1], dtype=xp.float64)
    for i in range(0, len(pixels), chunk):
        part = pixels[i:i + chunk].astype(xp.float64)
        total += part.sum(axis=0)
        total_sq += (part * part).sum(axis=0)
    mean = total / len(pixels)
    std = xp.sqrt(xp.maximum(total_sq / len(pixels) - mean * mean, 0.0))
    return (backend.asnumpy(mean / 255.0).astype(np.float32),
            backend.asnumpy(std / 255.0).astype(np.float32))


def normalize(x, mean, std):
    """float32 (x / 255 - mean) / std, channel-last, in x's array module."""
    xp = backend.get_array_module(x)
    std = xp.asarray(std, dtype=xp.float32)
    out = x.astype(xp.float32)
    out *= 1.0 / (255.0 * std)
    out -= xp.asarray(mean, dtype=xp.float32) / std
    return out


# ---------------------------------------------------------------- augmentation

def crop_flip(x, top, left, flip, pad=4):
    """Crop each image of an NHWC batch from its zero-padded copy, and mirror some.

    Image i becomes the (H, W) window at (top[i], left[i]) of the image padded by `pad`
    zeros on every side (top, left in [0, 2*pad]; pad, pad is the unchanged image), then
    reversed left-right where flip[i]. One gather, no loop over images and no padded
    copy: each output pixel reads its source pixel, or is zeroed where that falls in the
    padding. top, left, flip are host arrays of length N; x may be numpy or cupy.
    """
    xp = backend.get_array_module(x)
    n, h, w, c = x.shape
    rows = xp.asarray(np.asarray(top) - pad)[:, None] + xp.arange(h)     # (n, h) source rows
    cols = xp.asarray(np.asarray(left) - pad)[:, None] + xp.arange(w)    # (n, w) source cols
    cols = xp.where(xp.asarray(np.asarray(flip, dtype=bool))[:, None], cols[:, ::-1], cols)
    inside = (((rows >= 0) & (rows < h))[:, :, None]
              & ((cols >= 0) & (cols < w))[:, None, :])                  # (n, h, w)
    flat = ((xp.arange(n)[:, None, None] * h + xp.clip(rows, 0, h - 1)[:, :, None]) * w
            + xp.clip(cols, 0, w - 1)[:, None, :])
    out = xp.take(x.reshape(n * h * w, c), flat, axis=0)                  # (n, h, w, c)
    out *= inside[..., None]
    return out


def random_crop_flip(x, rng, pad=4):
    """Random crop of the pad-zero-padded image and a horizontal flip with p=0.5, per image.

    Draws, in this order, from the host numpy Generator rng: top offsets, left offsets
    (integers in [0, 2*pad]) and flip decisions (rng.random(n) < 0.5).
    """
    n = x.shape[0]
    top = rng.integers(0, 2 * pad + 1, size=n)
    left = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    return crop_flip(x, top, left, flip, pad)


# ---------------------------------------------------------------- batches

class BatchIterator:
    """Mini-batches (float32 normalised NHWC images, int64 labels) on the selected device.

    The uint8 images and the labels move to the device once, here; each batch is then
    gathered, augmented (before normalising, so padding is black as in the usual
    recipe) and normalised there. mean/std None leave images at x / 255.

    Each epoch draws from rng its order (when shuffling) and one seed for augmentation;
    batch b is augmented with a generator seeded from (that seed, b). So an epoch resumed
    with epoch(start=k), from the rng state that epoch began with, yields exactly the
    batches k, k+1, ... of the uninterrupted epoch, and leaves rng in the same state.
    """

    def __init__(self, x, y, batch_size, shuffle=False, rng=None, augment=False,
                 drop_last=False, mean=None, std=None, pad=4):
        if x.ndim != 4 or x.dtype != np.uint8:
            raise ValueError(f"x must be uint8 NHWC images, got {x.dtype} array of shape {x.shape}")
        if len(y) != len(x):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (shuffle or augment) and rng is None:
            raise ValueError("shuffle and augment draw from rng: pass a numpy Generator")
        self.x = backend.to_device(backend.get_array_module(x).ascontiguousarray(x))
        self.y = backend.to_device(y, dtype=np.int64)
        self.batch_size, self.shuffle, self.rng = batch_size, shuffle, rng
        self.augment, self.drop_last, self.pad = augment, drop_last, pad
        channels = x.shape[-1]
        self.mean = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32)
        self.std = np.ones(channels, np.float32) if std is None else np.asarray(std, np.float32)

    def __len__(self):
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        return self.epoch()

    def epoch(self, start=0):
        """Yield the batches of one epoch, from batch index `start` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must lie in [0, {len(self)}], got {start}")
        xp = backend.get_array_module(self.x)
        order = xp.asarray(self.rng.permutation(len(self.x))) if self.shuffle else None
        aug_seed = int(self.rng.integers(2 ** 63)) if self.augment else None
        for b in range(start, len(self)):
            window = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if order is None:
                xb, yb = self.x[window], self.y[window]
            else:
                xb, yb = xp.take(self.x, order[window], axis=0), xp.take(self.y, order[window])
            if self.augment:
                xb = random_crop_flip(xb, np.random.default_rng([aug_seed, b]), self.pad)
            yield normalize(xb, self.mean, self.std), yb
