"""A run's output directory: checked writable before any work, locked while a run writes it,
and the files a run leaves there (found, named, removed on request, resumed from); and
InterruptFlag, which turns a first Ctrl-C into a stop with those files saved.

The lock is the file OUT/.lock holding the process id of the run. A second run on
the same directory is refused while that process lives; a lock left by a process
that died (killed, power loss) is taken over.
"""
import errno
import os
import shlex
import signal
import sys

from .checkpoint import TrainingError, read_checkpoint

LOCK = ".lock"
CHECKPOINT = "checkpoint.npz"
HISTORY = "history.json"
MODEL = "model.npz"
# what a finished or interrupted run leaves in its directory (--overwrite removes them)
RUN_FILES = (CHECKPOINT, HISTORY, MODEL, "history.png")
# set by `make cifar` to its own invocation: the interpreter it runs is the project's
# environment, which a bare `python` on the PATH may not be
MAKE_COMMAND_ENV = "MINIREUSE_MAKE_COMMAND"
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


def resume_command(ckpt):
    """The command that continues the run saved in ``ckpt``, for how this process was started."""
    make = os.environ.get(MAKE_COMMAND_ENV)
    if make:
        return f"{make} RESUME=1"
    return f"{shlex.quote(sys.executable)} -m minireuse train --resume {shlex.quote(ckpt)}"


def checkpoint_position(ckpt):
    """Where the run saved in ``ckpt`` stands, in words."""
    try:
        meta = read_checkpoint(ckpt, arrays=False)[0]
    except TrainingError:
        return "an unreadable state"
    return f"epoch {meta['epoch'] + 1}, step {meta['step']}" if meta["step"] else f"the end of epoch {meta['epoch']}"


def refuse_existing_run(out):
    """Raise OutputError when ``out`` holds a run's files, with the ways on: resume it,
    another output directory, or start over explicitly (nothing is replaced unasked)."""
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not present:
        return
    ckpt = os.path.join(out, CHECKPOINT)
    where = f"its checkpoint is at {checkpoint_position(ckpt)}" if CHECKPOINT in present else \
        f"{', '.join(present)}, no checkpoint"
    make = os.environ.get(MAKE_COMMAND_ENV)
    other, over = (("another OUT=DIR", f"{make} TRAIN_FLAGS=--overwrite") if make
                   else ("another --out DIR", "--overwrite"))
    resume = f"continue it with {resume_command(ckpt)}, " if CHECKPOINT in present else ""
    raise OutputError(f"{os.path.abspath(out)} already holds a run ({where}): {resume}choose {other}, or "
                      f"start over with {over} (discards it)")


def clear_run(out):
    """Remove the files of the run in ``out`` (--overwrite), so none of them outlives the new run."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


class InterruptFlag:
    """Within the block, a first Ctrl-C only sets the flag (the loop saves and stops
    at the next safe point); a second one interrupts at once, with ``hint()`` (what is
    left to resume from) as its message."""

    def __init__(self, hint=None):
        self.set = False
        self.hint = hint

    def __bool__(self):
        return self.set

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt("interrupted again: stopped at once without saving. "
                                    + (self.hint() if self.hint else ""))
        self.set = True

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
