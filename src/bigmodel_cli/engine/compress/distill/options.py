"""The options and result types of ``bigmodel distill`` (``DistillConfig``, ``DistillPlan``,
``DistillResult``), apart from the command so that ``student.py`` and ``report.py``, which the
command imports, can name them in their annotations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel_cli import artifact as art
from bigmodel_cli.config import TrainConfig
from bigmodel_cli.data import SPLITS
from bigmodel_cli.errors import ConfigErrors, UserError
from .losses import HIDDEN_LOSSES, KD_LOSSES, DistillLoss

# T = 2 is the usual choice for classifiers; for a byte-level language model T = 2 made a small
# student worse than training it alone while T = 1 made it better (docs/distill.md), so LMs get 1.
DEFAULT_TEMPERATURE = {"classification": 2.0, "language-modeling": 1.0}


@dataclass
class DistillConfig:
    teacher: str | None = None
    # exactly one of these defines the student
    student_preset: str | None = None  # a preset of the teacher's architecture
    student_config: dict | None = None  # the "model" section of config.json; "arch" defaults to the teacher's
    student: str | None = None  # an existing artifact: its architecture and weights
    temperature: float | None = None  # None: DEFAULT_TEMPERATURE for the teacher's task
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 − alpha weighs the labels
    kd_loss: str = "forward-kl"
    hidden_loss: str | None = None  # None: logits only
    hidden_weight: float = 1.0
    layer_map: str | None = None  # "STUDENT:TEACHER,…", hidden-layer indices; default: spread evenly
    init_from_teacher: bool = False
    cache_teacher: bool = False
    baseline: bool = False
    report_split: str = "test"
    bench_iterations: int = 30  # latency runs per model in the report; 0 skips latency
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/distill"))
    # student_budget chooses the rate (the CLI, when --lr was not given); False keeps train.lr as a
    # Python caller set it. Epochs/steps are chosen whenever train.epochs and train.max_steps are None.
    choose_lr: bool = False

    def validate(self) -> None:
        """Every problem with the options at once (the models are checked later, before any work)."""
        p: list[str] = []
        if not self.teacher:
            p.append("--teacher ARTIFACT is required (the trained model to distil)")
        given = [f for f, v in (("--student-preset", self.student_preset), ("--student-config", self.student_config),
                                ("--student", self.student)) if v is not None]
        if not given:
            p.append("give the student: --student-preset NAME, --student-config JSON or --student ARTIFACT")
        elif len(given) > 1:
            p.append(f"give only one of {', '.join(given)} to define the student")
        if self.student_config is not None and not isinstance(self.student_config, dict):
            p.append("--student-config must be a JSON object like '{\"arch\": \"mlp\", \"hidden_sizes\": [32]}'")
        if self.temperature is not None and not (
                isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            p.append(f"--temperature must be a positive number, got {self.temperature}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            p.append(f"--alpha must be between 0 and 1 (the weight of the teacher's soft targets), got {self.alpha}")
        if self.kd_loss not in KD_LOSSES:
            p.append(f"--kd-loss {self.kd_loss!r} is unknown; choose one of {', '.join(KD_LOSSES)}")
        if self.hidden_loss is not None and self.hidden_loss not in HIDDEN_LOSSES:
            p.append(f"--hidden-loss {self.hidden_loss!r} is unknown; choose one of {', '.join(HIDDEN_LOSSES)}")
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            p.append(f"--hidden-weight must not be negative, got {self.hidden_weight}")
        if self.layer_map is not None:
            if self.hidden_loss is None:
                p.append("--layer-map needs --hidden-loss mse|cosine (it says which hidden layers to match)")
            try:
                parse_layer_map(self.layer_map)
            except UserError as exc:
                p.append(str(exc))
        if self.init_from_teacher and self.student is not None:
            p.append("--init-from-teacher builds a new student; it cannot be combined with --student ARTIFACT")
        if self.report_split not in SPLITS:
            p.append(f"--report-split {self.report_split!r} is unknown; choose one of {', '.join(SPLITS)}")
        if self.bench_iterations < 0:
            p.append(f"--bench-iterations must not be negative, got {self.bench_iterations}")
        try:
            self.train.validate()
        except ConfigErrors as exc:
            p.extend(exc.problems)
        if p:
            raise ConfigErrors(p, "distillation options")

    def fingerprint(self) -> dict:
        """Options that change the result (so must not change on --resume), besides the trainer's."""
        return {"teacher": self.teacher, "student_preset": self.student_preset, "student_config": self.student_config,
                "student": self.student, "temperature": self.temperature, "alpha": self.alpha,
                "kd_loss": self.kd_loss, "hidden_loss": self.hidden_loss, "hidden_weight": self.hidden_weight,
                "layer_map": self.layer_map, "init_from_teacher": self.init_from_teacher}


def parse_layer_map(value: str) -> list[tuple[int, int]]:
    """'0:1,1:3' → [(0, 1), (1, 3)]: student hidden layer → teacher hidden layer."""
    pairs = []
    for item in value.replace(" ", "").split(","):
        if not item:
            continue
        student, sep, teacher = item.partition(":")
        if not sep or not student.isdigit() or not teacher.isdigit():
            raise UserError(f"--layer-map: {item!r} is not STUDENT:TEACHER; write it like 0:1,1:3 (hidden-layer numbers from 0)")
        pairs.append((int(student), int(teacher)))
    if not pairs:
        raise UserError("--layer-map is empty; write it like 0:1,1:3 (student layer : teacher layer)")
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise UserError(f"--layer-map {value!r} names a student layer twice; map each student layer to one teacher layer")
    return pairs


@dataclass
class DistillPlan:
    cfg: DistillConfig
    teacher: art.Artifact
    job: Any  # engine.training.job.TrainJob
    loss: DistillLoss
    student_spec: dict
    student_source: dict
    initial_state: dict  # the student's starting weights (the --baseline run starts from them too)
    record: dict  # what the manifest says about the distillation
    fingerprint: dict  # the options --resume must not change (distill.json)
    base_dir: Path | None = None  # where a user-model student's model.py lives
    lock: Any = None  # output_lock.OutputLock on the run directory, held until run_distill ends


@dataclass
class DistillResult:
    run: Any  # TrainResult of the distillation
    baseline: Any  # TrainResult of --baseline, or None
    report: dict
    record: dict

    def summary(self) -> dict:
        out = {"run_dir": str(self.run.run_dir), "best": str(self.run.best_dir), "last": str(self.run.last_dir),
               "steps": self.run.steps, "best_step": self.run.best_step, "seconds": self.run.seconds,
               "resumed_from": self.run.resumed_from, **self.run.runtime,
               "best_metrics": self.run.best_metrics, "distill": self.record, "report": self.report}
        if self.baseline is not None:
            out["baseline"] = {"run_dir": str(self.baseline.run_dir), "best": str(self.baseline.best_dir),
                               "best_metrics": self.baseline.best_metrics}
        return out
