"""``bigmodel prune``: make a trained model sparse (magnitude, N:M) or smaller (structured), optionally
in several steps with fine-tuning between and after them, and measure what it bought.

One call, ``prune_artifact``: validate everything, then for each step of the cubic schedule prune
(this package) and fine-tune with the one training loop (``training.loop.run_job``: a TrainJob with the
pruned model, stage "prune", parent the input artifact), and finally measure the dense and the
pruned model side by side on the same split and inputs. The output directory is laid out like a
training run: ``best/`` is the pruned artifact (what every other command opens when given the
directory) and ``finetune/step-K/`` holds the trainer's runs (metrics.jsonl, checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bigmodel_cli import artifact as art
from bigmodel_cli.config import TrainConfig, is_finite_number
from bigmodel_cli.data import SPLITS
from bigmodel_cli.errors import ConfigErrors, UserError
from bigmodel_cli.models import USER_ARCH
from ...core.progress import Progress, no_progress
from . import report as measure
from .magnitude import SCOPES, check_nm, hold_masks, layer_sparsity, prunable_layers, prune_unstructured
from .plan import (cubic_schedule, finetune_plan, original_lr, parse_pattern, split_ignored,
                   torch_pruning_scheduler)
from .structured import ARCHS, CRITERIA, accumulate_gradients, check_ignore, prune_builtin, unit_groups

METHODS = ("magnitude", "structured")


@dataclass
class PruneConfig:
    method: str = "magnitude"
    sparsity: float | None = None  # fraction of weights (magnitude) or of units per layer (structured)
    scope: str | None = None  # magnitude: layer (default: every layer to S) or global (one threshold)
    pattern: str | None = None  # magnitude: N:M, e.g. 2:4
    importance: str | None = None  # structured: l1, l2 (default) or taylor
    head_sparsity: float = 0.0  # structured gpt: fraction of attention heads per block
    round_to: int = 1  # structured: kept widths are multiples of this
    ignore: list[str] = field(default_factory=list)  # fnmatch patterns of layer names to leave alone
    steps: int | None = None  # increments along the cubic schedule; None: plan.finetune_plan chooses
    finetune_epochs: int = 0  # training epochs after each step (a gradual default raises it, see plan.py)
    calibration_batches: int = 8  # taylor: training batches whose gradients score the units
    distill: bool = False  # fine-tune against the unpruned model as teacher (compress/distill/command.py's loss)
    temperature: float | None = None  # --distill: softening of both distributions (default 2)
    alpha: float | None = None  # --distill: weight of the teacher's soft targets (default 0.5)
    kd_loss: str | None = None  # --distill: forward-kl (default), reverse-kl or mse
    split: str = "test"  # where the report measures before and after
    bench: bool = True  # measure torch latency before/after
    bench_onnx: bool = False  # also export both (temporarily) and time them with ONNX Runtime
    bench_iterations: int = 30
    out: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        p: list[str] = []
        if self.method not in METHODS:
            p.append(f"--method {self.method!r} is unknown; choose magnitude (unstructured) or structured")
        for flag, value in (("--sparsity", self.sparsity), ("--head-sparsity", self.head_sparsity)):
            if value is not None and not 0 <= value < 1:
                p.append(f"{flag} must be in [0, 1) (the fraction to remove), got {value}")
        structured = self.method == "structured"
        if self.pattern is not None:
            try:
                n, m = parse_pattern(self.pattern)
                if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                    p.append(f"--pattern {self.pattern} means sparsity {1 - n / m:g}; drop --sparsity {self.sparsity:g}")
            except UserError as exc:
                p.append(str(exc))
            if structured:
                p.append("--pattern is N:M sparsity inside weight matrices; use it with --method magnitude")
            if (self.steps or 1) > 1:
                p.append("--pattern is applied in one step; drop --steps")
        elif self.sparsity is None and not (structured and self.head_sparsity):
            p.append("give --sparsity S (the fraction to remove, e.g. 0.5)" + ("" if structured else " or --pattern N:M"))
        if structured:
            if self.scope not in (None, "layer"):
                p.append("--method structured prunes each layer by the same fraction; drop --scope (only magnitude has global scope)")
            if self.importance is not None and self.importance not in CRITERIA:
                p.append(f"--importance {self.importance!r} is unknown; choose one of {', '.join(CRITERIA)}")
            if self.round_to < 1:
                p.append(f"--round-to must be at least 1, got {self.round_to}")
            if self.calibration_batches < 1:
                p.append(f"--calibration-batches must be at least 1, got {self.calibration_batches}")
        else:
            if self.scope is not None and self.scope not in SCOPES:
                p.append(f"--scope {self.scope!r} is unknown; choose global or layer")
            if self.importance is not None:
                p.append("--importance ranks units for --method structured; magnitude pruning ranks weights by |w|")
            if self.round_to != 1:
                p.append("--round-to rounds the widths of --method structured; magnitude pruning keeps every shape")
            if self.head_sparsity:
                p.append("--head-sparsity removes attention heads: use it with --method structured")
        if self.distill:
            from ..distill.losses import KD_LOSSES  # plain constants, no torch

            if self.temperature is not None and not (is_finite_number(self.temperature) and self.temperature > 0):
                p.append(f"--temperature must be positive (and finite), got {self.temperature}")
            if self.alpha is not None and not 0 <= self.alpha <= 1:
                p.append(f"--alpha must be between 0 and 1, got {self.alpha}")
            if self.kd_loss is not None and self.kd_loss not in KD_LOSSES:
                p.append(f"--kd-loss {self.kd_loss!r} is unknown; choose one of {', '.join(KD_LOSSES)}")
        else:
            given = [f for f, v in (("--temperature", self.temperature), ("--alpha", self.alpha),
                                    ("--kd-loss", self.kd_loss)) if v is not None]
            if given:
                p.append(f"{', '.join(given)} set(s) the distillation loss; add --distill (and --finetune-epochs)")
        if self.steps is not None and self.steps < 1:
            p.append(f"--steps must be at least 1, got {self.steps}")
        if self.finetune_epochs < 0:
            p.append(f"--finetune-epochs must not be negative, got {self.finetune_epochs}")
        if self.split not in SPLITS:
            p.append(f"--split {self.split!r} is unknown; choose one of {', '.join(SPLITS)}")
        if self.bench_iterations < 1:
            p.append("--bench-iterations must be at least 1")
        if not self.out:
            p.append("give --out DIR for the pruned model")
        if p:
            raise ConfigErrors(p, "pruning options")

    @property
    def target(self) -> float:
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            return 1 - n / m
        return self.sparsity or 0.0


@dataclass
class PruneResult:
    run_dir: Path
    artifact: Path
    report: dict
    seconds: float


# --------------------------------------------------------------------------- the methods
# Each is set up (and every layer pattern and shape checked) before any work, then called once per
# step: step(model, spec, sparsity, head_sparsity) → (model, spec, rows, masks).


class _Magnitude:
    def __init__(self, cfg: PruneConfig, model):
        candidates = prunable_layers(model)
        if not candidates:
            raise UserError("the model has no Linear or Conv weights that magnitude pruning can sparsify")
        self.names, _ = split_ignored([n for n, _ in candidates], cfg.ignore)
        # Per layer by default: every layer ends at exactly S, and on the digits MLP it kept more
        # accuracy at 90 % than one global threshold did (docs/benchmarks.md).
        self.scope = cfg.scope or "layer"
        self.pattern = parse_pattern(cfg.pattern) if cfg.pattern else None
        if self.pattern:
            check_nm([(n, model.get_submodule(n)) for n in self.names], self.pattern[1])

    def step(self, model, spec, sparsity, _heads):
        model.cpu()
        masks = prune_unstructured([(n, model.get_submodule(n)) for n in self.names], sparsity, self.scope, self.pattern)
        return model, spec, [], masks


class _Structured:
    """Built-in architectures: the new widths go into the spec, the model is rebuilt from it."""

    def __init__(self, cfg: PruneConfig, model, spec: dict, task):
        groups = unit_groups(model, spec)
        check_ignore(groups, spec, cfg.ignore)
        self.original = {g.name: g.size for g in groups}  # schedule targets are fractions of these
        self.cfg, self.task = cfg, task

    def step(self, model, spec, sparsity, heads):
        cfg, grads = self.cfg, None
        model.cpu()
        if cfg.importance == "taylor":
            accumulate_gradients(model, self.task, cfg.calibration_batches)
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
        model, spec, rows = prune_builtin(model, spec, sparsity=sparsity, head_sparsity=heads,
                                          criterion=cfg.importance or "l2", round_to=cfg.round_to, ignore=cfg.ignore,
                                          original=self.original, grads=grads)
        return model.eval(), spec, rows, {}


class _UserGraph:
    """Users' models: Torch-Pruning's dependency graph; the changed shapes are recorded in the spec."""

    def __init__(self, cfg: PruneConfig, model, task, base_dir: Path):
        import torch

        from .user_graph import GraphPruner

        example = torch.from_numpy(task.example_input(2))
        self.graph = GraphPruner(model, example, sparsity=cfg.sparsity or 0.0, steps=cfg.steps,
                                 criterion=cfg.importance or "l2", round_to=cfg.round_to, ignore=cfg.ignore,
                                 schedule=torch_pruning_scheduler)
        self.cfg, self.task, self.base_dir = cfg, task, base_dir

    def step(self, model, spec, _sparsity, _heads):
        # Torch-Pruning's pruner keeps its own cubic schedule (set up for cfg.steps steps).
        rows = self.graph.step(self.task, self.cfg.calibration_batches)
        return model, _with_structure(spec, model, self.base_dir), rows, {}


def _with_structure(spec: dict, model, base_dir: Path) -> dict:
    """The user model's spec with a record of the shapes pruning changed, diffed against the module
    exactly as the user's file builds it (so pruning a pruned model records the total change)."""
    from bigmodel_cli.models import build_model
    from bigmodel_cli.models.pruned_shapes import PRUNED_KEY

    from .user_graph import structure_record

    bare = {k: v for k, v in spec.items() if k != PRUNED_KEY}
    record = structure_record(build_model(bare, base_dir=base_dir), model)
    return {**bare, PRUNED_KEY: record} if record else bare


