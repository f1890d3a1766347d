"""The budgeted search: cheap steps first, a branch stopped at its first miss, what passed quantized,
then successive halving of the near misses; every step a normal artifact under ``OUT/candidates``,
recorded in ``OUT/optimize-state.json`` so that a rerun skips what finished (as ``bigmodel run`` does).

Strategy (docs/optimize.md, "Strategy"):

1. The plan's first pass (``space.plan_space``), in order: export the input (the base every candidate
   is measured against), quantize it, prune with short fine-tuning, QAT, distil into ever smaller
   students. Each branch (structured pruning levels, student widths) goes from mild to aggressive
   and stops at its first level that breaks the metric limit: a harsher level would break it too.
2. Compose: every pruned or distilled model that meets the limit is quantized (dynamic int8).
3. Successive halving near the front: the trained candidates that missed the limit by at most
   ``NEAR`` times it, and would beat the best candidate so far on the objective, are ranked by
   the objective; the better half is retrained with twice the fine-tuning budget, and so on for
   ``RUNGS`` rungs or until the time budget is spent. What passes is composed again.
4. Chart: with the time left, the next level past each branch's first miss, so that the front
   also shows what the next step down would cost (it usually breaks the limit, as its milder level did);
   then every trained model on the front is quantized (its int8 copy is its smallest file).

Before each step its estimated cost (rescaled by what finished steps really took) is checked
against the time left; a step that does not fit is left out ("over budget") and runs on a rerun
with a larger --time-budget. A training step that overruns its estimate is stopped at the end of
the time left (``training_deadline``) and recorded "over budget" too (docs/optimize.md, "How far
the time budget can be overrun").

On --backend torch the plan holds no export steps: a trained artifact is measured itself, and
composition is weight-only int8 (for size or params) instead of ONNX Runtime's dynamic int8.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...artifact import Artifact, open_artifact
from ...errors import UserError, WorkFailed
from ...output_file import write_json_atomic
from ...outputs import OPTIMIZE_STATE_FILE
from ..core.progress import Progress, no_progress
from ..training.loop import training_deadline
from . import front as fr
from .space import BASE, FIXED_SECONDS, INPUT, MEASURE_SECONDS, Goal, Plan, Step, export_of, training_amount
from .steps import run_step

STATE_FILE = OPTIMIZE_STATE_FILE  # outputs.py knows it, so --overwrite may replace a search
STATE_FORMAT = "bigmodel-optimize"
CANDIDATES = "candidates"
NEAR = 3.0  # a miss by at most NEAR × --max-drop is worth a longer fine-tuning
RUNGS = 2
FINAL_RESERVE_S = 30.0
ROW_KEYS = ("name", "path", "stage", "params", "nonzero_params", "file_bytes", "metric", "value", "loss",
            "bits_per_byte", "latency_ms_p50", "latency_ms_p95", "latency_ms_p50_ratio")


@dataclass
class SearchResult:
    out: Path
    plan: Plan
    base: str  # the step (or INPUT) every candidate was measured against
    state: dict
    events: list[dict] = field(default_factory=list)  # this run: name, status, seconds
    seconds: float = 0.0

    def rows(self) -> dict[str, dict]:
        return measured_rows(self.state)

    def path_of(self, name: str) -> Path:
        return candidate_path(self.out, name, self.state["input"])


def measured_rows(state: dict) -> dict[str, dict]:
    """Measured candidates whose every step is recorded complete (so a recipe can rebuild them):
    name → compare row."""
    return {name: {**s["row"], "name": name} for name, s in state["steps"].items()
            if s.get("row") and s.get("status") == "complete" and _rooted(state, name)}


def _rooted(state: dict, name: str) -> bool:
    seen = set()
    steps = state["steps"]
    while name != INPUT:
        if name in seen or steps.get(name, {}).get("status") != "complete":
            return False
        seen.add(name)
        name = steps[name]["record"]["parent"]
    return True


def candidate_path(out: Path, name: str, input_path: str) -> Path:
    return Path(input_path) if name == INPUT else out / CANDIDATES / name


def fingerprint(artifact: Artifact, space: str, only: tuple[str, ...], seed: int, split: str, backend: str = "onnx",
                threads: int | None = None) -> dict:
    """What the candidates and their recorded measurements depend on (the backend decides the space,
    the backend and threads every latency); the limit, budgets and time may change between runs (a
    rerun with another limit reuses every finished candidate)."""
    digest = hashlib.sha256((artifact.path / "manifest.json").read_bytes()).hexdigest()
    return {"input": str(artifact.path), "input_manifest": digest, "space": space, "only": list(only),
            "seed": seed, "split": split, "backend": backend, "threads": threads}


def load_state(out: Path) -> dict | None:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > 16 << 20:
            raise ValueError("too large")
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: cannot be read as an optimize state; pass --overwrite to start the search again") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("steps"), dict):
        raise UserError(f"{path}: is not an optimize state file; pass --overwrite to start the search again")
    # An entry that is not what the search writes is forgotten: its step runs again.
    state["steps"] = {name: entry for name, entry in state["steps"].items() if _sane(name, entry)}
    if not _sane_row(state.get("base_row")):
        state.pop("base_row", None)
    if not isinstance(state.get("seconds"), (int, float)):
        state["seconds"] = 0.0
    return state


def _sane(name: str, entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict):
        return False
    record = entry["record"]
    if not isinstance(record.get("parent"), str) or record["parent"] == name or not isinstance(record.get("options"), dict):
        return False
    if "row" in entry and not _sane_row(entry["row"]):
        return False
    return all(isinstance(entry.get(k, 0.0), (int, float)) for k in ("seconds", "estimate_s"))


def _sane_row(row) -> bool:
    """A measured row: the numbers the choice and the front compare."""
    return isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                                         for k in ("value", "latency_ms_p50", "file_bytes", "nonzero_params"))


def check_resumable(out: Path, state: dict, expected: dict) -> None:
    if state.get("fingerprint") != expected:
        changed = sorted(k for k in expected if (state.get("fingerprint") or {}).get(k) != expected[k])
        raise UserError(f"{out}: holds a search of another input, space or runtime (differs in {', '.join(changed)}); "
                        "pass --overwrite to start again, or choose another --out")


class Search:
    """One run of the search in a locked output directory (``command.optimize`` holds the lock)."""

    def __init__(self, artifact: Artifact, out: Path, plan: Plan, goal: Goal, state: dict, *, split: str,
                 rounds: int, progress: Progress, threads: int | None = None):
        self.artifact, self.out, self.plan, self.goal, self.state = artifact, out, plan, goal, state
        self.split, self.rounds, self.say, self.threads = split, rounds, progress, threads
        self.started = time.perf_counter()
        self.spent_before = float(state.get("seconds", 0.0))
        self.events: list[dict] = []
        self.stopped: dict[str, str] = {}  # branch → the step that broke the limit
        self.charting: set[str] = set()  # steps past a branch's first miss, run to chart the front
        self.known = {s.name: s for s in plan.steps}
        # the input's export when the plan makes one (ONNX Runtime, a PyTorch input), else the input itself
        self.base = BASE if BASE in self.known else INPUT

    # ----------------------------------------------------------------- time

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def scale(self, family: str) -> float:
        """Actual / estimated seconds of what ran, so estimates learn this machine and its load: the
        worst of the last three steps of the same family (training steps are the ones that can
        overrun), else of any family, else 1."""
        def ratios(which: str | None) -> list[float]:
            return [s["seconds"] / s["estimate_s"] for s in self.state["steps"].values()
                    if s.get("status") == "complete" and s.get("estimate_s") and s.get("seconds")
                    and (which is None or s["record"].get("family") == which)]
        recent = ratios(family)[-3:] or ratios(None)[-3:]
        return min(50.0, max(0.25, max(recent))) if recent else 1.0

    # ----------------------------------------------------------------- the phases

    def run(self) -> SearchResult:
        self.say("plan", steps=len(self.plan.steps), estimate_s=self.plan.estimate_s(), budget_s=self.goal.time_budget_s)
        if self.base == INPUT and "base_row" not in self.state:
            self.measure(INPUT)  # an ONNX input is its own base
        self.run_steps(self.plan.steps)
        self.compose()
        for rung in range(1, RUNGS + 1):
            promoted = self.promote(rung)
            if not promoted:
                break
            self.run_steps(promoted)
            self.compose()
        self.run_steps(self.chart())
        self.compose(on_front=True)
        self.save()
        return SearchResult(self.out, self.plan, self.base, self.state, self.events, time.perf_counter() - self.started)

    def run_steps(self, steps: list[Step]) -> None:
        for step in steps:
            self.known[step.name] = step
            status = self.run_one(step)
            self.events.append({"name": step.name, "status": status})
            self.say("step", name=step.name, status=status, spent_s=self.spent(), budget_s=self.goal.time_budget_s)

    def run_one(self, step: Step) -> str:
        entry = self.state["steps"].get(step.name, {})
        output = candidate_path(self.out, step.name, self.state["input"])
        if entry.get("status") == "complete" and entry.get("record") == step.record() and _whole(output):
            self.after(step)
            return "reused"
        if entry.get("status") == "failed" and entry.get("record") == step.record() and step.name != self.base:
            return "failed"  # the same options failed before; a rerun would fail again
        if step.parent != INPUT and not self._finished(step.parent):
            return "skipped"  # its parent was stopped, left out or failed
        if step.branch in self.stopped and step.command != "export" and step.rung == 0 and step.name not in self.charting:
            return "stopped"
        estimate = step.estimate_s * self.scale(step.family)
        if step.name != self.base and estimate > self.time_left():
            return "over budget"
        self.say("start", name=step.name, command=step.command, estimate_s=estimate)
        record = {"record": step.record(), "estimate_s": step.estimate_s, "status": "running"}
        self.state["steps"][step.name] = record
        self.save()
        began = time.perf_counter()
        parent = candidate_path(self.out, step.parent, self.state["input"])
        try:
            # a training step (prune, distill, QAT) stops at the budget's end even if it overruns its estimate
            with training_deadline(self.time_left()) as deadline:
                run_step(step, parent, output, overwrite=output.exists(), progress=no_progress)
            if deadline.reached:
                return self.cut_short(step, record, time.perf_counter() - began)
            if step.measure:
                record["row"] = self.measure(step.name)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 — one candidate's failure is a result of the search, not its end
            record.pop("row", None)
            record.update(status="failed", error=_one_line(exc), seconds=time.perf_counter() - began)
            self.save()
            self.say("failed", name=step.name, error=record["error"])
            if step.name == self.base:  # nothing can be measured without the base
                raise WorkFailed(f"the input could not be exported to ONNX Runtime to measure against: "
                                 f"{record['error']}") from exc
            return "failed"
        record["status"] = "complete"
        record["seconds"] = time.perf_counter() - began  # with the measurement, as the estimate counts it
        self.save()
        self.after(step)
        return "ran"

    def time_left(self) -> float:
        """Seconds until the search must stop starting or training steps (the final comparison's reserve kept)."""
        return self.goal.time_budget_s - final_reserve(self.goal) - self.spent()

    def cut_short(self, step: Step, record: dict, seconds: float) -> str:
        """A training step stopped at the time budget is not the model its options describe (the
        recipe could not rebuild it): it is left unmeasured and unused, and runs again on a rerun."""
        record.update(status="over budget", seconds=seconds,
                      error="its training reached the end of the time budget and was stopped; rerun with a larger "
                            "--time-budget")
        self.save()
        return "over budget"

    def _finished(self, name: str) -> bool:
        return self.state["steps"].get(name, {}).get("status") == "complete"

    def after(self, step: Step) -> None:
        """A measured step of a branch that breaks the limit stops the branch."""
        row = self.state["steps"][step.name].get("row")
        if not (row and step.branch and self.goal.has_limit and step.rung == 0):
            return
        if not fr.within_limit(row, self.base_value(), self.plan.task, self.goal):
            self.stopped.setdefault(step.branch, step.name)

    def measure(self, name: str) -> dict:
        """The candidate against the base, side by side on the search's backend (compare's own measurement)."""
        self.say("measure", name=name, backend=self.plan.backend)
        base_path = candidate_path(self.out, self.base, self.state["input"])
        paths = [base_path] if name == self.base else [base_path, candidate_path(self.out, name, self.state["input"])]
        result = measure_side_by_side(paths, self.plan.backend, self.threads, split=self.split, rounds=self.rounds)
        base_row = _keep(result.rows[0])
        self.state["base_row"] = base_row
        row = _keep(result.rows[-1])
        row["name"] = name
        self.say("measured", name=name, value=row["value"], metric=result.metric, latency_ms=row["latency_ms_p50"],
                 ratio=row.get("latency_ms_p50_ratio"))
        return row

    def base_value(self) -> float:
        base = self.state["steps"].get(self.base, {}).get("row") or self.state.get("base_row")
        return base["value"]

    def measured(self) -> dict[str, dict]:
        return measured_rows(self.state)

    def trained_step(self, name: str) -> Step | None:
        """The training step (prune, distill) behind a measured candidate: the candidate itself on
        PyTorch, the step its export reads on ONNX Runtime; None for anything else."""
        step = self.known.get(name)
        if step is not None and step.command == "export":
            step = self.known.get(step.parent)
        return step if step is not None and step.command in ("prune", "distill") else None

    def compose(self, on_front: bool = False) -> None:
        """Quantize every trained candidate that meets the limit (cheap, and often the last step of
        the best); ``on_front``: every trained candidate on the front so far instead (charting the
        front: an int8 copy is its smallest file)."""
        rows = self.measured()
        front = {r["name"] for r in fr.pareto_front(list(rows.values()), self.plan.task, fr.front_keys(self.goal.objective))}
        new = []
        for name, row in rows.items():
            trained = self.trained_step(name)
            if trained is None:
                continue
            if not (name in front if on_front else fr.within_limit(row, self.base_value(), self.plan.task, self.goal)):
                continue
            child = self.quantized_step(trained.name, name)
            if child is not None and child.name not in self.known:
                new.append(child)
        if new:
            self.run_steps(new)

    def quantized_step(self, trained: str, measured: str) -> Step | None:
        """The quantization composed onto a trained candidate: dynamic int8 of its export on ONNX
        Runtime; on PyTorch, weight-only int8 of the trained artifact for size or params (PyTorch
        decodes it to float on load, so it cannot be faster: nothing for latency)."""
        estimate = FIXED_SECONDS["quantize"] + MEASURE_SECONDS
        if self.plan.backend == "onnx":
            return Step(f"{trained}-qd", "quantize", measured, {"mode": "dynamic", "bench": False}, "quantize",
                        estimate, measure=True)
        if self.goal.objective == "latency":
            return None
        return Step(f"{trained}-wo8", "quantize", trained, {"mode": "weight-only", "bits": 8, "bench": False},
                    "quantize", estimate, measure=True)

    def promote(self, rung: int) -> list[Step]:
        """Successive halving: the better half of the near misses of the last rung, retrained with
        twice the budget (each with its export)."""
        if not self.goal.has_limit:
            return []
        key = fr.OBJECTIVE_KEY[self.goal.objective]
        rows = self.measured()
        base = self.base_value()
        best = fr.choose(list(rows.values()), base, self.plan.task, self.goal)
        near = []
        for name, row in rows.items():
            trained = self.trained_step(name)
            if trained is None or trained.rung != rung - 1:
                continue
            worse = fr.drop(row["value"], base, self.plan.task, self.goal)
            if worse is None or worse <= self.goal.max_drop or worse > NEAR * max(self.goal.max_drop, 0.1):
                continue
            if best is not None and row[key] >= best[key]:
                continue  # even if it passed, it would not beat what already meets the limit
            near.append((row[key], trained))
        near.sort(key=lambda pair: pair[0])
        keep = near[: (len(near) + 1) // 2]
        steps = []
        for _, trained in keep:
            flag, amount = training_amount(trained)
            root = trained.name.rsplit("-r", 1)[0] if trained.rung else trained.name
            longer = replace(trained, name=f"{root}-r{rung}", options={**trained.options, flag: amount * 2},
                             estimate_s=trained.estimate_s * 2, rung=rung)
            steps.append(longer)
            if self.plan.backend == "onnx":  # on PyTorch the trained artifact is measured itself
                steps.append(export_of(longer, self.known[f"{trained.name}.onnx"].estimate_s))
        return steps

    def chart(self) -> list[Step]:
        """With the budget left after the search proper: the next level past each branch's first miss
        (with its export), so the front shows what the next step down would cost. It usually breaks
        the limit too (its milder level did) and is not quantized; it still has to fit in the time left."""
        steps: list[Step] = []
        plan = self.plan.steps
        names = [s.name for s in plan]
        for branch, stopper in self.stopped.items():
            if stopper not in names:
                continue
            later = [s for s in plan[names.index(stopper) + 1:] if s.branch == branch and s.rung == 0]
            if not later or later[0].command == "export":
                continue
            steps.append(later[0])
            self.charting.add(later[0].name)
            if len(later) >= 2 and later[1].command == "export" and later[1].parent == later[0].name:
                steps.append(later[1])  # its export (ONNX Runtime)
        return steps

    def save(self) -> None:
        self.state["seconds"] = self.spent()
        write_json_atomic(self.out / STATE_FILE, self.state)


def measure_side_by_side(paths: list[Path], backend: str, threads: int | None, *, split: str, rounds: int):
    """``compare``'s measurement of ``paths`` on ``backend`` with ``threads``. Opening a PyTorch
    model sets torch's process-wide thread count to the one measured with; it is put back, so the
    search's training steps keep the threads they would have had."""
    import torch

    from ..compare import compare_artifacts

    kept = torch.get_num_threads()
    try:
        return compare_artifacts(paths, backend=backend, threads=threads, split=split, rounds=rounds)
    finally:
        torch.set_num_threads(kept)


def final_reserve(goal: Goal) -> float:
    """Seconds kept for the final side-by-side comparison, so the whole command fits its budget."""
    return min(FINAL_RESERVE_S, 0.1 * goal.time_budget_s)


def new_state(expected: dict, input_path: Path) -> dict:
    return {"format": STATE_FORMAT, "version": 1, "fingerprint": expected, "input": str(input_path), "seconds": 0.0,
            "steps": {}}


def _keep(row: dict) -> dict:
    return {k: row.get(k) for k in ROW_KEYS}


def _whole(path: Path) -> bool:
    try:
        open_artifact(path)
        return True
    except UserError:
        return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."

