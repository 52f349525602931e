"""Atomic file writes: a run that fails never leaves a half-written file behind."""
import json
import os
import tempfile

import numpy as np


def atomic_write(path, write, binary=True):
    """Call ``write(f)`` on a temporary file in the directory of ``path``, then rename
    it over ``path``; on any error the temporary file is removed and ``path`` untouched."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_savez(path, arrays):
    """np.savez of a dict of arrays, atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_json(path, obj):
    """JSON (indented), atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False)
