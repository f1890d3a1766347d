"""``bigmodel distill``: train a smaller student to imitate a teacher artifact.

The student is trained by the one training loop (``engine.training.loop.run_job``); distillation only
changes the job: the loss (``DistillLoss``: the teacher's softened logits, the labels, and
optionally its hidden states), the trainable extras (the projections that map student features to
teacher widths: checkpointed for resume, never saved in the student artifact), the stage
(``distill``) and the parent (the teacher). Hidden states are read with forward hooks on the
built-in architectures' layers (``engine/compress/distill/losses.py``), so the model classes stay unchanged.

This module holds the options (``DistillConfig``), the job assembly and the run; building the
student lives in ``student.py`` and the report in ``report.py``
(their public names are re-exported here).

``distillation_loss_fn`` is the small public entry point for other commands that fine-tune with a
teacher (e.g. pruning's recovery training).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from bigmodel_cli import artifact as art
from bigmodel_cli import outputs
from bigmodel_cli.config import TrainConfig
from bigmodel_cli.errors import ConfigErrors, UserError
from bigmodel_cli.models import USER_ARCH, build_model, count_parameters
from .report import compare_models
from bigmodel_cli.data.augment import policy_from_option
from .student import check_agreement, init_from_teacher, shared_block_size, student_budget, student_spec_for
from .losses import HIDDEN_LOSSES, KD_LOSSES, DistillLoss, RowsTask, build_hidden_match

DISTILL_FILE = "distill.json"  # the distillation options of a run, checked on --resume
BASELINE_DIR = "baseline"  # the --baseline run, inside the distill run directory
REPORT_SPLITS = ("train", "val", "test")
# T = 2 is the usual choice for classifiers; for a byte-level language model T = 2 made a small
# student worse than training it alone while T = 1 made it better (docs/distill.md), so LMs get 1.
DEFAULT_TEMPERATURE = {"classification": 2.0, "language-modeling": 1.0}

Progress = Callable[..., None]


def _no_progress(event: str, **info: Any) -> None:
    pass


# --------------------------------------------------------------------------- configuration


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
        if self.report_split not in REPORT_SPLITS:
            p.append(f"--report-split {self.report_split!r} is unknown; choose one of {', '.join(REPORT_SPLITS)}")
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



def distillation_loss_fn(teacher_model, student_model, task, temperature: float | None = None, alpha: float = 0.5,
                         kd_loss: str = "forward-kl") -> Callable:
    """A ``loss_fn(model, x, y)`` for ``engine.training.job.TrainJob`` that distils ``teacher_model``'s logits
    into the model being trained: alpha·T²·KL(teacher ‖ student) + (1 − alpha)·CE(labels).

    For commands that fine-tune with a teacher (``bigmodel prune --distill``): the teacher is put in
    eval mode with its parameters frozen, runs under no_grad, and follows the student to its device.
    ``temperature=None`` takes the command's default for the task (2 for classifiers, 1 for
    language models). Raises UserError for a temperature ≤ 0, alpha outside [0, 1], an unknown
    ``kd_loss``, or a student that disagrees with the teacher on the input or the classes / vocabulary.
    """
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE[task.name]
    problems = []
    if not (math.isfinite(temperature) and temperature > 0):
        problems.append(f"the distillation temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"the distillation alpha must be between 0 and 1, got {alpha}")
    if kd_loss not in KD_LOSSES:
        problems.append(f"unknown distillation loss {kd_loss!r}; choose one of {', '.join(KD_LOSSES)}")
    if problems:
        raise ConfigErrors(problems, "distillation options")
    teacher_model.eval()
    was_training = student_model.training
    student_model.eval()
    try:
        check_agreement(teacher_model, student_model, task)
    finally:
        student_model.train(was_training)
    return DistillLoss(teacher_model, temperature=temperature, alpha=alpha, kind=kd_loss)


# --------------------------------------------------------------------------- plan and run


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
    lock: Any = None  # outputs.OutputLock on the run directory, held until run_distill ends


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


def _check_distill_resume(out: str, fingerprint: dict) -> None:
    path = Path(out) / DISTILL_FILE
    if not path.is_file():
        raise UserError(f"--resume: {out} has no {DISTILL_FILE}; it is not a distillation run (drop --resume to start one)")
    try:
        previous = json.loads(path.read_text(encoding="utf-8")) if path.stat().st_size <= 1 << 20 else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        previous = None
    if not isinstance(previous, dict):
        raise UserError(f"--resume: {path} is damaged; start the run again with --overwrite")
    now = json.loads(json.dumps(fingerprint))
    changed = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{k} ({previous.get(k)!r} → {now.get(k)!r})" for k in changed)
        raise UserError(f"--resume: distillation options differ from the run being resumed: {detail}; resume with the same options")


def prepare_distill(cfg: DistillConfig) -> DistillPlan:
    """Check everything (options, teacher, student, data, layer map) and build the job; no writes.

    The plan holds the lock on the output from here on; ``run_distill`` releases it."""
    cfg.validate()  # before the heavy imports: a mistyped option costs nothing
    lock = outputs.hold(cfg.train.out)
    try:
        plan = _prepare_distill(cfg)
    except BaseException:
        lock.release()
        raise
    plan.lock = lock
    return plan


def _prepare_distill(cfg: DistillConfig) -> DistillPlan:
    """prepare_distill's work, once the output is locked."""
    tc = cfg.train
    if not tc.resume:
        from ...training.job import input_paths

        art.check_output(tc.out, tc.overwrite, [cfg.teacher, cfg.student, *input_paths(tc, tc.data)])

    import torch

    from ...evaluate import open_data
    from ...core.tasks import make_task
    from ...training.run_dir import check_resume
    from ...training.job import TrainJob

    teacher = art.open_artifact(cfg.teacher)
    if not teacher.has_weights:
        raise UserError(f"--teacher {teacher.path}: is ONNX-only (no model.safetensors); distil from its PyTorch "
                        f"parent ({(teacher.manifest.get('parent') or {}).get('path', 'the artifact it was exported from')})")
    # The teacher by content (path and manifest hash), so a resumed run refuses a changed teacher.
    fingerprint = {**cfg.fingerprint(), "teacher": art.parent_ref(teacher),
                   "student": str(Path(cfg.student).resolve()) if cfg.student else None}
    if tc.resume:
        _check_distill_resume(tc.out, fingerprint)
    data = open_data(teacher, tc.data, tc.target)
    teacher_model = teacher.build_model()
    # The teacher's output width decides the student's classes / vocabulary unless the user
    # overrides it; asking the model itself works for user models too. A short window suffices.
    probe_task = make_task(data, 2, tc.seed, 8 if data.task == "language-modeling" else None)
    with torch.no_grad():
        width = int(teacher_model(torch.from_numpy(probe_task.example_input(2))).shape[-1])

    spec, source_artifact = student_spec_for(cfg, teacher, data, width)
    block_size = shared_block_size(tc, teacher, spec)
    augment = policy_from_option(tc.augment, data, mixing_allowed=False)
    if augment and cfg.cache_teacher:
        raise UserError("--cache-teacher computes the teacher's outputs once, on the unaugmented inputs; "
                        "drop --cache-teacher or --augment")
    task = make_task(data, tc.batch_size, tc.seed, block_size, tc.eval_windows, augment)
    torch.manual_seed(tc.seed)
    base_dir = source_artifact.path if source_artifact is not None else None
    if source_artifact is not None:  # its config.json against its weights, before building (a hostile size)
        from bigmodel_cli.weights import check_fits_weights

        check_fits_weights(spec, source_artifact.weight_shapes(), source_artifact.path / art.WEIGHTS_FILE, base_dir)
    student = build_model(spec, base_dir=base_dir)
    source: dict = {"from": "artifact" if source_artifact else ("preset" if cfg.student_preset else "config")}
    if source_artifact is not None:
        from bigmodel_cli.weights import load_into

        load_into(student, source_artifact.load_state_dict(), source=source_artifact.path / art.WEIGHTS_FILE)
        source["artifact"] = art.parent_ref(source_artifact)
    check_agreement(teacher_model, student, task)
    budget = student_budget(data.task, count_parameters(student), _train_samples(task), tc.epochs, tc.max_steps,
                            None if cfg.choose_lr else tc.lr)
    tc = cfg.train = replace(tc, epochs=budget["epochs"], max_steps=budget["max_steps"], lr=budget["lr"])
    if cfg.init_from_teacher:
        source["init_from_teacher"] = init_from_teacher(student, teacher_model, spec, teacher.model_spec)

    hidden = None
    if cfg.hidden_loss is not None:
        example = torch.from_numpy(task.example_input(2))
        layer_map = parse_layer_map(cfg.layer_map) if cfg.layer_map else None
        hidden = build_hidden_match(teacher_model, student, teacher.model_spec["arch"], spec["arch"], example,
                                    cfg.hidden_loss, cfg.hidden_weight, layer_map)
    temperature = cfg.temperature if cfg.temperature is not None else DEFAULT_TEMPERATURE[teacher.task]
    loss = DistillLoss(teacher_model, temperature=temperature, alpha=cfg.alpha, kind=cfg.kd_loss, hidden=hidden)
    if cfg.cache_teacher:
        loss.check_cacheable(task)

    extra_files = {}
    if spec["arch"] == USER_ARCH:  # a user-model student carries its code, like the artifact it came from
        extra_files[art.MODEL_CODE_FILE] = source_artifact.path / art.MODEL_CODE_FILE
    data_spec = dict(data.spec)
    if block_size:
        data_spec["block_size"] = block_size
    config = art.new_config(data.task, spec, data_spec)
    teacher_params, student_params = count_parameters(teacher_model), count_parameters(student)
    record = {
        "teacher": art.parent_ref(teacher), "student": source,
        "temperature": temperature, "alpha": cfg.alpha, "kd_loss": cfg.kd_loss,
        "hidden_loss": cfg.hidden_loss, "hidden_weight": cfg.hidden_weight if hidden else None,
        "layer_map": [list(p) for p in hidden.pairs] if hidden else None,
        "hidden_widths": hidden.widths if hidden else None,
        "projection_params": count_parameters(hidden.projections) if hidden and hidden.projections is not None else 0,
        "cache_teacher": cfg.cache_teacher, "teacher_params": teacher_params, "student_params": student_params,
        "param_ratio": student_params / teacher_params if teacher_params else None,
        "budget": budget, **({"augment": augment} if augment else {}),
    }
    job = TrainJob(cfg=tc, model=student, data=data, task=task, artifact_config=config, stage="distill",
                   parent=teacher, loss_fn=loss, aux=loss.projections, extra_files=extra_files,
                   manifest_extra={"distill": record})
    if tc.resume:
        check_resume(job)  # the trainer's options, before any work (distill's were checked above)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return DistillPlan(cfg, teacher, job, loss, spec, source, initial, record, fingerprint, base_dir)


