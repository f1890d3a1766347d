"""The few exception types the engine raises, and what each means for the exit code.

The CLI has one error boundary (``bigmodel_cli.cli.BigModelGroup``) that turns these into one red
line on stderr and an exit code. Everything else that escapes is an internal failure.
"""

from __future__ import annotations


class BigModelError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(BigModelError):
    """The user's input is wrong: a path, a flag, a file. Exit code 2.

    The message names the problem and, where there is one, the fix.
    """

    exit_code = 2


class ConfigErrors(UserError):
    """Several problems with one configuration, reported together."""

    def __init__(self, problems: list[str], what: str = "configuration"):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems with the {what}: " + "; ".join(self.problems)
        super().__init__(text)


class WorkFailed(BigModelError):
    """The input was fine but the work did not succeed (e.g. export verification). Exit code 1."""

    exit_code = 1


class NonFiniteLoss(WorkFailed):
    """Training produced NaN or Inf; the last good checkpoint is kept."""


def first_line(exc: BaseException, limit: int = 300, with_type: bool = False) -> str:
    """The first non-blank line of a library's exception message, at most ``limit`` characters: a
    library's message goes into bigmodel's one-line error, and its later lines (stack notes, advice)
    would break that line. The exception's type name when the message is empty; with ``with_type``,
    ``Type: line``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    return f"{name}: {lines[0][:limit]}" if with_type else lines[0][:limit]
