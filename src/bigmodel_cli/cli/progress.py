"""Turn the engine's progress events into rich progress bars and notes on stderr: every command's
progress sink lives here, so the commands' modules only choose one."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import console

# The time estimate printed before a long run: timed on the first steps after the first one (which
# pays for warm-up), as soon as this many are done or this many seconds have passed.
ESTIMATE_AFTER_STEPS = 5
ESTIMATE_AFTER_SECONDS = 3.0


class TrainingProgress:
    """Callable progress sink for engine.training.loop.run_job: a bar with loss, lr, throughput and ETA."""

    def __init__(self, label: str = "train", unit: str = "samples/s", enabled: bool = True):
        self.label, self.unit, self.enabled = label, unit, enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console.err, transient=False, disable=not enabled,
        )
        self.task = None
        self.val = ""
        self.timer: tuple[int, float] | None = None  # (step, time) the estimate counts from
        self.estimated = False

    def __call__(self, event: str, **info) -> None:
        if event == "start":
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=info["total"], completed=info["step"], info="")
            rt = info["runtime"]
            if info.get("resumed_from") is not None:
                console.note(f"resumed from step {info['resumed_from']}")
            console.note(f"{info['run_dir']}: {rt['params']:,} parameters on {rt['device']}, {rt['precision']}, {rt['threads']} threads")
            if "per_step" in info:
                console.note(plan_line(rt["params"], info["per_step"], self.unit, info["total"] - info["step"]))
        elif event == "step" and self.task is not None:
            self._estimate(info["step"], info["total"])
            rate = info.get("items_per_s")
            text = f"loss {info['loss']:.4f} lr {info['lr']:.2e}"
            if rate:
                text += f" {rate:,.0f} {self.unit}"
            self.bar.update(self.task, completed=info["step"], info=text + self.val)
        elif event == "eval":
            keys = [k for k in ("val_accuracy", "val_loss") if k in info]
            self.val = " │ " + " ".join(f"{k} {info[k]:.4f}" for k in keys)
        elif event == "done":
            self.bar.stop()

    def _estimate(self, step: int, total: int) -> None:
        """Once, early in the run: what the whole run will take, from the steps timed so far."""
        import time

        if self.estimated or not self.enabled:
            return
        now = time.perf_counter()
        if self.timer is None:
            self.timer = (step, now)
            return
        first, since = self.timer
        timed, elapsed = step - first, now - since
        if timed < ESTIMATE_AFTER_STEPS and elapsed < ESTIMATE_AFTER_SECONDS and step < total:
            return
        self.estimated = True
        remaining = (total - step) * elapsed / max(timed, 1)
        console.note(f"estimate: about {format_seconds(remaining)} for the remaining {total - step:,} steps "
                     f"(timed on {timed} steps; the bar's eta follows the run)")

    def stop(self) -> None:
        self.bar.stop()


class PhaseProgress:
    """``distill``: one training bar per training phase (``phase`` events named in ``bars``); a note
    for every other phase and for each ``measure`` event."""

    def __init__(self, unit: str, enabled: bool, bars: tuple[str, ...] = ("distill", "baseline")):
        self.unit, self.enabled, self.bars, self.bar = unit, enabled, bars, None

    def __call__(self, event: str, **info) -> None:
        if event == "phase":
            if self.bar is not None:
                self.bar.stop()
                self.bar = None
            if info["name"] in self.bars:
                self.bar = TrainingProgress(info["name"], self.unit, self.enabled)
            elif self.enabled:
                console.note(f"{info['name']}…")
        elif event == "measure":
            if self.enabled:
                console.note(f"measuring the {info['name']}")
        elif self.bar is not None:
            self.bar(event, **info)


class PruneProgress:
    """``prune``: a note per pruning step, a training bar per fine-tuning run, notes for measuring."""

    def __init__(self, unit: str, enabled: bool):
        self.unit, self.enabled, self.bar, self.step = unit, enabled, None, ""

    def __call__(self, event: str, **info) -> None:
        if event == "defaults":
            if self.enabled:
                console.note(f"fine-tuning plan: {info['why']}")
        elif event == "prune":
            self.step = f"{info['step']}/{info['steps']}"
            if self.enabled:
                console.note(f"step {self.step}: {info['method']} pruning to {info['sparsity']:.1%}")
        elif event == "start":
            self.bar = TrainingProgress(f"fine-tune {self.step}", self.unit, self.enabled)
            self.bar(event, **info)
        elif self.bar is not None and event in ("step", "eval", "done"):
            self.bar(event, **info)
        elif event == "onnx" and self.enabled:
            console.note("exporting before and after to ONNX to time them with ONNX Runtime")
        elif event == "measure" and self.enabled:
            console.note(f"measuring before and after on the {info['split']} split")


class _TransientBar:
    """A bar on stderr that disappears when the command ends (a context manager)."""

    def __init__(self, label, clock, enabled: bool = True):
        self.bar = Progress(label, BarColumn(), MofNCompleteColumn(), clock, console=console.err, transient=True,
                            disable=not enabled)
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()
        return False


class CountProgress(_TransientBar):
    """``explain --samples``, ``generate``: ``done`` of ``total`` (``total`` given here or by a
    ``start`` event, ``done`` by any event that carries it) with the time remaining."""

    def __init__(self, label: str, total: int | None = None, enabled: bool = True):
        super().__init__(TextColumn(f"[bold]{label}"), TimeRemainingColumn(), enabled)
        self.label, self.total = label, total

    def __enter__(self):
        super().__enter__()
        if self.total is not None:
            self.task = self.bar.add_task(self.label, total=self.total)
        return self

    def __call__(self, event: str, **info) -> None:
        if event == "start":
            self.task = self.bar.add_task(self.label, total=info["total"])
        elif "done" in info and self.task is not None:
            self.bar.update(self.task, completed=info["done"])


class StageProgress(_TransientBar):
    """``quantize``: each ``stage`` event's text (from ``stages``) as the bar's description; counted
    work (calibration, timing) as steps, with the time elapsed."""

    def __init__(self, stages: dict[str, str], enabled: bool = True):
        super().__init__(TextColumn("[bold]{task.description}"), TimeElapsedColumn(), enabled)
        self.stages = stages

    def __enter__(self):
        super().__enter__()
        self.task = self.bar.add_task("quantize", total=None)
        return self

    def __call__(self, event: str, **info) -> None:
        if event == "stage":
            text = self.stages.get(info["name"], info["name"])
            if info["name"] == "retry":
                text = f"accuracy gate, retry {info['attempt']}: {len(info['excluded'])} node(s) kept in float"
            self.bar.update(self.task, description=text, total=None, completed=0)
        elif event in ("calibrate", "bench"):
            self.bar.update(self.task, description=self.stages[event], total=info["total"], completed=info["done"])


def status_stages(status, stages: dict[str, str]):
    """``export``: a progress callback that shows each ``stage`` event's text on a rich status line."""

    def progress(event: str, **info) -> None:
        if event == "stage":
            status.update(stages.get(info["name"], info["name"]))

    return progress


