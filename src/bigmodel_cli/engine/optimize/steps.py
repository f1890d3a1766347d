"""One candidate step → the engine function of its command, with the options a recipe step of that
command would pass (and the command line's defaults for the rest), so the recipe TOML written for
the winner rebuilds exactly the artifacts the search measured.
"""

from __future__ import annotations

from pathlib import Path

from ...artifact import open_artifact
from ...config import TrainConfig, build_config
from ..core.progress import Progress
from .space import Step

# The trainer's options a step may set; the rest keep the command line's defaults.
TRAIN_KEYS = ("seed", "max-steps", "epochs")


def run_step(step: Step, source: Path, out: Path, *, overwrite: bool, progress: Progress,
             teacher: Path | None = None) -> None:
    """Run ``step`` reading ``source`` (for distill: the teacher) into ``out``."""
    runner = {"export": _export, "quantize": _quantize, "prune": _prune, "distill": _distill}[step.command]
    runner(step, source, out, overwrite, progress)


def _train_flags(options: dict) -> dict:
    return {key.replace("-", "_"): options[key] for key in TRAIN_KEYS if key in options}


def _export(step: Step, source: Path, out: Path, overwrite: bool, progress: Progress) -> None:
    from ..onnx.export import ExportOptions, export_artifact

    export_artifact(open_artifact(source), out, ExportOptions(), overwrite=overwrite, progress=progress)


def _quantize(step: Step, source: Path, out: Path, overwrite: bool, progress: Progress) -> None:
    from ..compress.quantize.command import QuantizeOptions, quantize_artifact

    o = step.options
    qat = bool(o.get("qat"))
    options = QuantizeOptions(mode=o.get("mode", "auto"), bits=o.get("bits", 8), bench=o.get("bench", True), qat=qat,
                              finetune_epochs=o.get("finetune-epochs", 0), finetune_steps=o.get("max-steps"),
                              # quantize's own defaults for --qat's trainer (cli/quantize.py)
                              train=TrainConfig(lr=1e-4, batch_size=64, seed=o.get("seed", 0)) if qat else None)
    quantize_artifact(open_artifact(source), out, options, overwrite=overwrite, progress=progress)


def _prune(step: Step, source: Path, out: Path, overwrite: bool, progress: Progress) -> None:
    from ..compress.prune.command import PruneConfig, prune_artifact

    o = step.options
    cfg = PruneConfig(method=o["method"], sparsity=o["sparsity"], finetune_epochs=o.get("finetune-epochs", 0),
                      bench=o.get("bench", True), out=str(out), overwrite=overwrite)
    train_cfg = build_config(TrainConfig, {}, _train_flags(o))
    # no --lr: prune chooses the fine-tuning rate from the original run's, as on the command line
    prune_artifact(open_artifact(source), cfg, train_cfg, progress, choose_lr=True)


def _distill(step: Step, source: Path, out: Path, overwrite: bool, progress: Progress) -> None:
    from ..compress.distill.command import DistillConfig, distill

    o = step.options
    train = build_config(TrainConfig, {}, {**_train_flags(o), "out": str(out), "overwrite": overwrite}, source="options")
    cfg = DistillConfig(teacher=str(source), student_config=dict(o["student-config"]),
                        bench_iterations=o.get("bench-iterations", 30), train=train, choose_lr=True)
    distill(cfg, progress)
