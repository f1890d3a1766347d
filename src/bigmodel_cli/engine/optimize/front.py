"""Which measured candidates meet the goal, the Pareto front, and the choice.

A row is a ``compare`` row (metric ``value``, ``latency_ms_p50``, ``file_bytes``, ``params``,
``nonzero_params``); the base (the input, on the search's backend) is the reference of the limit.
"""

from __future__ import annotations

from .space import Goal

OBJECTIVE_KEY = {"latency": "latency_ms_p50", "size": "file_bytes", "params": "nonzero_params"}
FRONT_KEYS = ("latency_ms_p50", "file_bytes", "nonzero_params")


def front_keys(objective: str) -> tuple[str, ...]:
    """The front's costs, the objective's first (the order the front is listed in)."""
    first = OBJECTIVE_KEY[objective]
    return (first, *[k for k in FRONT_KEYS if k != first])


def drop(value: float | None, base: float, task: str, goal: Goal) -> float | None:
    """How much worse than the base, in the units of --max-drop: accuracy points (or percent of the
    base's accuracy when relative); a language model's perplexity rise in percent."""
    if value is None:
        return None
    if task == "language-modeling":
        return (value / base - 1.0) * 100.0
    if goal.relative:
        return (base - value) / base * 100.0 if base else 0.0
    return (base - value) * 100.0


def within_limit(row: dict, base: float, task: str, goal: Goal) -> bool:
    worse = drop(row.get("value"), base, task, goal)
    # a hair of tolerance: a model that scores the same must not fail on the last float bit
    return worse is not None and (goal.max_drop is None or worse <= goal.max_drop + 1e-9)


def within_budgets(row: dict, goal: Goal) -> bool:
    if goal.latency_budget_ms is not None and not row["latency_ms_p50"] <= goal.latency_budget_ms:
        return False
    return goal.size_budget_mb is None or row["file_bytes"] <= goal.size_budget_mb * 1e6


def meets(row: dict, base: float, task: str, goal: Goal) -> bool:
    return within_limit(row, base, task, goal) and within_budgets(row, goal)


def quality(row: dict, task: str) -> float:
    """Higher is better, for either metric."""
    value = row.get("value")
    if value is None:
        return float("-inf")
    return -value if task == "language-modeling" else value


def beats(other: dict, row: dict, task: str, keys: tuple[str, ...]) -> bool:
    """``other`` is at least as good as ``row`` on the metric and every cost in ``keys``, and better on one."""
    ours = [quality(row, task)] + [-row[k] for k in keys]
    theirs = [quality(other, task)] + [-other[k] for k in keys]
    return all(t >= u for t, u in zip(theirs, ours)) and any(t > u for t, u in zip(theirs, ours))


def beaten_by(row: dict, rows: list[dict], task: str, keys: tuple[str, ...]) -> int:
    return sum(beats(o, row, task, keys) for o in rows if o is not row)


def pareto_front(rows: list[dict], task: str, keys: tuple[str, ...] = FRONT_KEYS) -> list[dict]:
    """Rows that no other row beats (``beats``). The front is over latency, file size and non-zero
    parameters together (the costs the issue trades against the metric); sorted by the first key."""
    front = [row for row in rows if not beaten_by(row, rows, task, keys)]
    return sorted(front, key=lambda r: r[keys[0]])


def choose(rows: list[dict], base: float, task: str, goal: Goal) -> dict | None:
    """With a limit: the best objective among the rows that meet it (and the budgets), the better
    metric on a tie. Budgets alone: the best metric among the rows within them."""
    key = OBJECTIVE_KEY[goal.objective]
    fitting = [r for r in rows if meets(r, base, task, goal)]
    if not fitting:
        return None
    if goal.has_limit:
        return min(fitting, key=lambda r: (r[key], -quality(r, task)))
    return max(fitting, key=lambda r: (quality(r, task), -r[key]))


def closest(rows: list[dict], base: float, task: str, goal: Goal, count: int = 3) -> list[dict]:
    """When nothing meets the goal: the rows that miss it by least (metric first, then the budgets)."""
    def miss(row: dict) -> tuple:
        worse = drop(row.get("value"), base, task, goal)
        over_limit = max(0.0, (worse if worse is not None else float("inf")) - (goal.max_drop or float("inf")))
        over_latency = max(0.0, row["latency_ms_p50"] / goal.latency_budget_ms - 1) if goal.latency_budget_ms else 0.0
        over_size = max(0.0, row["file_bytes"] / (goal.size_budget_mb * 1e6) - 1) if goal.size_budget_mb else 0.0
        return (over_limit, over_latency + over_size)
    return sorted(rows, key=miss)[:count]
