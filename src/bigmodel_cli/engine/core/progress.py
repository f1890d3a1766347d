"""The engine's progress callback: ``progress(event, **info)``, rendered by the CLI (``cli/progress.py``).

``no_progress`` is the one callback for a caller that shows nothing (a library call, ``--json``).
"""

from __future__ import annotations

from typing import Any, Callable

Progress = Callable[..., None]


def no_progress(event: str, **info: Any) -> None:
    """Ignore a progress event."""
