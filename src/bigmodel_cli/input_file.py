"""Reading a file that a user or an artifact names, without letting it hang or flood the process.

Only a regular file is read: it is opened non-blocking, so a FIFO cannot make the open wait
forever, and checked with fstat on the open descriptor, so a device (a symlink to /dev/zero) is
never read without end. Its size is checked before reading, and never more than the limit (plus
one byte, to see a file that grew) is read. Every refusal is one ``UserError`` that ends with
what the caller tells the user to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


def open_regular(path: Path) -> BinaryIO | None:
    """``path`` opened for binary reading if it is a regular file, else None (OSError as open's)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def read_capped(path: Path, limit: int, fix: str) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes. FileNotFoundError is
    raised as is (the caller knows what a missing file means); any other problem is one UserError
    ending with ``fix``."""
    try:
        handle = open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror}); {fix}") from None
    if handle is None:
        raise UserError(f"{path}: is not a regular file; {fix}")
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:  # refused before reading any of it
            raise UserError(f"{path}: is {size:,} bytes, more than the {limit:,} bytes bigmodel reads for it; {fix}")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise UserError(f"{path}: is more than the {limit:,} bytes bigmodel reads for it; {fix}")
    return data
