"""The search's outputs: the final side-by-side comparison (``compare``'s own code and columns) of
the base, the front and the choice; the trade-off plot; report.md/report.html; the chosen model
(a copy of its artifact, lineage and all); the recipe TOML that rebuilds it without searching.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ... import artifact as art
from ...output_file import write_atomic
from ..compare import CompareResult, figure_png, markdown_report
from ..core.plot import pyplot
from . import front as fr
from .search import SearchResult, measure_side_by_side
from .space import INPUT, RUNTIME, Goal

CHOSEN = "chosen"
FILES = {"report_md": "report.md", "report_html": "report.html", "plot": "tradeoff.png", "recipe": "recipe.toml",
         "json": "optimize.json"}
MAX_ROWS = 12  # rows of the final comparison: the base, the front, the choice, then the nearest others


@dataclass
class Outcome:
    comparison: CompareResult
    rows: list[dict]  # the final comparison's rows, named by candidate
    front: list[dict]
    chosen: dict | None
    closest: list[dict]
    summary: dict  # the --json object, also OUT/optimize.json


def finish(search: SearchResult, goal: Goal, *, split: str, rounds: int, progress, threads: int | None = None) -> Outcome:
    """Measure the finalists side by side, choose, and write every output into the search directory."""
    task = search.plan.task
    measured = search.rows()
    base_row = search.state.get("base_row")
    if search.base == INPUT and base_row:
        measured = {INPUT: {**base_row, "name": INPUT}, **measured}
    finalists = _finalists(search, measured, goal)
    progress("final", rows=len(finalists))
    comparison = measure_side_by_side([search.path_of(n) for n in finalists], search.plan.backend, threads,
                                      split=split, rounds=rounds)
    rows = comparison.rows
    for name, row in zip(finalists, rows):
        row["name"] = name
    base = rows[0]["value"]
    for row in rows:
        row["drop"] = fr.drop(row["value"], base, task, goal)
        row["meets"] = fr.meets(row, base, task, goal)
    front = fr.pareto_front(rows, task, fr.front_keys(goal.objective))
    chosen = fr.choose(rows, base, task, goal)
    closest = [] if chosen else fr.closest(rows, base, task, goal)
    out = search.out
    if chosen is not None:
        _copy_chosen(search.path_of(chosen["name"]), out / CHOSEN)
    elif (out / CHOSEN).exists():
        shutil.rmtree(out / CHOSEN)  # a previous run's choice does not meet this goal
    plot = tradeoff_png(rows, front, chosen, comparison, goal)
    summary = _summary(search, goal, comparison, rows, front, chosen, closest)
    write_atomic(out / FILES["plot"], plot)
    write_atomic(out / FILES["report_md"], markdown(search, goal, comparison, front, chosen, closest))
    write_atomic(out / FILES["report_html"], html_page(search, goal, comparison, front, chosen, plot))
    if chosen is not None:
        write_atomic(out / FILES["recipe"], recipe_toml(search, chosen["name"]))
    elif (out / FILES["recipe"]).exists():
        (out / FILES["recipe"]).unlink()
    write_atomic(out / FILES["json"], json.dumps(summary, indent=2) + "\n")
    return Outcome(comparison, rows, front, chosen, closest, summary)


def _finalists(search: SearchResult, measured: dict[str, dict], goal: Goal) -> list[str]:
    """The base first, then the search-time front, the best three that meet the goal, and the rest
    by how close they came to the front (fewest rows that beat them), so the final side-by-side
    measurement spends its rows where the front may move."""
    task = search.plan.task
    key = fr.OBJECTIVE_KEY[goal.objective]
    keys = fr.front_keys(goal.objective)
    rows = list(measured.values())
    base = measured[search.base]["value"]
    ranked = [r["name"] for r in fr.pareto_front(rows, task, keys)]
    ranked += [r["name"] for r in sorted(rows, key=lambda r: r[key]) if fr.meets(r, base, task, goal)][:3]
    ranked += [r["name"] for r in sorted(rows, key=lambda r: (fr.beaten_by(r, rows, task, keys), r[key]))]
    names = [search.base]
    for name in ranked:
        if name not in names and len(names) < MAX_ROWS:
            names.append(name)
    return names


def _copy_chosen(source: Path, target: Path) -> None:
    """OUT/chosen: the winner's artifact, copied file by file (its manifest and lineage unchanged)."""
    source = art.resolve_artifact_dir(source)
    with art.atomic_directory(target, overwrite=True, inputs=[source]) as staging:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)


# ------------------------------------------------------------------ the table, plot and reports


