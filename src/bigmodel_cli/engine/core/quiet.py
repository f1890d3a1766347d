"""Silence a library while it works: the exporters and ONNX Runtime's quantization tools print
progress and advice, and results on stdout must stay clean (``--json``)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def silenced(*logger_names: str):
    """The named loggers (none: the root logger) below ERROR, warnings ignored and stdout swallowed
    for the duration; failures still raise, and the caller reports them in one line."""
    loggers = [logging.getLogger(name) for name in logger_names] or [logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
