"""One output file that is not an artifact (a plot, a report, an explanation picture): checked
before any work, written atomically.

The check refuses what would otherwise surface only after minutes of work (or not at all): a
directory, an existing file without ``--overwrite``, a suffix that is not what will be written, a
place that cannot be written. The write goes to a hidden temporary file beside the target that is
fsynced and renamed onto it, so a full disk or a kill leaves the old file (or nothing), never a
truncated one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from .errors import UserError


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
def atomic_file(out: Path | str, flag: str = "--out") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``out`` that is renamed onto it only if the block
    succeeds; on any failure the temporary file is removed and ``out`` is left as it was."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot create its folder ({exc.strerror}); choose another place") from None
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}{out.suffix}"
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot write ({exc.strerror or exc}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(out: Path | str, data: bytes, flag: str = "--out") -> Path:
    """Write ``data`` to ``out`` all at once or not at all (see ``atomic_file``)."""
    out = Path(out)
    with atomic_file(out, flag) as tmp:
        tmp.write_bytes(data)
    return out