# --------------------------------------------------------------------------- the command


def _check_request(artifact: art.Artifact, cfg: PruneConfig, spec: dict, finetune: bool) -> None:
    if not artifact.has_weights:
        parent = (artifact.manifest.get("parent") or {}).get("path", "its PyTorch parent")
        raise UserError(f"{artifact.path}: is ONNX-only (no {art.WEIGHTS_FILE}); prune the PyTorch artifact it came from ({parent})")
    quantization = artifact.config.get("quantization")
    if quantization:
        parent = (artifact.manifest.get("parent") or {}).get("path", "its float parent")
        raise UserError(f"{artifact.path}: is quantized ({quantization.get('mode', 'int8')}); prune the float artifact "
                        f"it came from ({parent}) and quantize the pruned one")
    arch = spec.get("arch")
    if cfg.method == "structured" and arch not in ARCHS + (USER_ARCH,):
        raise UserError(f"--method structured knows {', '.join(ARCHS)} and user models; this model is {arch!r}")
    if cfg.head_sparsity and arch not in ("gpt", "llama"):
        raise UserError(f"--head-sparsity removes attention heads of gpt and llama models; this model is {arch}")
    if (cfg.steps or 1) > 1 and not finetune:
        raise UserError(f"--steps {cfg.steps} needs --finetune-epochs E: the training between steps is what makes gradual pruning work")
    if cfg.distill and not finetune:
        raise UserError("--distill fine-tunes against the unpruned model; give --finetune-epochs E (or --max-steps N)")


