"""A run's output directory: checked writable before any work, and locked while a run writes it.

The lock is the file OUT/.lock holding the process id of the run. A second run on
the same directory is refused while that process lives; a lock left by a process
that died (killed, power loss) is taken over.
"""
import errno
import os

LOCK = ".lock"
_held = set()          # lock files this process holds


class OutputError(RuntimeError):
    """The output directory cannot be used (not writable, or another run writes it)."""


def check_writable(out, what="the output directory", fix="choose another --out"):
    """Create ``out`` if needed and write (then remove) a probe file in it; one clear error
    otherwise, naming ``what`` the directory is and how to ``fix`` it."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ENOTDIR or (os.path.exists(out) and not os.path.isdir(out)):
            reason = "a file, not a directory, is in the way"
        raise OutputError(f"cannot write to {what} {os.path.abspath(out)} ({reason}); {fix}") from e


def check_output_file(path, flag):
    """Raise OutputError unless ``path`` can be written (its directory created if needed), so a
    command given ``flag`` PATH fails before its work rather than losing the result after it."""
    if os.path.isdir(path):
        raise OutputError(f"{flag} {os.path.abspath(path)} is a directory; give a file name")
    check_writable(os.path.dirname(os.path.abspath(path)), what=f"the directory of {flag} {path}",
                   fix=f"give another {flag}")


def _pid_alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


def _holder(path):
    """The pid in a lock file (0 when unreadable)."""
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _live_other(path):
    """The pid of a live run other than this one holding the lock at ``path``, or None."""
    if not os.path.exists(path):
        return None
    pid = _holder(path)
    if pid == os.getpid():
        return pid if path in _held else None
    return pid if _pid_alive(pid) else None


def _refusal(out, pid):
    return OutputError(f"another run (process {pid}) is writing to {os.path.abspath(out)}; wait for it to "
                       f"finish or choose another --out (remove {os.path.join(out, LOCK)} if that process "
                       "is not a minireuse run)")


def check_unlocked(out):
    """Raise OutputError when a live run holds the lock of ``out`` (nothing is taken)."""
    pid = _live_other(os.path.join(out, LOCK))
    if pid is not None:
        raise _refusal(out, pid)


class OutLock:
    """Holds OUT/.lock from ``__enter__`` to ``__exit__`` (any exit)."""

    def __init__(self, out):
        self.out = out
        self.path = os.path.abspath(os.path.join(out, LOCK))

    def __enter__(self):
        os.makedirs(self.out, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _live_other(self.path)
                if pid is not None:
                    raise _refusal(self.out, pid)
                try:
                    os.remove(self.path)          # stale: its process is gone
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            _held.add(self.path)
            return self
        raise _refusal(self.out, _holder(self.path))

    def __exit__(self, *exc):
        if self.path in _held:
            _held.discard(self.path)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        return False
