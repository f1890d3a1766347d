"""One writer per output (storage layer): an exclusive, non-blocking ``flock`` on a hidden
``.NAME.lock`` beside the output. The kernel drops it when the process dies, so a crash never leaves a
stale lock; a refusal names the process that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from .errors import UserError


def lock_path(out: Path) -> Path:
    """``.NAME.lock`` in the output's folder, spelled canonically: one output, one lock file name,
    however --out was written (the in-process registry of held locks is keyed by it)."""
    absolute = Path(os.path.abspath(out))
    return Path(os.path.realpath(absolute.parent)) / f".{absolute.name}.lock"


class OutputLock:
    """An exclusive flock on ``.NAME.lock`` beside an output. Re-entrant within a process (a recipe
    step, a nested save): only the outermost release unlocks."""

    _held: dict[str, "OutputLock"] = {}

    def __init__(self, out: Path, fd: int, path: Path, created: list[Path]):
        self.out, self.fd, self.path, self.count = out, fd, path, 1
        self.created = created  # folders made for the lock file, removed on release if still empty

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        OutputLock._held.pop(str(self.path), None)
        # Unlinked while still locked: a waiter that opened the old file sees, after locking it,
        # that the name now points elsewhere, and starts again (see ``hold``).
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        _remove_empty(self.created)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(out: Path | str) -> OutputLock:
    """Take the output's lock, or fail with one line naming the process that has it."""
    out = Path(out)
    if not Path(os.path.abspath(out)).name:
        raise UserError(f"{out}: is the root directory; choose another --out")
    path = lock_path(out)
    held = OutputLock._held.get(str(path))
    if held is not None:
        held.count += 1
        return held
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_create(out, exc) from None
    try:
        return _lock(out, path, created)
    except BaseException:
        _remove_empty(created)
        raise


def _lock(out: Path, path: Path, created: list[Path]) -> OutputLock:
    """hold's loop: open, lock, and check that the name still points at what was locked."""
    while True:
        try:
            # O_NOFOLLOW: a lock name planted as a link must not make us truncate what it points at
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise _cannot_create(out, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{path}: is not a regular file (bigmodel's lock for {out.name}); remove it or choose "
                            "another --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{out}: cannot lock the output ({exc.strerror}); choose another --out") from None
            who = f" (pid {owner})" if owner else ""
            raise UserError(f"{out}: is being written by another bigmodel process{who}; wait for it or choose "
                            "another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and removed it between our open and our lock
    with contextlib.suppress(OSError):  # the pid only names the holder in a refusal; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    lock = OutputLock(out, fd, path, created)
    OutputLock._held[str(path)] = lock
    return lock


def _cannot_create(out: Path, exc: OSError) -> UserError:
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{Path(os.path.abspath(out)).parent}: is not writable; choose another --out")
    return UserError(f"{out}: cannot create the output ({exc.strerror}); choose another --out")


def _remove_empty(directories: list[Path]) -> None:
    """Remove the folders made for a lock file if nothing was written into them (a refused or failed
    command leaves no trace); a folder that holds anything stays."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def refuse_if_locked(out: Path) -> None:
    """Fail if another process holds the output's lock; creates nothing."""
    path = lock_path(out)
    if not Path(os.path.abspath(out)).name or str(path) in OutputLock._held:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # no lock file: nobody is writing there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _read_pid(fd)
        who = f" (pid {owner})" if owner else ""
        raise UserError(f"{out}: is being written by another bigmodel process{who}; wait for it or choose "
                        "another --out") from None
    finally:
        os.close(fd)  # and with it the probe's lock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
