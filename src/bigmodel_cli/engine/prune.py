"""``bigmodel prune``: make a trained model sparse (magnitude, N:M) or smaller (structured), optionally
in several steps with fine-tuning between and after them, and measure what it bought.

One call, ``prune_artifact``: validate everything, then for each step of the cubic schedule prune
(``pruning/``) and fine-tune with the one training loop (``train.run_job``: a TrainJob with the
pruned model, stage "prune", parent the input artifact), and finally measure the dense and the
pruned model side by side on the same split and inputs. The output directory is laid out like a
training run: ``best/`` is the pruned artifact (what every other command opens when given the
directory) and ``finetune/step-K/`` holds the trainer's runs (metrics.jsonl, checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import statistics
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import artifact as art
from ..config import TrainConfig
from ..errors import ConfigErrors, UserError
from ..models import USER_ARCH
from .pruning.magnitude import SCOPES, check_nm, hold_masks, layer_sparsity, prunable_layers, prune_unstructured
from .pruning.plan import cubic_schedule, parse_pattern, split_ignored, torch_pruning_scheduler
from .pruning.structured import ARCHS, CRITERIA, accumulate_gradients, prune_builtin

METHODS = ("magnitude", "structured")
SPLITS = ("train", "val", "test")
Progress = Callable[..., None]


@dataclass
class PruneConfig:
    method: str = "magnitude"
    sparsity: float | None = None  # fraction of weights (magnitude) or of units per layer (structured)
    scope: str | None = None  # magnitude: global (default) or layer
    pattern: str | None = None  # magnitude: N:M, e.g. 2:4
    importance: str | None = None  # structured: l1, l2 (default) or taylor
    head_sparsity: float = 0.0  # structured gpt: fraction of attention heads per block
    round_to: int = 1  # structured: kept widths are multiples of this
    ignore: list[str] = field(default_factory=list)  # fnmatch patterns of layer names to leave alone
    steps: int = 1  # increments along the cubic schedule
    finetune_epochs: int = 0  # training epochs after each step
    calibration_batches: int = 8  # taylor: training batches whose gradients score the units
    distill: bool = False
    split: str = "test"  # where the report measures before and after
    bench: bool = True  # measure torch latency before/after
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
            if self.steps > 1:
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
        if self.steps < 1:
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


# --------------------------------------------------------------------------- measuring


def _flat_size(model) -> tuple[int, int]:
    params = nonzero = 0
    seen = set()
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen or not tensor.is_floating_point():
            continue
        seen.add(key)
        params += tensor.numel()
        nonzero += int((tensor != 0).sum())
    return params, nonzero


def _file_sizes(path: Path) -> dict:
    data = path.read_bytes()
    # Dense storage keeps zeros, so unstructured sparsity does not shrink the file; it does make it
    # compress, which is what shipping it zipped would buy.
    return {"file_bytes": len(data), "compressed_bytes": len(zlib.compress(data, 6))}


def _latency(predicts: dict[str, Callable], example, iterations: int, warmup: int = 3) -> dict:
    """p50/p95 of each predict on the same input, interleaved (A B B A …) so drift hits both alike."""
    names = list(predicts)
    for _ in range(warmup):
        for name in names:
            predicts[name](example)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iterations):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            predicts[name](example)
            times[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {"latency_ms_p50": statistics.median(values),
                     "latency_ms_p95": values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]}
    return out


def _task_metrics(task, model, split: str) -> dict:
    from .tasks import torch_predict

    model.eval()
    metrics = task.evaluate(torch_predict(model.cpu()), split)
    return {k: v for k, v in metrics.items() if k not in ("samples", "tokens")}


# --------------------------------------------------------------------------- the command


def _check_request(artifact: art.Artifact, cfg: PruneConfig, spec: dict) -> None:
    if not artifact.has_weights:
        parent = (artifact.manifest.get("parent") or {}).get("path", "its PyTorch parent")
        raise UserError(f"{artifact.path}: is ONNX-only (no {art.WEIGHTS_FILE}); prune the PyTorch artifact it came from ({parent})")
    arch = spec.get("arch")
    if cfg.method == "structured" and arch not in ARCHS + (USER_ARCH,):
        raise UserError(f"--method structured knows {', '.join(ARCHS)} and user models; this model is {arch!r}")
    if cfg.head_sparsity and arch != "gpt":
        raise UserError(f"--head-sparsity removes attention heads of gpt models; this model is {arch}")
    if cfg.distill:
        raise UserError(
            "--distill is not available yet (it needs `bigmodel distill`, which has not landed); "
            "fine-tune without it, or distill the pruned model afterwards"
        )


def prune_artifact(artifact: art.Artifact, cfg: PruneConfig, train_cfg: TrainConfig | None = None,
                   progress: Progress | None = None) -> PruneResult:
    """Prune ``artifact`` as ``cfg`` says, fine-tune with ``train_cfg``, write ``cfg.out``."""
    import torch

    from .evaluate import BenchConfig, bench_input, open_data
    from .tasks import make_task, torch_predict
    from .train import TrainJob, run_job

    progress = progress or (lambda event, **info: None)
    started = time.perf_counter()
    cfg.validate()
    train_cfg = train_cfg or TrainConfig()
    train_cfg.validate()
    out = art.check_output(cfg.out, cfg.overwrite)
    spec = copy.deepcopy(artifact.model_spec)
    _check_request(artifact, cfg, spec)
    finetune = cfg.finetune_epochs > 0 or bool(train_cfg.max_steps)
    if cfg.steps > 1 and not finetune:
        raise UserError(f"--steps {cfg.steps} needs --finetune-epochs E: the training between steps is what makes gradual pruning work")

    data = open_data(artifact)
    block_size = artifact.data_spec.get("block_size")
    task = make_task(data, train_cfg.batch_size, train_cfg.seed, block_size, train_cfg.eval_windows)
    if task.name == "classification" and len(data.arrays(cfg.split)[1]) == 0:
        raise UserError(f"the artifact's {cfg.split} split is empty; measure on another one with --split val or train")
    from . import hardware

    threads = hardware.set_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    dense = artifact.build_model()
    model = copy.deepcopy(dense)
    is_user = spec["arch"] == USER_ARCH
    structured = cfg.method == "structured"

    # Check every layer pattern and shape before any work (and before anything is written).
    graph = None
    if structured and is_user:
        from .pruning.user_graph import GraphPruner

        example = torch.from_numpy(task.example_input(2))
        graph = GraphPruner(model, example, sparsity=cfg.sparsity or 0.0, steps=cfg.steps,
                            criterion=cfg.importance or "l2", round_to=cfg.round_to, ignore=cfg.ignore,
                            schedule=torch_pruning_scheduler)
    elif structured:
        from .pruning.structured import check_ignore, unit_groups

        groups = unit_groups(model, spec)
        check_ignore(groups, spec, cfg.ignore)
        original = {g.name: g.size for g in groups}  # widths before the first step
    else:
        candidates = prunable_layers(model)
        if not candidates:
            raise UserError("the model has no Linear or Conv weights that magnitude pruning can sparsify")
        pruned_names, _ = split_ignored([n for n, _ in candidates], cfg.ignore)
        layers = [(n, m) for n, m in candidates if n in pruned_names]
        pattern = parse_pattern(cfg.pattern) if cfg.pattern else None
        if pattern:
            check_nm(layers, pattern[1])
    targets = cubic_schedule(cfg.target, cfg.steps)[1:]
    head_targets = cubic_schedule(cfg.head_sparsity, cfg.steps)[1:]

    before_metrics = _task_metrics(task, dense, cfg.split)
    artifact_files = {}
    if is_user:
        artifact_files[art.MODEL_CODE_FILE] = artifact.path / art.MODEL_CODE_FILE
    schedule: list[dict] = []
    rows: list[dict] = []
    with art.atomic_directory(out, cfg.overwrite) as staging:
        for k in range(cfg.steps):
            step_record = {"step": k + 1, "sparsity": targets[k]}
            if cfg.head_sparsity:
                step_record["head_sparsity"] = head_targets[k]
            progress("prune", **step_record, steps=cfg.steps, method=cfg.method)
            masks = {}
            if graph is not None:
                rows = graph.step(task, cfg.calibration_batches)
                spec = _with_structure(spec, model, artifact.path)
            elif structured:
                model.cpu()
                grads = None
                if (cfg.importance or "l2") == "taylor":
                    accumulate_gradients(model, task, cfg.calibration_batches)
                    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                    model.zero_grad(set_to_none=True)
                model, spec, rows = prune_builtin(
                    model, spec, sparsity=targets[k], head_sparsity=head_targets[k],
                    criterion=cfg.importance or "l2", round_to=cfg.round_to, ignore=cfg.ignore,
                    original=original, grads=grads)
                model.eval()
            else:
                model.cpu()
                layers = [(n, model.get_submodule(n)) for n, _ in layers]
                masks = prune_unstructured(layers, targets[k], cfg.scope or "global", pattern)
            if finetune:
                handles = hold_masks(model, masks)
                try:
                    step_record["finetune"] = _finetune(
                        TrainJob, run_job, model, data, task, artifact, spec, train_cfg, cfg,
                        staging / "finetune" / f"step-{k + 1}", artifact_files, step_record, progress)
                finally:
                    for handle in handles:
                        handle.remove()
            schedule.append(step_record)
        model.cpu().eval()
        if not structured:
            rows = layer_sparsity([(n, model.get_submodule(n)) for n, _ in prunable_layers(model)])

        progress("measure", split=cfg.split)
        after_metrics = _task_metrics(task, model, cfg.split)
        best = staging / "best"
        best.mkdir()
        from ..weights import save_model_weights

        save_model_weights(model, best / art.WEIGHTS_FILE)
        for name, source in artifact_files.items():
            shutil.copyfile(source, best / name)
        before_params, before_nonzero = _flat_size(dense)
        after_params, after_nonzero = _flat_size(model)
        before = {"params": before_params, "nonzero_params": before_nonzero,
                  **_file_sizes(artifact.path / art.WEIGHTS_FILE), **before_metrics}
        after = {"params": after_params, "nonzero_params": after_nonzero,
                 **_file_sizes(best / art.WEIGHTS_FILE), **after_metrics}
        if cfg.bench:
            example = bench_input(artifact, task, BenchConfig())
            timed = _latency({"before": torch_predict(dense.eval()), "after": torch_predict(model)},
                             example, cfg.bench_iterations)
            before.update(timed["before"])
            after.update(timed["after"])
        report = {
            "method": cfg.method, "split": cfg.split, "before": before, "after": after,
            "ratio": {k: after[k] / before[k] for k in before if k in after and isinstance(before[k], (int, float)) and before[k]},
            "layers": rows, "schedule": schedule,
            "latency": {"backend": "torch", "threads": threads, "input_shape": list(example.shape)} if cfg.bench else None,
        }
        config = {**artifact.config, "model": spec}
        metrics = {f"{cfg.split}_{k}": v for k, v in after_metrics.items()}
        metrics.update(params=after_params, nonzero_params=after_nonzero,
                       sparsity=1 - after_nonzero / after_params if after_params else 0.0)
        options = {"prune": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite")},
                   "finetune": dataclasses.asdict(train_cfg) if finetune else None}
        art.write_metadata(best, config=config, stage="prune", parent=artifact, options=options,
                           metrics=metrics, extra={"prune": report})
    return PruneResult(run_dir=out, artifact=out / "best", report=report, seconds=time.perf_counter() - started)


def _with_structure(spec: dict, model, base_dir: Path) -> dict:
    """The user model's spec with a record of the shapes pruning changed, diffed against the module
    exactly as the user's file builds it (so pruning a pruned model records the total change)."""
    from ..models import build_model
    from .pruning.user_graph import PRUNED_KEY, structure_record

    bare = {k: v for k, v in spec.items() if k != PRUNED_KEY}
    record = structure_record(build_model(bare, base_dir=base_dir), model)
    return {**bare, PRUNED_KEY: record} if record else bare