def prune_artifact(artifact: art.Artifact, cfg: PruneConfig, train_cfg: TrainConfig | None = None,
                   progress: Progress | None = None, choose_lr: bool = False) -> PruneResult:
    """Prune ``artifact`` as ``cfg`` says, fine-tune with ``train_cfg``, write ``cfg.out``.

    ``choose_lr``: choose the fine-tuning rate from the original run's (the CLI, when --lr was not
    given); False keeps ``train_cfg.lr``, as a Python caller set it."""
    import torch

    from ...core import hardware
    from ...core.datasets import open_data

    progress = progress or no_progress
    started = time.perf_counter()
    cfg.validate()
    train_cfg = train_cfg or TrainConfig()
    train_cfg.validate()
    out = art.check_output(cfg.out, cfg.overwrite, [artifact.path, artifact.data_spec.get("path")])
    spec = copy.deepcopy(artifact.model_spec)
    finetune = cfg.finetune_epochs > 0 or bool(train_cfg.max_steps)
    _check_request(artifact, cfg, spec, finetune)
    cfg, train_cfg, defaults = _choose_schedule(artifact, cfg, train_cfg, choose_lr)
    if defaults:
        progress("defaults", **defaults)

    from ...core.tasks import make_task
    from bigmodel_cli.data.augment import policy_from_option

    data = open_data(artifact)
    augment = policy_from_option(train_cfg.augment, data, mixing_allowed=not cfg.distill)
    task = make_task(data, train_cfg.batch_size, train_cfg.seed, artifact.data_spec.get("block_size"),
                     train_cfg.eval_windows, augment)
    if task.name == "classification" and len(data.arrays(cfg.split)[1]) == 0:
        raise UserError(f"the artifact's {cfg.split} split is empty; measure on another one with --split val or train")
    threads = hardware.set_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    dense = artifact.build_model()
    model = copy.deepcopy(dense)
    is_user = spec["arch"] == USER_ARCH
    if cfg.method == "magnitude":
        method = _Magnitude(cfg, model)
    elif is_user:
        method = _UserGraph(cfg, model, task, artifact.path)
    else:
        method = _Structured(cfg, model, spec, task)
    targets = cubic_schedule(cfg.target, cfg.steps)[1:]
    head_targets = cubic_schedule(cfg.head_sparsity, cfg.steps)[1:]
    files = {art.MODEL_CODE_FILE: artifact.path / art.MODEL_CODE_FILE} if is_user else {}
    files.update(artifact.tokenizer_files())  # the pruned model reads text as its parent does
    before = measure.task_metrics(task, dense, cfg.split)

    schedule: list[dict] = []
    with art.atomic_directory(out, cfg.overwrite, [artifact.path]) as staging:
        for k in range(cfg.steps):
            record = {"step": k + 1, "sparsity": targets[k], **({"head_sparsity": head_targets[k]} if cfg.head_sparsity else {})}
            progress("prune", **record, steps=cfg.steps, method=cfg.method)
            model, spec, rows, masks = method.step(model, spec, targets[k], head_targets[k])
            if finetune:
                handles = hold_masks(model, masks)
                loss_fn = _teacher_loss(dense, model, task, cfg) if cfg.distill else None
                try:
                    record["finetune"] = _finetune(model, data, task, artifact, spec, train_cfg, cfg,
                                                   staging / "finetune" / f"step-{k + 1}", files, record, progress, loss_fn)
                finally:
                    for handle in handles:
                        handle.remove()
            schedule.append(record)
        model.cpu().eval()
        dense.cpu().eval()  # a distillation teacher followed the student to its device
        if cfg.method == "magnitude":
            rows = layer_sparsity(prunable_layers(model))

        progress("measure", split=cfg.split)
        config = _pruned_config(artifact, spec)
        report, after_metrics = _report(artifact, dense, model, task, cfg, staging / "best", config, files, threads,
                                        before, progress)
        report.update(layers=rows, schedule=schedule, **({"defaults": defaults} if defaults else {}))
        after = report["after"]
        metrics = {f"{cfg.split}_{k}": v for k, v in after_metrics.items()}
        metrics.update(params=after["params"], nonzero_params=after["nonzero_params"],
                       sparsity=1 - after["nonzero_params"] / after["params"] if after["params"] else 0.0)
        options = {"prune": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite")},
                   "finetune": dataclasses.asdict(train_cfg) if finetune else None}
        art.write_metadata(staging / "best", config=config, stage="prune", parent=artifact, options=options,
                           metrics=metrics, extra={"prune": report})
    return PruneResult(run_dir=out, artifact=out / "best", report=report, seconds=time.perf_counter() - started)