def _summary(search: SearchResult, goal: Goal, comparison: CompareResult, rows: list[dict], front: list[dict],
             chosen: dict | None, closest: list[dict]) -> dict:
    steps = [{"name": n, "status": s.get("status"), "command": s["record"]["command"], "parent": s["record"]["parent"],
              "seconds": s.get("seconds"), "estimate_s": s.get("estimate_s"), "error": s.get("error")}
             for n, s in search.state["steps"].items()]
    this_run = {e["name"]: e["status"] for e in search.events}
    for step in steps:
        step["this_run"] = this_run.get(step["name"])
    return {"out": str(search.out), "task": search.plan.task, "metric": comparison.metric, "split": comparison.split,
            "backend": comparison.backend, "threads": comparison.threads,
            "goal": {"objective": goal.objective, "max_drop": goal.max_drop, "relative": goal.relative,
                     "latency_budget_ms": goal.latency_budget_ms, "size_budget_mb": goal.size_budget_mb,
                     "time_budget_s": goal.time_budget_s},
            "chosen": {**chosen, "artifact": str(search.out / CHOSEN)} if chosen else None,
            "closest": [r["name"] for r in closest],
            "front": [r["name"] for r in front], "rows": rows, "steps": steps,
            "estimate_s": search.plan.estimate_s(), "seconds_this_run": search.seconds,
            "seconds_total": search.state.get("seconds"), "notes": search.plan.notes + comparison.notes,
            "files": {k: str(search.out / v) for k, v in FILES.items() if k != "recipe" or chosen}}


def tradeoff_png(rows: list[dict], front: list[dict], chosen: dict | None, comparison: CompareResult,
                 goal: Goal) -> bytes:
    """Metric against latency and against file size; the front joined and highlighted, the choice
    ringed, the budgets and the metric limit drawn as lines."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    front_names = {r["name"] for r in front}
    base = rows[0]["value"]
    limit = _limit_value(base, comparison.metric, goal)
    for ax, key, label, budget in ((axes[0], "latency_ms_p50", f"latency p50, ms ({comparison.backend})",
                                    goal.latency_budget_ms),
                                   (axes[1], "file_bytes", "file size, MB", goal.size_budget_mb)):
        scale = 1e6 if key == "file_bytes" else 1.0
        for row in rows:
            on = row["name"] in front_names
            ax.scatter(row[key] / scale, row["value"], s=70 if on else 30, alpha=0.9 if on else 0.45,
                       color="tab:red" if on else "tab:gray", edgecolors="black", zorder=3)
            ax.annotate(row["name"], (row[key] / scale, row["value"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
        # the front's outline in this panel's plane (the highlighted points are the front over every cost)
        line = fr.pareto_front(rows, "language-modeling" if comparison.metric == "perplexity" else "classification", (key,))
        ax.plot([r[key] / scale for r in line], [r["value"] for r in line], color="tab:red", lw=1, zorder=2,
                label="Pareto front (this plane)")
        if chosen is not None:
            ax.scatter(chosen[key] / scale, chosen["value"], s=260, facecolors="none", edgecolors="tab:green",
                       linewidths=2, zorder=4, label=f"chosen: {chosen['name']}")
        if budget is not None:
            ax.axvline(budget, color="tab:blue", ls="--", lw=1, label="budget")
        if limit is not None:
            ax.axhline(limit, color="tab:orange", ls=":", lw=1, label="metric limit")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{comparison.metric} ({comparison.split})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"bigmodel optimize: {comparison.metric} vs latency and size (objective {goal.objective})", fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def _limit_value(base: float, metric: str, goal: Goal) -> float | None:
    """The worst metric value the limit allows, for the plot's line."""
    if goal.max_drop is None:
        return None
    if metric == "perplexity":
        return base * (1 + goal.max_drop / 100)
    return base * (1 - goal.max_drop / 100) if goal.relative else base - goal.max_drop / 100


def _goal_lines(search: SearchResult, goal: Goal) -> list[str]:
    budgets = [f"latency ≤ {goal.latency_budget_ms:g} ms" for _ in [0] if goal.latency_budget_ms is not None]
    budgets += [f"file ≤ {goal.size_budget_mb:g} MB" for _ in [0] if goal.size_budget_mb is not None]
    spent = search.state.get("seconds") or 0.0
    return [f"Goal: {goal.limit_text(search.plan.task)}" + (f"; {', '.join(budgets)}" if budgets else "")
            + f"; objective: smallest {goal.objective}.",
            f"Runtime: every candidate built to run on {RUNTIME[search.plan.backend]} (--backend "
            f"{search.plan.backend}) and measured there, {threads_text(search)}.",
            f"Search: {len(search.state['steps'])} steps, {spent:.0f} s of a {goal.time_budget_s:.0f} s budget "
            f"(estimated {search.plan.estimate_s():.0f} s for the first pass)."]