def plan_line(params: int, per_step: int, unit: str, steps: int) -> str:
    """What a run will do, before it starts: parameters, samples or tokens a step, steps."""
    what = unit.split("/")[0]  # "tokens/s" → "tokens"
    return (f"plan: {params:,} parameters, {per_step:,} {what} a step, {steps:,} steps "
            f"({per_step * steps:,} {what}); timing the first steps for an estimate")


def format_seconds(seconds: float) -> str:
    """'45 s', '3.2 min', '1.5 h'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class OptimizeProgress(_TransientBar):
    """``optimize``: one bar over the time budget, the running step as its text, and a note per step
    (its outcome, and the measured metric and latency of a candidate)."""

    def __init__(self, enabled: bool = True):
        super().__init__(TextColumn("[bold]{task.description}"), TimeElapsedColumn(), enabled)
        self.enabled = enabled

    def __enter__(self):
        super().__enter__()
        self.task = self.bar.add_task("optimize", total=None)
        return self

    def __call__(self, event: str, **info) -> None:
        if event == "plan":
            self.bar.update(self.task, total=info["budget_s"], completed=0)
            self._note(f"plan: {info['steps']} steps first, estimated {format_seconds(info['estimate_s'])} "
                       f"of a {format_seconds(info['budget_s'])} budget")
        elif event == "start":
            self.bar.update(self.task, description=f"{info['name']} ({info['command']}, "
                                                   f"~{format_seconds(info['estimate_s'])})")
        elif event == "measure":
            runtime = "PyTorch" if info.get("backend") == "torch" else "ONNX Runtime"
            self.bar.update(self.task, description=f"measuring {info['name']} on {runtime}")
        elif event == "measured":
            ratio = info.get("ratio")
            speed = f", {1 / ratio:.2f}× the base's speed" if ratio else ""
            self._note(f"{info['name']}: {info['metric']} {info['value']:.4g}, p50 {info['latency_ms']:.3g} ms{speed}")
        elif event == "step":
            self.bar.update(self.task, completed=min(info["spent_s"], info["budget_s"]))
            if info["status"] not in ("ran", "reused", "failed"):  # a failure has its own note
                self._note(f"{info['name']}: {info['status']}")
            elif info["status"] == "reused":
                self._note(f"{info['name']}: finished before, reused")
        elif event == "failed":
            self._note(f"{info['name']}: failed ({info['error']})")
        elif event == "final":
            self.bar.update(self.task, description=f"final comparison of {info['rows']} models, side by side")

    def _note(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(f"[dim]{text}[/]", highlight=False)
