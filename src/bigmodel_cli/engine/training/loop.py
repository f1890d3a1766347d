"""The training loop behind ``bigmodel train`` (and the fine-tuning in prune and distill).

``run_job`` runs any TrainJob (engine/training/job.py builds one from a TrainConfig and checks it):
the loop is step-based and every batch is a pure function of (seed, step), so resume needs only the
step, and data-parallel ranks only slice the same batch. Under torchrun the same loop runs on every
rank (engine/training/distributed.py: DDP or FSDP, the loss weighted so that N processes train like one, rank
0 alone writing). The run directory it writes (metrics.jsonl; run.json and the --resume checks are
in run_dir.py) is kept here too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ... import artifact as art
from ... import outputs
from ...config import TrainConfig, asdict
from ...errors import NonFiniteLoss, UserError
from ...models import count_parameters
from . import distributed
from ..core import hardware
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..core.tasks import torch_predict
from .job import TrainJob, prepare_training
from .run_dir import RUN_FILE, check_resume, run_fingerprint

METRICS_FILE = "metrics.jsonl"

Progress = Callable[..., None]


def _no_progress(event: str, **info: Any) -> None:
    pass


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path
    last_dir: Path
    steps: int
    best_step: int
    best_metrics: dict
    last_metrics: dict
    stopped_early: bool
    resumed_from: int | None
    seconds: float
    runtime: dict
    is_main: bool = True  # False on the other ranks of a distributed run: they print nothing


# --------------------------------------------------------------------------- the loop


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then cosine (to 10% of --lr), linear (to 0) or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(cfg: TrainConfig, params):
    import torch

    # Weight decay on matrices only, not on biases and norms (the usual practice).
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        # Adam's weight decay is L2 in the gradient; AdamW's is decoupled.
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _trainable(job: TrainJob):
    seen, params = set(), []
    for module in (job.model, job.aux):
        if module is None:
            continue
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _total_steps(cfg: TrainConfig, task) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.epochs:
        return math.ceil(cfg.epochs * task.micro_batches_per_epoch / cfg.grad_accum)
    if task.name == "language-modeling":
        return 500
    return math.ceil(30 * task.micro_batches_per_epoch / cfg.grad_accum)


def _prepare_run_dir(job: TrainJob) -> Path:
    """The directory this run writes: ``--out`` itself, or with --overwrite of an existing run a
    hidden staging directory beside it that replaces it when the run is complete (``_finish_run_dir``)."""
    cfg = job.cfg
    run_dir = Path(cfg.out)
    if cfg.resume:
        return check_resume(job)
    if run_dir.exists():  # check_output already required --overwrite and that bigmodel wrote it
        run_dir = outputs.staging_path(run_dir)
    try:
        run_dir.mkdir(parents=True)
        outputs.write_json_atomic(run_dir / RUN_FILE, run_fingerprint(job))
    except OSError as exc:
        problem = art.storage_problem(exc) or exc.strerror or str(exc)
        raise UserError(f"{cfg.out}: cannot create the run directory ({problem}); choose another --out") from None
    return run_dir


def _finish_run_dir(job: TrainJob, run_dir: Path) -> Path:
    """Move a staged run into place (the old run is removed only once the new one is there)."""
    final = Path(job.cfg.out)
    if run_dir != final:
        outputs.swap_into_place(run_dir, final)
    return final


def _discard_staging(job: TrainJob, run_dir: Path | None) -> None:
    """A failed --overwrite run leaves the old run as it was and nothing beside it."""
    if run_dir is not None and run_dir != Path(job.cfg.out):
        shutil.rmtree(run_dir, ignore_errors=True)


class _MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, path)
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(art.jsonable(record)) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one cut short by a killed process."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else None
    except json.JSONDecodeError:
        return None


class _NoLog:
    """metrics.jsonl on ranks other than 0: they write nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _is_better(task, value: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if task.higher_is_better else value < best - min_delta


def _save_artifact(job: TrainJob, path: Path, metrics: dict, runtime: dict, model=None) -> None:
    art.save_torch_artifact(
        path, job.model if model is None else model, config=job.artifact_config, stage=job.stage, overwrite=True, parent=job.parent,
        options=asdict(job.cfg), metrics=metrics, extra_files=job.extra_files,
        extra={"runtime": runtime, **job.manifest_extra},
    )


def run_job(job: TrainJob, progress: Progress | None = None) -> TrainResult:
    """Run a training job: in this process, or as one rank of a torchrun-launched run."""
    device = hardware.resolve_device(job.cfg.device)
    ranks = distributed.join(job, device)  # a single process unless launched by torchrun
    ok, run_dir = False, None
    try:
        run_dir = Path(ranks.on_main(lambda: str(_prepare_run_dir(job))))  # rank 0 creates it; all learn of errors
        result = _run(job, ranks, device, (progress or _no_progress) if ranks.is_main else _no_progress, run_dir)
        ok = True
        return result
    except Exception as exc:
        converted = distributed.lost_contact(exc, ranks)
        if converted is exc:
            raise
        raise converted from exc
    finally:
        if not ok and ranks.is_main:
            _discard_staging(job, run_dir)
        ranks.close(ok)
        job.release_output()


def _run(job: TrainJob, ranks, device: str, progress: Progress, run_dir: Path) -> TrainResult:
    import torch

    cfg, task, model = job.cfg, job.task, job.model
    threads = hardware.set_threads(ranks.threads(cfg.threads))
    n_params = count_parameters(model)
    precision = hardware.resolve_precision(cfg.precision, device, n_params)
    runtime = {"device": device, "precision": precision, "threads": threads, "params": n_params, **ranks.describe()}
    if not ranks.shards:  # FSDP places each rank's shards on the device itself
        model.to(device)
    if job.aux is not None:
        job.aux.to(device)
    params = _trainable(job)
    optimizer = make_optimizer(cfg, params)
    total = _total_steps(cfg, task)
    steps_per_epoch = max(1, task.micro_batches_per_epoch // cfg.grad_accum)
    eval_every = cfg.eval_every or (steps_per_epoch if task.name == "classification" else max(1, total // 10))
    checkpoint_every = cfg.checkpoint_every or eval_every

    step, best, best_step, bad_evals, skipped, resumed_from = 0, None, 0, 0, 0, None
    best_metrics: dict = {}
    if cfg.resume:
        found = ranks.on_main(lambda: str(latest_checkpoint(run_dir) or ""))
        if found:
            # Checkpoints are full and in the single-process layout, whatever the number of
            # processes that wrote them: every rank loads the same one before wrapping the model.
            state = load_checkpoint(Path(found), model, optimizer, job.aux)
            step, best, best_step = state["step"], state["best"], state["best_step"]
            bad_evals, skipped, best_metrics = state["bad_evals"], state["skipped"], state.get("best_metrics", {})
            resumed_from = step
    train_model, optimizer = ranks.wrap(model, optimizer, lambda ps: make_optimizer(cfg, ps))
    params = _trainable(job)  # FSDP replaced the parameters with their shards
    log = _MetricsLog(run_dir / METRICS_FILE, resumed_from if cfg.resume else None) if ranks.is_main else _NoLog()
    loss_fn = job.loss_fn or (lambda m, x, y: task.loss(m(x), y))
    tokens_per_sample = getattr(task, "block_size", 1)
    # run_dir is where the run will be; writing_to is where it is built (a staging directory with --overwrite)
    progress("start", total=total, step=step, runtime=runtime, run_dir=str(cfg.out), writing_to=str(run_dir),
             resumed_from=resumed_from, per_step=cfg.batch_size * cfg.grad_accum * tokens_per_sample)

    def state_record() -> dict:
        return {"best": best, "best_step": best_step, "bad_evals": bad_evals, "skipped": skipped,
                "best_metrics": best_metrics, "epoch": task.epoch_of(step * cfg.grad_accum)}

    def evaluate() -> dict:
        def run() -> dict:
            model.eval()
            metrics = task.evaluate(torch_predict(model, device), "val")
            model.train()
            return metrics

        return ranks.evaluate(run)

    def save_artifact(name: str, metrics: dict) -> None:
        full = ranks.full_model(model)  # under FSDP every rank takes part in gathering the weights
        if ranks.is_main:
            _save_artifact(job, run_dir / name, metrics, runtime, full)

    started, stopped_early, last_metrics = time.perf_counter(), False, {}
    window_start, window_items = time.perf_counter(), 0
    model.train()
    try:
        while step < total:
            lr = lr_at(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            micro = [ranks.batch(task, step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
            sizes = ranks.global_sizes([n for _x, _y, n in micro])
            for k, (x, y, n) in enumerate(micro):
                x, y = x.to(device), y.to(device)
                weight = ranks.loss_weight(n, sizes[k])  # 1.0 in one process
                with ranks.sync_gradients(train_model, k == cfg.grad_accum - 1):
                    with hardware.autocast(device, precision):
                        loss = loss_fn(train_model, x, y)
                    ((loss * weight if weight != 1.0 else loss) / cfg.grad_accum).backward()
                loss_value += loss.item() * (n / sizes[k]) / cfg.grad_accum
                window_items += sizes[k] * tokens_per_sample
            loss_value = ranks.sum(loss_value)  # the global batch's loss, the same on every rank
            grad_norm = ranks.scalar(
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                if skipped < cfg.skip_nonfinite:
                    skipped += 1
                    log.write({"step": step, "event": "skipped_nonfinite", "what": what})
                    step += 1
                    continue
                # A failed --overwrite run's staging directory is removed, and its checkpoints with it.
                last_good = latest_checkpoint(run_dir) if run_dir == Path(cfg.out) else None
                raise NonFiniteLoss(
                    f"step {step}: the {what} is not finite; training stopped"
                    + (f" (last good checkpoint: {last_good})" if last_good else "")
                    + "; lower --lr, keep --grad-clip on, or pass --skip-nonfinite N to skip bad batches"
                )
            optimizer.step()
            step += 1
            now = time.perf_counter()
            record = {"step": step, "epoch": task.epoch_of(step * cfg.grad_accum), "loss": loss_value, "lr": lr,
                      "grad_norm": grad_norm}
            if now - window_start > 0:
                record["items_per_s"] = window_items / (now - window_start)
            window_start, window_items = now, 0
            log.write(record)
            progress("step", **record, total=total)

            if step % eval_every == 0 or step == total:
                metrics = evaluate()
                last_metrics = {"step": step, **{f"val_{k}": v for k, v in metrics.items()}}
                log.write({"step": step, "event": "eval", **last_metrics})
                value = metrics[task.metric]
                if _is_better(task, value, best, cfg.min_delta):
                    best, best_step, bad_evals, best_metrics = value, step, 0, last_metrics
                    save_artifact("best", best_metrics)
                else:
                    bad_evals += 1
                progress("eval", **last_metrics, best=best, best_step=best_step)
                if cfg.patience and bad_evals >= cfg.patience:
                    stopped_early = True
            if step % checkpoint_every == 0 or step == total or stopped_early:
                full_model, full_optimizer = ranks.full_model(model), ranks.full_optimizer(model, optimizer)
                if ranks.is_main:
                    save_checkpoint(run_dir, step, full_model, full_optimizer, state_record(), job.aux,
                                    cfg.keep_checkpoints)
            if stopped_early:
                log.write({"step": step, "event": "early_stop", "patience": cfg.patience})
                break
    finally:
        log.close()
    if not last_metrics or last_metrics.get("step") != step:
        last_metrics = {"step": step, **{f"val_{k}": v for k, v in evaluate().items()}}
    if ranks.on_main(lambda: not (run_dir / "best").exists()):
        best_metrics = last_metrics
        save_artifact("best", best_metrics)
    save_artifact("last", last_metrics)
    run_dir = Path(ranks.on_main(lambda: str(_finish_run_dir(job, run_dir))))
    result = TrainResult(
        run_dir=run_dir, best_dir=run_dir / "best", last_dir=run_dir / "last", steps=step, best_step=best_step,
        best_metrics=best_metrics, last_metrics=last_metrics, stopped_early=stopped_early,
        resumed_from=resumed_from, seconds=time.perf_counter() - started, runtime=runtime, is_main=ranks.is_main,
    )
    progress("done", result=result)
    return result


def train(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    return run_job(prepare_training(cfg), progress)