def _choose_schedule(artifact: art.Artifact, cfg: PruneConfig, train_cfg: TrainConfig,
                     choose_lr: bool) -> tuple[PruneConfig, TrainConfig, dict | None]:
    """cfg and train_cfg with the schedule and rate plan.finetune_plan chooses when --finetune-epochs
    is given, and what was chosen and why (None: nothing chosen, e.g. no fine-tuning or --pattern)."""
    if cfg.finetune_epochs <= 0 or cfg.pattern is not None or train_cfg.max_steps:
        return dataclasses.replace(cfg, steps=cfg.steps or 1), train_cfg, None
    chosen = finetune_plan(cfg.target, cfg.finetune_epochs, original_lr(artifact.manifest.get("options")),
                           steps=cfg.steps, lr=None if choose_lr else train_cfg.lr)
    cfg = dataclasses.replace(cfg, steps=chosen["steps"], finetune_epochs=chosen["epochs_per_step"])
    return cfg, dataclasses.replace(train_cfg, lr=chosen["lr"]), chosen


def _report(artifact, dense, model, task, cfg: PruneConfig, best: Path, config: dict, files: dict, threads: int,
            before_metrics: dict, progress) -> tuple[dict, dict]:
    """Write the pruned weights into ``best`` and measure both models side by side; returns the
    report and the pruned model's task metrics."""
    from bigmodel_cli.weights import save_model_weights
    from ...evaluate import BenchConfig, bench_input
    from ...core.tasks import torch_predict

    after_metrics = measure.task_metrics(task, model, cfg.split)
    best.mkdir()
    save_model_weights(model, best / art.WEIGHTS_FILE)
    for name, source in files.items():
        shutil.copyfile(source, best / name)
    before = {**measure.size_figures(dense, artifact.path / art.WEIGHTS_FILE), **before_metrics}
    after = {**measure.size_figures(model, best / art.WEIGHTS_FILE), **after_metrics}
    # A batch of 64 for classifiers, one training-length sequence for language models (as eval --bench).
    example = bench_input(artifact, task, BenchConfig())
    latency = onnx = None
    if cfg.bench:
        timed = measure.side_by_side_latency({"before": torch_predict(dense), "after": torch_predict(model)},
                                            example, cfg.bench_iterations)
        before.update(timed["before"])
        after.update(timed["after"])
        latency = {"backend": "torch", "threads": threads, "input_shape": list(example.shape)}
    if cfg.bench_onnx:
        progress("onnx")
        timed, onnx = measure.onnx_latency(artifact, model, config, files, example, threads, cfg.bench_iterations)
        before.update(timed["before"])
        after.update(timed["after"])
    return {"method": cfg.method, "split": cfg.split, "before": before, "after": after,
            "ratio": measure.ratios(before, after), "latency": latency, "onnx": onnx}, after_metrics