def _train_samples(task) -> int:
    """Training samples (classification) or windows' worth of tokens (language models)."""
    return len(task.y_train) if hasattr(task, "y_train") else task.micro_batches_per_epoch * task.batch_size


def _recording(progress: Progress, fingerprint: dict, fresh: bool) -> Progress:
    """Write distill.json into the run directory as soon as the trainer has created it (a fresh run
    starts from an empty directory, so it cannot be written earlier; with --overwrite it is built in
    a staging directory, which the trainer names)."""

    def forward(event: str, **info: Any) -> None:
        if event == "start" and fresh:
            outputs.write_json_atomic(Path(info["writing_to"]) / DISTILL_FILE, fingerprint)
        progress(event, **info)

    return forward


def _baseline_job(plan: DistillPlan):
    """The same student, from the same starting weights, data, budget and seed, without the teacher."""
    from ...training.job import TrainJob

    tc = plan.cfg.train
    out = Path(tc.out) / BASELINE_DIR
    model = build_model(plan.student_spec, base_dir=plan.base_dir)
    model.load_state_dict(plan.initial_state)
    resume = tc.resume and (out / "run.json").is_file()
    base_cfg = replace(tc, out=str(out), resume=resume, overwrite=True)
    task = plan.job.task._task if isinstance(plan.job.task, RowsTask) else plan.job.task
    if plan.cfg.student is not None:
        parent = art.open_artifact(plan.cfg.student)
    elif plan.cfg.init_from_teacher:
        parent = plan.teacher
    else:
        parent = None
    return TrainJob(cfg=base_cfg, model=model, data=plan.job.data, task=task, artifact_config=plan.job.artifact_config,
                    stage="train", parent=parent, extra_files=plan.job.extra_files,
                    manifest_extra={"baseline_for": {"distill_run": str(Path(tc.out).resolve())}})


