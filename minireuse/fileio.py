"""Atomic file writes: a run that fails never leaves a half-written file behind."""
import json
import os

import numpy as np

# the flags of a new, private-to-this-call temporary file; mode 0o666 below is what
# open(path, "w") asks for, so the kernel applies the umask (and any default ACL)
# exactly as it does for a plain open()
_TEMP_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def _create_temp(directory, base):
    """(fd, path) of a new file ``.base.XXXXXXXX.tmp`` in ``directory``, mode 0o666 & ~umask."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name for {base} in {directory}")


def _fsync_directory(directory):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, binary=True):
    """Call ``write(f)`` on a temporary file in the directory of ``path``, flush and fsync
    it, then rename it over ``path``; on any error the temporary file is removed and
    ``path`` untouched. The file gets the mode a plain ``open(path, "w")`` gives a new
    file (0o666 & ~umask), not the 0o600 of ``tempfile.mkstemp``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = _create_temp(d, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(d)


def atomic_savez(path, arrays):
    """np.savez of a dict of arrays, atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_json(path, obj):
    """JSON (indented), atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False)
