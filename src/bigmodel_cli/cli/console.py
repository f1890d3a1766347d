"""Rich output: results to stdout, progress and errors to stderr, JSON for machines."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Piped output is read by programs and logs, not by a terminal of 80 columns: don't squeeze tables.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def error(message: str) -> None:
    # Messages quote user input and library errors, which may contain [brackets]: never markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False)


def note(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]", highlight=False)


def print_json(data: Any) -> None:
    from ..artifact import jsonable

    print(json.dumps(jsonable(data), indent=2, default=str))


def fmt(value: Any) -> str:
    """Numbers for people: 4 significant digits, thousands separators for counts."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def key_value_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, fmt(value))
    return table


def rows_table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    return table
