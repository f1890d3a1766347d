"""One output file that is not an artifact (a plot, a report, an explanation picture, a small JSON
record): checked before any work, written atomically.

The check refuses what would otherwise surface only after minutes of work (or not at all): a
directory, an existing file without ``--overwrite``, a suffix that is not what will be written, a
place that cannot be written. The write goes to a hidden temporary file beside the target that is
fsynced and renamed onto it, so a full disk or a kill leaves the old file (or nothing), never a
truncated one. ``atomic_path``/``write_atomic``/``write_json_atomic`` are that write for every single
file bigmodel writes (they let OSError through); ``atomic_file``/``atomic_write_bytes`` add the
user-facing one-line error for a file the user named.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError
from .output_staging import fsync_dir, staging_path


def check_output_file(out: Path | str, overwrite: bool, allowed: tuple[str, ...], flag: str = "--out",
                      what: str = "this file") -> Path:
    """Fail before any work if ``out`` has the wrong suffix, is a directory, exists without
    --overwrite, or cannot be written; ``allowed`` are the suffixes (lower case, with the dot)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a directory; give a file name ending in {' or '.join(allowed)}")
    if out.suffix.lower() not in allowed:
        raise UserError(f"{flag} {out}: {what} is written as {' or '.join(allowed)}; name the file accordingly")
    if out.exists() and not overwrite:
        raise UserError(f"{flag} {out}: already exists; choose another name or pass --overwrite to replace it")
    _probe_writable(out, flag)
    return out


def _probe_writable(out: Path, flag: str) -> None:
    """Create and remove a hidden file where ``out`` will go (or in its nearest existing folder):
    permission bits alone miss read-only mounts, /proc and the like, especially for root."""
    folder = out.resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {out}: {folder} is a file, not a folder; choose another place")
    probe = folder / f".bigmodel-probe-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise UserError(f"{flag} {out}: {folder} is not writable ({exc.strerror}); choose another place") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(out: Path | str) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``out`` (named so ``output_staging.clean_stale`` knows it,
    with ``out``'s suffix kept); when the block succeeds it is fsynced and renamed onto ``out`` and the
    folder is fsynced, on any failure it is removed and ``out`` is left as it was. OSError goes
    through to the caller."""
    out = Path(out)
    tmp = staging_path(out, out.suffix)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(out.parent)


def write_atomic(out: Path | str, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``out`` all at once or not at all (see ``atomic_path``)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return out


def write_json_atomic(out: Path | str, data: Any, indent: int | None = 2) -> Path:
    """``data`` as indented JSON plus a newline, written with ``write_atomic``."""
    return write_atomic(out, json.dumps(data, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_file(out: Path | str, flag: str = "--out") -> Iterator[Path]:
    """``atomic_path`` for a file the user named with ``flag``: its folder is created, and a failure
    to write is one line naming the flag (nothing was written)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot create its folder ({exc.strerror}); choose another place") from None
    try:
        with atomic_path(out) as tmp:
            yield tmp
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot write ({exc.strerror or exc}); nothing was written") from None


def atomic_write_bytes(out: Path | str, data: bytes, flag: str = "--out") -> Path:
    """Write ``data`` to ``out`` all at once or not at all (see ``atomic_file``)."""
    out = Path(out)
    with atomic_file(out, flag) as tmp:
        tmp.write_bytes(data)
    return out
