"""bigmodel optimize: options → OptimizeRequest → engine.optimize → the front as compare's table, the
choice, the files written (or --json); --dry-run prints the plan and writes nothing."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, JsonOpt, OutOpt

_G = "Goal"
_S = "Search"


def optimize(
    artifact: ArtifactArg,
    max_drop: Annotated[Optional[str], typer.Option("--max-drop", help="How much worse the model may get: accuracy points (1.0), or relative (3%); a language model's perplexity rise in percent.", rich_help_panel=_G, show_default=False)] = None,
    objective: Annotated[str, typer.Option("--objective", help="What to make smallest among the models within the limit: latency, size or params.", rich_help_panel=_G)] = "latency",
    latency_budget_ms: Annotated[Optional[float], typer.Option("--latency-budget-ms", help="The chosen model's p50 latency on --backend must be at most this.", rich_help_panel=_G, show_default=False)] = None,
    size_budget_mb: Annotated[Optional[float], typer.Option("--size-budget-mb", help="The chosen model's file must be at most this many MB (10^6 bytes).", rich_help_panel=_G, show_default=False)] = None,
    time_budget: Annotated[str, typer.Option("--time-budget", help="Wall-clock time the search may take, e.g. 30m, 90s, 1h (a rerun continues with what is left).", rich_help_panel=_S)] = "30m",
    space: Annotated[str, typer.Option("--space", help="full, or quick (one level of each family: a first look).", rich_help_panel=_S)] = "full",
    only: Annotated[Optional[str], typer.Option("--only", help="Families to search, a comma list of quantize, prune, distill, qat (default: all).", rich_help_panel=_S, show_default=False)] = None,
    backend: Annotated[str, typer.Option("--backend", help="The runtime you deploy on: onnx (ONNX Runtime) or torch (PyTorch). Only candidates that run there are searched, and all are measured there.", rich_help_panel=_S)] = "onnx",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Threads the latency is measured with (default: compare's, all cores).", rich_help_panel=_S, show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="Split the metric is measured on.", rich_help_panel=_S)] = "val",
    rounds: Annotated[int, typer.Option("--rounds", help="Timed calls per model when measuring latency (side by side).", rich_help_panel=_S)] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every training step.", rich_help_panel=_S)] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and its estimated cost; run and write nothing.")] = False,
    out: OutOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the search again in an --out that holds one (without it, a rerun continues the search).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Search prune, distill and quantize for the best model under a metric limit and budgets; writes the
    chosen model, the Pareto front (table, plot, report) and a recipe that rebuilds the winner."""
    from ..artifact import open_artifact
    from ..engine.optimize.command import OptimizeRequest, make_plan, optimize as run_optimize, resume_status
    from ..engine.optimize.space import Goal, parse_duration, parse_max_drop, parse_only
    from ..errors import UserError, WorkFailed
    from .progress import OptimizeProgress

    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    drop, relative = parse_max_drop(max_drop)
    goal = Goal(objective=objective, max_drop=drop, relative=relative, latency_budget_ms=latency_budget_ms,
                size_budget_mb=size_budget_mb, time_budget_s=parse_duration(time_budget))
    if out is None and not dry_run:
        raise UserError("give --out DIR for the search (its candidates, the chosen model and the reports)")
    request = OptimizeRequest(artifact=open_artifact(artifact), out=out, goal=goal, space=space, only=parse_only(only),
                              seed=seed, split=split, rounds=rounds, overwrite=overwrite, backend=backend, threads=threads)
    if dry_run:
        _print_plan(make_plan(request), request, resume_status(out) if out else "new", json_out)
        return
    make_plan(request)  # every option checked before the progress display starts (one error line)
    with OptimizeProgress(enabled=not json_out) as progress:
        outcome = run_optimize(request, progress)
    if json_out:
        console.print_json(outcome.summary)
    else:
        _print_outcome(outcome)
    if outcome.chosen is None:
        closest = ", ".join(f"{r['name']} ({_miss(r, outcome.summary['metric'])})" for r in outcome.closest)
        raise WorkFailed(f"searched, but nothing met the goal; the front and report are in {out}; closest: {closest}; "
                         "loosen --max-drop or the budgets, or rerun with a larger --time-budget")


def _miss(row: dict, metric: str) -> str:
    drop = row.get("drop")
    return f"{metric} {row['value']:.4g}" + (f", drop {drop:.2f}" if drop is not None else "") + \
        f", {row['latency_ms_p50']:.3g} ms, {row['file_bytes'] / 1e6:.3g} MB"


def _print_plan(plan, request, status: str, json_out: bool) -> None:
    steps = [{"name": s.name, "command": s.command, "reads": s.parent, "options": s.options,
              "estimate_s": round(s.estimate_s, 1)} for s in plan.steps]
    if json_out:
        console.print_json({"dry_run": True, "out": str(request.out) if request.out else None, "out_status": status,
                            "backend": plan.backend, "threads": request.threads, "steps": steps, "estimate_s": plan.estimate_s(), "time_budget_s": request.goal.time_budget_s,
                            "notes": plan.notes})
        return
    rows = [(s["name"], s["command"], s["reads"], " ".join(f"{k}={v}" for k, v in s["options"].items()),
             f"{s['estimate_s']:.0f}") for s in steps]
    from ..engine.optimize.space import RUNTIME

    console.out.print(console.rows_table(
        f"bigmodel optimize --dry-run · first pass, cheap first · candidates for {RUNTIME[plan.backend]} · "
        f"estimated {plan.estimate_s():.0f} s of a {request.goal.time_budget_s:.0f} s budget",
        ["step", "command", "reads", "options", "est. s"], rows))
    composed = {"onnx": "quantized (dynamic int8)", "torch": "quantized (weight-only int8, for size or params)"}
    console.note(f"then: what meets the limit is {composed[plan.backend]}, and the near misses are retrained with "
                 "twice the budget (successive halving) while time is left")
    if request.out and status == "resume":
        console.note(f"{request.out} holds a search: a run continues it (finished candidates are reused)")
    for note in plan.notes:
        console.note(note)
    console.note("nothing was run or written (--dry-run)")


def _print_outcome(outcome) -> None:
    from ..engine.compare import columns_for, table_cell

    comparison = outcome.comparison
    columns = columns_for(comparison) + [("drop", "drop"), ("meets", "meets")]
    front = {r["name"] for r in outcome.front}
    title = (f"bigmodel optimize · {comparison.metric} on {comparison.split} · latency on {comparison.backend}, "
             f"{comparison.threads} threads, side by side · ★ = Pareto front, ✔ = chosen · (×) = ratio to the first row")
    table = console.rows_table(title, [t for _, t in columns], [])
    for row in outcome.rows:
        mark = "✔ " if outcome.chosen and row["name"] == outcome.chosen["name"] else ("★ " if row["name"] in front else "")
        cells = [table_cell(row, key) if key not in ("drop", "meets") else
                 ("-" if row.get(key) is None else (f"{row[key]:.2f}" if key == "drop" else ("yes" if row[key] else "no")))
                 for key, _ in columns]
        cells[0] = mark + cells[0]
        table.add_row(*cells)
    console.out.print(table)
    summary = outcome.summary
    if outcome.chosen:
        console.note(f"chosen: {outcome.chosen['name']} → {summary['chosen']['artifact']}")
    for note in summary["notes"]:
        console.note(note)
    for key, path in summary["files"].items():
        console.note(f"wrote {path}")