def _pruned_config(artifact: art.Artifact, spec: dict) -> dict:
    """config.json of the pruned model: the input's, with the pruned model section, and without the
    description of an ONNX file that the pruned artifact does not carry (when the input was an
    export that kept its weights)."""
    return {**{k: v for k, v in artifact.config.items() if k != "onnx"}, "model": spec}


def _teacher_loss(teacher, student, task, cfg: PruneConfig):
    """The distillation loss of ``bigmodel distill`` (its public hook for other commands), with the
    unpruned model as teacher: pruning removed capacity, the teacher shows what it computed."""
    from ..distill.command import distillation_loss_fn

    return distillation_loss_fn(teacher, student, task, temperature=2.0 if cfg.temperature is None else cfg.temperature,
                                alpha=0.5 if cfg.alpha is None else cfg.alpha, kd_loss=cfg.kd_loss or "forward-kl")


def _finetune(model, data, task, artifact, spec, train_cfg, cfg, run_dir: Path, files: dict, record: dict,
              progress, loss_fn=None) -> dict:
    """One trainer run on the pruned model; the model ends with the run's best weights."""
    from safetensors.torch import load_file

    from bigmodel_cli.weights import load_into
    from ...training.loop import run_job
    from ...training.job import TrainJob

    job_cfg = dataclasses.replace(
        train_cfg, model=str(artifact.path), epochs=cfg.finetune_epochs or None, out=str(run_dir),
        overwrite=False, resume=False)
    job = TrainJob(cfg=job_cfg, model=model, data=data, task=task,
                   artifact_config=_pruned_config(artifact, spec), stage="prune", parent=artifact, loss_fn=loss_fn,
                   extra_files=dict(files), manifest_extra={"prune_step": dict(record)})
    shown = Path(cfg.out) / "finetune" / run_dir.name  # where it will be, not the staging directory

    def relay(event: str, **info) -> None:
        progress(event, **({**info, "run_dir": str(shown)} if event == "start" else info))

    result = run_job(job, relay)
    best = result.best_dir / art.WEIGHTS_FILE
    model.cpu()
    load_into(model, load_file(best), source=best)
    return {"run_dir": f"finetune/{run_dir.name}", "steps": result.steps, "best_step": result.best_step,
            **{k: v for k, v in result.best_metrics.items() if k != "step"}}
