"""``bigmodel distill``: train a smaller student to imitate a teacher artifact.

The student is trained by the one training loop (``engine.training.loop.run_job``); distillation only
changes the job: the loss (``DistillLoss``: the teacher's softened logits, the labels, and
optionally its hidden states), the trainable extras (the projections that map student features to
teacher widths: checkpointed for resume, never saved in the student artifact), the stage
(``distill``) and the parent (the teacher). Hidden states are read with forward hooks on the
built-in architectures' layers (``engine/compress/distill/losses.py``), so the model classes stay unchanged.

This module holds the job assembly and the run; the options and result types (``DistillConfig``,
``DistillPlan``, ``DistillResult``) live in ``options.py``, building the student in ``student.py``
and the report in ``report.py`` (their public names are re-exported here).

``distillation_loss_fn`` is the small public entry point for other commands that fine-tune with a
teacher (e.g. pruning's recovery training).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from bigmodel_cli import artifact as art
from bigmodel_cli.errors import ConfigErrors, UserError
from bigmodel_cli.models import USER_ARCH, build_model, count_parameters
from bigmodel_cli.output_file import write_json_atomic
from bigmodel_cli.output_lock import hold
from ...core.progress import Progress, no_progress
from .options import DEFAULT_TEMPERATURE, DistillConfig, DistillPlan, DistillResult, parse_layer_map
from .report import compare_models
from bigmodel_cli.data.augment import policy_from_option
from .student import check_agreement, init_from_teacher, shared_block_size, student_budget, student_spec_for
from .losses import KD_LOSSES, DistillLoss, RowsTask, build_hidden_match

DISTILL_FILE = "distill.json"  # the distillation options of a run, checked on --resume
BASELINE_DIR = "baseline"  # the --baseline run, inside the distill run directory


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
    lock = hold(cfg.train.out)
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

    from ...core.datasets import open_data
    from ...core.tasks import make_task
    from ...training.run_dir import check_resume
    from ...training.job import TrainJob, artifact_config

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
    # The student reads text with the teacher's tokenizer (their logits are compared id by id).
    extra_files.update(teacher.tokenizer_files())
    config = artifact_config(data, spec, block_size, teacher.config.get("tokenizer"))
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
            write_json_atomic(Path(info["writing_to"]) / DISTILL_FILE, fingerprint)
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
        return _run_distill(plan, progress or no_progress)
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


__all__ = ["BASELINE_DIR", "DEFAULT_TEMPERATURE", "DISTILL_FILE", "DistillConfig", "DistillPlan",
           "DistillResult", "Progress", "check_agreement", "compare_models", "distill", "distillation_loss_fn",
           "init_from_teacher", "parse_layer_map", "prepare_distill", "run_distill"]
