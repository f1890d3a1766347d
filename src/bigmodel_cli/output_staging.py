"""Staging beside an output and the leftovers of killed writers (storage layer).

A new output is built under a hidden name beside it (``.NAME.tmp-PID-XXXXXXXX``), fsynced and
renamed into place; an output being replaced is first set aside as ``.NAME.old-PID-XXXXXXXX``. The
writer's pid is in the name, so ``clean_stale`` can tell a dead writer's leftover from a live one and
remove (or, for a set-aside output whose replacement never arrived, restore) it; nothing else is
touched.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

# Staging and set-aside names carry the writer's pid, so a leftover can be told from a live one.
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")
_LEGACY_HIDDEN = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")  # before pids were recorded
_LOCK = re.compile(r"^\..+\.lock$")
# When this command started: a staging directory newer than this may belong to a process that
# reused a dead writer's pid in the meantime, so it is left alone.
STARTED = time.time()


def staging_path(out: Path, suffix: str = "") -> Path:
    """A fresh hidden name beside ``out`` for building its replacement; ``suffix`` is kept at the end
    for writers that choose the format by the file name (matplotlib)."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def aside_path(out: Path) -> Path:
    """A fresh hidden name beside ``out`` for the old output while the new one moves in."""
    return out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def rebuilt_in_place(out: Path, what: str) -> Iterator[None]:
    """Make ``out`` an empty directory for work that must be built where it will live (a recipe run
    or a search records the paths it reads, so it cannot be built elsewhere and renamed). An
    existing ``out`` is set aside (``.NAME.old-*``), removed when the body has finished, and put
    back if it fails. ``what`` names the directory in the one line a failed mkdir gives."""
    aside = aside_path(out) if out.exists() else None
    try:
        if aside is not None:
            out.rename(aside)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the {what} ({exc.strerror}); choose another --out") from None
    try:
        yield
    except BaseException:
        if aside is not None:  # the new work failed: the old one comes back as it was
            shutil.rmtree(out, ignore_errors=True)
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def is_bookkeeping(folder: Path | str, name: str) -> bool:
    """A hidden staging, set-aside or lock entry that bigmodel itself creates beside its outputs. A
    lock file counts only while it holds nothing but a pid, so a user's own ``.something.lock`` is
    not taken for one of ours."""
    if _HIDDEN.match(name) or _LEGACY_HIDDEN.match(name):
        return True
    if not _LOCK.match(name):
        return False
    path = Path(folder) / name
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 32:
            return False
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return text == "" or text.isdigit()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is set aside first and removed only once the
    new one is in place (a crash in between leaves it as ``.NAME.old-*``, restored by ``clean_stale``)."""
    if out.exists():
        old = aside_path(out)
        out.rename(old)
        staging.rename(out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    fsync_dir(out.parent)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path | str) -> list[Path]:
    """Beside ``out`` (in its folder): remove the staging directories whose writer is gone, and put
    back a set-aside old output that a killed swap left without its replacement. Only names of the
    form ``.NAME.tmp-PID-XXXXXXXX`` / ``.NAME.old-PID-XXXXXXXX`` are considered, and only when PID is
    dead and the entry is older than this command. Returns what was removed."""
    out = Path(out)
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _HIDDEN.match(entry.name)
        if not match or pid_alive(int(match["pid"])):
            continue
        try:
            if entry.is_symlink() or entry.lstat().st_mtime >= STARTED:
                continue
            owner = entry.parent / match["name"]
            if match["kind"] == "old" and not owner.exists() and not owner.is_symlink():
                entry.rename(owner)  # the swap was cut between its two renames: this is the only copy
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def clean_stale_temp(prefix: str) -> list[Path]:
    """Remove ``PREFIX<pid>-*`` work directories in the system's temp folder whose process is gone."""
    import tempfile

    pattern = re.compile(re.escape(prefix) + r"(?P<pid>\d+)-")
    removed: list[Path] = []
    root = Path(tempfile.gettempdir())
    try:
        entries = [e for e in root.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or pid_alive(int(match["pid"])):
            continue
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.lstat().st_mtime >= STARTED:
                continue
            if entry.lstat().st_uid != os.getuid():
                continue  # someone else's: not ours to remove
            shutil.rmtree(entry)
        except OSError:
            continue
        removed.append(entry)
    return removed