def threads_text(search: SearchResult) -> str:
    threads = search.state.get("fingerprint", {}).get("threads")
    return f"{threads} threads (--threads)" if threads else "with compare's default threads (all cores)"


def markdown(search: SearchResult, goal: Goal, comparison: CompareResult, front: list[dict], chosen: dict | None,
             closest: list[dict]) -> str:
    lines = ["# bigmodel optimize", "", *_goal_lines(search, goal), ""]
    if chosen:
        lines.append(f"**Chosen: `{chosen['name']}`** ({_describe(chosen, comparison.metric)}), copied to "
                     f"`{CHOSEN}/`; `{FILES['recipe']}` rebuilds it without searching.")
    else:
        lines.append("**Nothing met the goal.** Closest: " + ", ".join(f"`{r['name']}` ({_describe(r, comparison.metric)})"
                                                                   for r in closest) + ".")
    lines += ["", f"Pareto front ({comparison.metric} against latency, file size and non-zero parameters): "
              + ", ".join(f"`{r['name']}`" for r in front), "",
              f"![trade-off]({FILES['plot']})", "", markdown_report(comparison).replace("# Comparison", "## Finalists", 1),
              "## Every step", "", "| step | command | reads | status | seconds | estimate |", "|---|---|---|---|---|---|"]
    for name, s in search.state["steps"].items():
        seconds = f"{s['seconds']:.1f}" if s.get("seconds") is not None else "-"
        status = s.get("status", "-") + (f": {s['error']}" if s.get("error") else "")
        lines.append(f"| {name} | {s['record']['command']} | {s['record']['parent']} | {status} | {seconds} | "
                     f"{s.get('estimate_s', 0):.1f} |")
    skipped = [e for e in search.events if e["status"] in ("stopped", "over budget", "skipped")]
    if skipped:
        lines += ["", "Not run this time: " + ", ".join(f"{e['name']} ({e['status']})" for e in skipped) + "."]
    lines += [f"Note: {n}" for n in search.plan.notes]
    return "\n".join(lines) + "\n"


def _describe(row: dict, metric: str) -> str:
    ratio = row.get("latency_ms_p50_ratio")
    return (f"{metric} {row['value']:.4g}, p50 {row['latency_ms_p50']:.3g} ms"
            + (f" ({1 / ratio:.2f}× faster than the base)" if ratio else "") + f", {row['file_bytes']:,} bytes")


def html_page(search: SearchResult, goal: Goal, comparison: CompareResult, front: list[dict], chosen: dict | None,
              plot: bytes) -> str:
    from ..compare import html_report

    body = html_report(comparison, plot)
    head = "".join(f"<p>{html.escape(line)}</p>" for line in _goal_lines(search, goal))
    head += (f"<p><b>Chosen: {html.escape(chosen['name'])}</b> ({html.escape(_describe(chosen, comparison.metric))})</p>"
             if chosen else "<p><b>Nothing met the goal.</b></p>")
    head += "<p>Pareto front: " + html.escape(", ".join(r["name"] for r in front)) + "</p>"
    return body.replace("<h1>What each step bought</h1>", f"<h1>bigmodel optimize</h1>{head}", 1) \
               .replace("<title>bigmodel compare</title>", "<title>bigmodel optimize</title>", 1)


# ------------------------------------------------------------------ the recipe


def lineage(search: SearchResult, name: str) -> list[str]:
    """The steps from the input to ``name``, in order."""
    chain: list[str] = []
    while name != INPUT and name not in chain:  # a state file edited into a cycle must not hang the search
        chain.append(name)
        name = search.state["steps"][name]["record"]["parent"]
    return chain[::-1]


def recipe_toml(search: SearchResult, name: str) -> str:
    """A `bigmodel run` recipe of the winner's steps, reading the input through [inputs]."""
    lines = [f"# Written by bigmodel optimize: rebuilds {name!r} of {search.out} without searching.",
             f"# It was chosen as measured on {RUNTIME[search.plan.backend]} (--backend {search.plan.backend}).",
             f"#   bigmodel run {search.out / FILES['recipe']} --out DIR",
             f"description = {_toml(f'bigmodel optimize: the chosen model {name}')}", "",
             "[inputs]", f"input = {_toml(search.state['input'])}"]
    for step_name in lineage(search, name):
        record = search.state["steps"][step_name]["record"]
        reference = "teacher" if record["command"] == "distill" else "from"
        lines += ["", "[[steps]]", f"name = {_toml(step_name)}", f"command = {_toml(record['command'])}",
                  f"{reference} = {_toml(record['parent'])}"]
        lines += [f"{key} = {_toml(value)}" for key, value in record["options"].items()]
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")
