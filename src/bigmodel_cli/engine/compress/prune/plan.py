"""The plan every pruning method follows: how much to prune at each step, how wide a pruned layer
stays, what an N:M pattern means, and which layers ``--ignore`` keeps. Pure functions, no torch."""

from __future__ import annotations

import fnmatch
import math

from bigmodel_cli.errors import UserError


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Target sparsity after each of ``steps`` increments (Zhu & Gupta 2017, "To prune, or not to
    prune"): s_k = s_f + (s_i - s_f)(1 - k/K)^3. Pruning fast early, while the network still has
    redundancy, and slowly at the end, when every weight matters, is what makes high sparsity
    recoverable. Index 0 is the starting point (``initial``); the list has ``steps + 1`` entries."""
    return [final + (initial - final) * (1.0 - k / steps) ** 3 for k in range(steps + 1)]


def torch_pruning_scheduler(ratio: float, steps: int) -> list[float]:
    """The same cubic schedule in the shape Torch-Pruning's ``iterative_pruning_ratio_scheduler`` takes."""
    return cubic_schedule(ratio, steps)


def kept_width(width: int, sparsity: float, round_to: int = 1) -> int:
    """How many of ``width`` units survive pruning a fraction ``sparsity`` of them.

    At most that fraction is removed (the count is floored), the survivors are rounded down to a
    multiple of ``round_to`` (hardware-friendly widths, the same rule as Torch-Pruning's), and a
    layer never goes below one unit, or below ``round_to`` when it was at least that wide.
    """
    removed = math.floor(width * sparsity + 1e-9)
    keep = max(1, width - removed)
    if round_to > 1 and width >= round_to:
        keep = max(round_to, keep - keep % round_to)
    return min(keep, width)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' → (2, 4): keep N of every M consecutive weights."""
    parts = pattern.replace(" ", "").split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--pattern {pattern!r}: write it as N:M, e.g. 2:4 (keep 2 of every 4 weights)") from None
    if not 0 < n < m:
        raise UserError(f"--pattern {pattern!r}: N:M keeps N of every M weights, so 0 < N < M is needed (e.g. 2:4)")
    if m > 64:
        raise UserError(f"--pattern {pattern!r}: M above 64 is not N:M sparsity; use --sparsity instead")
    return n, m


def split_ignored(names: list[str], patterns: list[str], what: str = "layer") -> tuple[list[str], list[str]]:
    """(pruned, kept) names. Every ``--ignore`` pattern must match something: a pattern that matches
    nothing is almost always a typo, and silently pruning the layer it meant to keep is worse."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UserError(f"--ignore {pattern!r} matches no prunable {what}; the {what}s are: {shown}")
    kept = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return [n for n in names if n not in kept], kept
