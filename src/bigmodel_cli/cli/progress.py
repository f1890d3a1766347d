"""Turn the engine's progress events into a rich progress bar on stderr."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import console


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

    def __call__(self, event: str, **info) -> None:
        if event == "start":
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=info["total"], completed=info["step"], info="")
            rt = info["runtime"]
            if info.get("resumed_from") is not None:
                console.note(f"resumed from step {info['resumed_from']}")
            console.note(f"{info['run_dir']}: {rt['params']:,} parameters on {rt['device']}, {rt['precision']}, {rt['threads']} threads")
        elif event == "step" and self.task is not None:
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

    def stop(self) -> None:
        self.bar.stop()