def _finetune(TrainJob, run_job, model, data, task, artifact, spec, train_cfg, cfg, run_dir: Path,
              files: dict, step_record: dict, progress) -> dict:
    """One trainer run on the pruned model; the model ends with the run's best weights."""
    from ..weights import load_into

    job_cfg = dataclasses.replace(
        train_cfg, model=str(artifact.path), epochs=cfg.finetune_epochs or None, out=str(run_dir),
        overwrite=False, resume=False)
    job = TrainJob(cfg=job_cfg, model=model, data=data, task=task,
                   artifact_config={**artifact.config, "model": spec}, stage="prune", parent=artifact,
                   extra_files=dict(files), manifest_extra={"prune_step": dict(step_record)})
    shown = Path(cfg.out) / "finetune" / run_dir.name  # where it will be, not the staging directory

    def relay(event: str, **info) -> None:
        progress(event, **({**info, "run_dir": str(shown)} if event == "start" else info))

    result = run_job(job, relay)
    from safetensors.torch import load_file

    best = result.best_dir / art.WEIGHTS_FILE
    model.cpu()
    load_into(model, load_file(best), source=best)
    return {"run_dir": f"finetune/{run_dir.name}", "steps": result.steps, "best_step": result.best_step,
            **{k: v for k, v in result.best_metrics.items() if k != "step"}}
