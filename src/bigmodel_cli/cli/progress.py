"""Turn the engine's progress events into a rich progress bar on stderr."""

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