def run_distill(plan: DistillPlan, progress: Progress | None = None) -> DistillResult:
    try:
        return _run_distill(plan, progress or _no_progress)
    finally:
        if plan.lock is not None:
            plan.lock.release()
            plan.lock = None


def _run_distill(plan: DistillPlan, progress: Progress) -> DistillResult:
    """run_distill's work: the distillation run, the baseline, the report."""
    import torch

    from ...training.loop import run_job

    cfg, tc = plan.cfg, plan.cfg.train
    try:
        if cfg.cache_teacher:
            progress("phase", name="cache teacher")
            plan.record["cache"] = plan.loss.fill_cache(plan.job.task)
            plan.job.task = RowsTask(plan.job.task)
        progress("phase", name="distill")
        torch.manual_seed(tc.seed)  # dropout draws the same numbers in the distilled and the baseline run
        run = run_job(plan.job, _recording(progress, plan.fingerprint, not tc.resume))
    finally:
        plan.loss.close()
    baseline = None
    if cfg.baseline:
        progress("phase", name="baseline")
        torch.manual_seed(tc.seed)
        baseline = run_job(_baseline_job(plan), progress)
    progress("phase", name="report")
    report = compare_models(plan, run, baseline, progress)
    return DistillResult(run, baseline, report, plan.record)


def distill(cfg: DistillConfig, progress: Progress | None = None) -> DistillResult:
    return run_distill(prepare_distill(cfg), progress)


__all__ = ["BASELINE_DIR", "DEFAULT_TEMPERATURE", "DISTILL_FILE", "REPORT_SPLITS", "DistillConfig", "DistillPlan",
           "DistillResult", "Progress", "check_agreement", "compare_models", "distill", "distillation_loss_fn",
           "init_from_teacher", "parse_layer_map", "prepare_distill", "run_distill"]
