"""``bigmodel optimize``'s one engine call: check the goal, plan, then search (resuming what the
output directory already holds) and write the outputs; or, with ``dry_run``, only the plan.

Output policy (as ``bigmodel run``): an --out that holds this search's state file is continued; any
other existing --out is refused unless --overwrite, and an overwritten search is set aside until
the new one has finished (put back if it fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ... import outputs
from ...artifact import Artifact
from ...config import threads_problem
from ...errors import UserError
from ...output_lock import hold
from ...output_staging import rebuilt_in_place
from ..core.progress import Progress, no_progress
from .front import within_budgets
from .report import Outcome, finish
from .search import STATE_FILE, Search, check_resumable, fingerprint, load_state, measure_side_by_side, new_state
from .space import BASE, FAMILIES, INPUT, RUNTIME, Goal, Plan, check_goal, plan_space


ONNX_OVERHEAD_BYTES = 2000  # the graph itself, without its weights (a digits MLP's: about 2 KB)


@dataclass
class OptimizeRequest:
    artifact: Artifact
    out: Path
    goal: Goal
    space: str = "full"
    only: tuple[str, ...] = FAMILIES
    seed: int = 0
    split: str = "val"
    rounds: int = 20  # timed calls per model when measuring (the final comparison too)
    overwrite: bool = False
    backend: str = "onnx"  # the runtime the candidates must run on and are measured on
    threads: int | None = None  # the threads the timing uses (None: compare's default, all cores)


def make_plan(request: OptimizeRequest) -> Plan:
    """The goal checked and the first pass planned; nothing written (what --dry-run shows)."""
    check_goal(request.goal)
    if request.split not in ("train", "val", "test"):
        raise UserError(f"--split {request.split!r} is unknown; choose val (default), test or train")
    problem = threads_problem(request.threads)
    if problem:
        raise UserError(problem)
    plan = plan_space(request.artifact, request.goal, request.space, request.only, request.seed, request.backend)
    if not [s for s in plan.steps if s.measure and s.name not in (BASE, INPUT)]:
        other = " or --backend onnx" if request.backend == "torch" else ""
        raise UserError("the space is empty for this model (" + "; ".join(plan.notes or ["nothing to try"])
                        + f"); widen --only or --space{other}")
    _check_size_possible(plan, request.goal)
    return plan


def resume_status(out: Path) -> str:
    """What a run would do with --out: 'new', 'resume' or 'exists'."""
    if not out.exists():
        return "new"
    return "resume" if (out / STATE_FILE).is_file() else "exists"


def optimize(request: OptimizeRequest, progress: Progress | None = None) -> Outcome:
    say = progress or no_progress
    plan = make_plan(request)
    artifact, out, goal = request.artifact, Path(request.out), request.goal
    expected = fingerprint(artifact, request.space, request.only, request.seed, request.split, request.backend,
                           request.threads)
    with hold(out):
        state = None
        if out.exists() and not request.overwrite and (out / STATE_FILE).exists():
            state = load_state(out)
            check_resumable(out, state, expected)
        if state is None and not goal.has_limit:
            _refuse_if_input_meets_budgets(artifact, goal, request)  # before anything is written
        if state is not None:
            return _search(artifact, out, plan, goal, state, request, say)
        outputs.check_output(out, request.overwrite, [artifact.path, artifact.data_spec.get("path")], lock_probe=False)
        with rebuilt_in_place(out, "search directory"):
            return _search(artifact, out, plan, goal, new_state(expected, artifact.path), request, say)


def _search(artifact: Artifact, out: Path, plan: Plan, goal: Goal, state: dict, request: OptimizeRequest,
            say: Progress) -> Outcome:
    search = Search(artifact, out, plan, goal, state, split=request.split, rounds=request.rounds, progress=say,
                    threads=request.threads)
    return finish(search.run(), goal, split=request.split, rounds=request.rounds, progress=say, threads=request.threads)


def _refuse_if_input_meets_budgets(artifact: Artifact, goal: Goal, request: OptimizeRequest) -> None:
    """Budgets alone and the input already within them: nothing to search; say so and name it."""
    row = measure_side_by_side([artifact.path], request.backend, request.threads, split=request.split,
                               rounds=request.rounds).rows[0]
    if within_budgets(row, goal):
        raise UserError(f"{artifact.path} already meets the budget (p50 {row['latency_ms_p50']:.3g} ms, "
                        f"{row['file_bytes'] / 1e6:.3g} MB on {RUNTIME[request.backend]}): use it as it is, or give "
                        "--max-drop to search for something smaller or faster")


def _check_size_possible(plan: Plan, goal: Goal) -> None:
    """A size budget below what even the smallest candidate can reach: an impossible limit, said before
    any work, with the closest candidates."""
    if goal.size_budget_mb is None:
        return
    by_name = {step.name: step for step in plan.steps}
    estimates = sorted((estimated_bytes(plan, step, by_name), step.name)
                       for step in plan.steps if step.measure and step.name not in (BASE, INPUT))
    if estimates and goal.size_budget_mb * 1e6 < 0.5 * estimates[0][0]:
        closest = ", ".join(f"{name} (~{size / 1e6:.3g} MB)" for size, name in estimates[:3])
        raise UserError(f"--size-budget-mb {goal.size_budget_mb:g} is below what any candidate of this space can "
                        f"reach; the closest are {closest}; raise the budget or widen --space")


def estimated_bytes(plan: Plan, step, by_name: dict) -> float:
    """The file a candidate would ship: its model's parameters × bytes per parameter."""
    per_param = 4.0
    if step.family in ("quantize", "qat"):
        per_param = 0.5 if step.options.get("bits") == 4 else 1.0
    fraction = 1.0
    while step is not None:  # the model's own size: a student's or a pruned model's share of the input's
        if step.command == "distill":
            fraction *= step.estimate_fraction
        if step.command == "prune" and step.options.get("method") == "structured":
            fraction *= (1 - step.options["sparsity"]) ** 2
        step = by_name.get(step.parent)
    return ONNX_OVERHEAD_BYTES + plan.params * fraction * per_param
