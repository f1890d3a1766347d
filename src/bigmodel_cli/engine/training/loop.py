"""The training loop behind ``bigmodel train`` (and the fine-tuning in prune and distill).

``run_job`` runs any TrainJob (engine/training/job.py builds one from a TrainConfig and checks it):
the loop is step-based and every batch is a pure function of (seed, step), so resume needs only the
step, and data-parallel ranks only slice the same batch. Under torchrun the same loop runs on every
rank (engine/training/distributed.py: DDP or FSDP, the loss weighted so that N processes train like one, rank
0 alone writing). The run directory it writes (metrics.jsonl; run.json and the --resume checks are
in run_dir.py) is kept here too.

The loop is ``_TrainingLoop.run``: ``start_or_resume``, then ``train_step``, ``maybe_evaluate`` and
``maybe_checkpoint`` per step, then ``finish``; what changes from step to step is one ``LoopState``.

A caller that must bound the time of a command that trains (``optimize`` running prune, distill or
QAT inside its time budget) wraps the call in ``training_deadline``: a run started inside it stops
after the first optimizer step that ends past the deadline, as early stopping does (a checkpoint,
best/ and last/ written), and the caller learns from the returned ``Deadline`` that it did.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ... import artifact as art
from ...output_file import write_json_atomic
from ...output_staging import staging_path, swap_into_place
from ...config import TrainConfig, asdict
from ...errors import NonFiniteLoss, UserError
from ...models import count_parameters
from . import distributed
from ..core import hardware
from ..core.progress import Progress, no_progress
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..core.tasks import torch_predict
from .job import TrainJob, prepare_training
from .run_dir import METRICS_FILE, RUN_FILE, MetricsLog, NoLog, check_resume, run_fingerprint



@dataclass
class Deadline:
    """When training must stop (``time.monotonic()`` seconds), and whether a run stopped for it."""

    at: float
    reached: bool = False


# A context variable rather than a TrainJob field: prune, distill and quantize --qat build their own
# jobs, and the caller that holds a time budget (optimize) should not need a parameter in each.
# Unset (None) for `bigmodel train` and every other command: their runs are unchanged.
_DEADLINE: ContextVar[Deadline | None] = ContextVar("training_deadline", default=None)


@contextmanager
def training_deadline(seconds: float) -> Iterator[Deadline]:
    """Training runs started in this block (in this process) stop once ``seconds`` have passed."""
    deadline = Deadline(time.monotonic() + seconds)
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)

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
        run_dir = staging_path(run_dir)
    try:
        run_dir.mkdir(parents=True)
        write_json_atomic(run_dir / RUN_FILE, run_fingerprint(job))
    except OSError as exc:
        problem = art.storage_problem(exc) or exc.strerror or str(exc)
        raise UserError(f"{cfg.out}: cannot create the run directory ({problem}); choose another --out") from None
    return run_dir


def _finish_run_dir(job: TrainJob, run_dir: Path) -> Path:
    """Move a staged run into place (the old run is removed only once the new one is there)."""
    final = Path(job.cfg.out)
    if run_dir != final:
        swap_into_place(run_dir, final)
    return final


def _discard_staging(job: TrainJob, run_dir: Path | None) -> None:
    """A failed --overwrite run leaves the old run as it was and nothing beside it."""
    if run_dir is not None and run_dir != Path(job.cfg.out):
        shutil.rmtree(run_dir, ignore_errors=True)


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
        progress = (progress or no_progress) if ranks.is_main else no_progress
        result = _TrainingLoop(job, ranks, device, progress, run_dir).run()
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


@dataclass
class LoopState:
    """What the loop changes as it runs. A checkpoint saves the first five fields (``saved``), and a
    resume restores them: with the step, that is all a bit-exact resume needs, since every batch is
    a pure function of (seed, step)."""

    step: int = 0
    best: float | None = None  # the best value of the task's metric so far
    best_step: int = 0
    bad_evals: int = 0  # evaluations in a row without improvement (--patience)
    skipped: int = 0  # non-finite batches skipped so far (--skip-nonfinite)
    best_metrics: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)  # of the latest evaluation
    resumed_from: int | None = None
    stopped_early: bool = False
    out_of_time: bool = False  # stopped at a ``training_deadline`` (not saved: a resume trains on)

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "LoopState":
        return cls(step=saved["step"], best=saved["best"], best_step=saved["best_step"], bad_evals=saved["bad_evals"],
                   skipped=saved["skipped"], best_metrics=saved.get("best_metrics", {}), resumed_from=saved["step"])

    def saved(self, epoch: float) -> dict:
        """The record a checkpoint keeps (its state.json, beside the step)."""
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals, "skipped": self.skipped,
                "best_metrics": self.best_metrics, "epoch": epoch}


class _Throughput:
    """Items (samples, or tokens for language models) per second since the last logged step; a
    skipped batch's items count towards the next logged one."""

    def __init__(self) -> None:
        self.start, self.items = time.perf_counter(), 0

    def add(self, items: int) -> None:
        self.items += items

    def take(self) -> float | None:
        """The rate over the window, which then starts again; None when no time has passed."""
        now = time.perf_counter()
        rate = self.items / (now - self.start) if now - self.start > 0 else None
        self.start, self.items = now, 0
        return rate


class _TrainingLoop:
    """One run of the loop, read top to bottom in ``run``: ``start_or_resume``, the evaluation of the
    starting weights when the job asks for it (``evaluate_start``), then ``train_step``,
    ``maybe_evaluate`` and ``maybe_checkpoint`` until the last step or early stopping, then ``finish``.
    The fixed setup (model on its device, optimizer, schedule) is made once here, the wrapped
    model, its parameters and the metrics log in ``start_or_resume`` (they depend on the
    checkpoint); what changes from step to step is in ``self.state``."""

    def __init__(self, job: TrainJob, ranks, device: str, progress: Progress, run_dir: Path):
        cfg, task = job.cfg, job.task
        self.job, self.cfg, self.task, self.model = job, cfg, task, job.model
        self.ranks, self.device, self.progress, self.run_dir = ranks, device, progress, run_dir
        threads = hardware.set_threads(ranks.threads(cfg.threads))
        n_params = count_parameters(self.model)
        self.precision = hardware.resolve_precision(cfg.precision, device, n_params)
        self.runtime = {"device": device, "precision": self.precision, "threads": threads, "params": n_params,
                        **ranks.describe()}
        if not ranks.shards:  # FSDP places each rank's shards on the device itself
            self.model.to(device)
        if job.aux is not None:
            job.aux.to(device)
        self.optimizer = make_optimizer(cfg, _trainable(job))
        self.total = _total_steps(cfg, task)
        steps_per_epoch = max(1, task.micro_batches_per_epoch // cfg.grad_accum)
        self.eval_every = cfg.eval_every or (steps_per_epoch if task.name == "classification" else max(1, self.total // 10))
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        self.loss_fn = job.loss_fn or (lambda m, x, y: task.loss(m(x), y))
        self.tokens_per_sample = getattr(task, "block_size", 1)
        self.state = LoopState()
        self.deadline = _DEADLINE.get()

    def run(self) -> TrainResult:
        self.start_or_resume()
        started = time.perf_counter()
        self.model.train()
        try:
            if self.job.evaluate_start and self.state.step == 0:
                self.evaluate_and_select()  # the starting weights: best/ until a step beats them
            self.throughput = _Throughput()  # after that evaluation, which is not training throughput
            while self.state.step < self.total:
                if not self.train_step():
                    continue  # a skipped non-finite batch: no evaluation or checkpoint for it
                self.maybe_evaluate()
                self.check_deadline()
                self.maybe_checkpoint()
                if self.state.stopped_early:
                    self.log.write({"step": self.state.step, "event": "early_stop", "patience": self.cfg.patience})
                    break
                if self.state.out_of_time:
                    self.log.write({"step": self.state.step, "event": "deadline"})
                    break
        finally:
            self.log.close()
        return self.finish(started)

    # --- the steps, in the order ``run`` takes them

    def start_or_resume(self) -> None:
        """Restore the latest checkpoint with --resume, wrap the model for DDP/FSDP, open metrics.jsonl."""
        cfg, ranks = self.cfg, self.ranks
        if cfg.resume:
            found = ranks.on_main(lambda: str(latest_checkpoint(self.run_dir) or ""))
            if found:
                # Checkpoints are full and in the single-process layout, whatever the number of
                # processes that wrote them: every rank loads the same one before wrapping the model.
                self.state = LoopState.from_checkpoint(load_checkpoint(Path(found), self.model, self.optimizer, self.job.aux))
        self.train_model, self.optimizer = ranks.wrap(self.model, self.optimizer, lambda ps: make_optimizer(cfg, ps))
        self.params = _trainable(self.job)  # FSDP replaced the parameters with their shards
        resume_step = self.state.resumed_from if cfg.resume else None
        self.log = MetricsLog(self.run_dir / METRICS_FILE, resume_step) if ranks.is_main else NoLog()
        # run_dir is where the run will be; writing_to is where it is built (a staging directory with --overwrite)
        self.progress("start", total=self.total, step=self.state.step, runtime=self.runtime, run_dir=str(cfg.out),
                      writing_to=str(self.run_dir), resumed_from=self.state.resumed_from,
                      per_step=cfg.batch_size * cfg.grad_accum * self.tokens_per_sample)

    def train_step(self) -> bool:
        """One optimizer step over --grad-accum micro-batches, logged; False when the batch was
        skipped as non-finite (``skip_nonfinite`` raises once the skips are used up)."""
        import torch

        cfg, state = self.cfg, self.state
        lr = lr_at(state.step, cfg, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = self.accumulate_gradients()
        grad_norm = self.ranks.scalar(
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.skip_nonfinite("loss" if not math.isfinite(loss_value) else "gradient norm")
            return False
        self.optimizer.step()
        state.step += 1
        record = {"step": state.step, "epoch": self.task.epoch_of(state.step * cfg.grad_accum), "loss": loss_value,
                  "lr": lr, "grad_norm": grad_norm}
        rate = self.throughput.take()
        if rate is not None:
            record["items_per_s"] = rate
        self.log.write(record)
        self.progress("step", **record, total=self.total)
        return True

    def accumulate_gradients(self) -> float:
        """Forward and backward over this step's micro-batches; the global batch's mean loss (the
        same on every rank)."""
        cfg, ranks = self.cfg, self.ranks
        loss_value = 0.0
        micro = [ranks.batch(self.task, self.state.step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
        sizes = ranks.global_sizes([n for _x, _y, n in micro])
        for k, (x, y, n) in enumerate(micro):
            x, y = x.to(self.device), y.to(self.device)
            weight = ranks.loss_weight(n, sizes[k])  # 1.0 in one process
            with ranks.sync_gradients(self.train_model, k == cfg.grad_accum - 1):
                with hardware.autocast(self.device, self.precision):
                    loss = self.loss_fn(self.train_model, x, y)
                ((loss * weight if weight != 1.0 else loss) / cfg.grad_accum).backward()
            loss_value += loss.item() * (n / sizes[k]) / cfg.grad_accum
            self.throughput.add(sizes[k] * self.tokens_per_sample)
        return ranks.sum(loss_value)

    def skip_nonfinite(self, what: str) -> None:
        """Skip this step's batch while --skip-nonfinite allows it; otherwise stop the run."""
        cfg, state = self.cfg, self.state
        if state.skipped < cfg.skip_nonfinite:
            state.skipped += 1
            self.log.write({"step": state.step, "event": "skipped_nonfinite", "what": what})
            state.step += 1
            return
        # A failed --overwrite run's staging directory is removed, and its checkpoints with it.
        last_good = latest_checkpoint(self.run_dir) if self.run_dir == Path(cfg.out) else None
        raise NonFiniteLoss(
            f"step {state.step}: the {what} is not finite; training stopped"
            + (f" (last good checkpoint: {last_good})" if last_good else "")
            + "; lower --lr, keep --grad-clip on, or pass --skip-nonfinite N to skip bad batches"
        )

    def maybe_evaluate(self) -> None:
        """Every --eval-every steps and at the last: evaluate, keep the best artifact, count
        evaluations without improvement for --patience."""
        state = self.state
        if state.step % self.eval_every == 0 or state.step == self.total:
            self.evaluate_and_select()

    def evaluate_and_select(self) -> None:
        """Evaluate now, keep the best artifact, count evaluations without improvement for --patience."""
        cfg, state = self.cfg, self.state
        metrics = self.evaluate()
        state.last_metrics = {"step": state.step, **{f"val_{k}": v for k, v in metrics.items()}}
        self.log.write({"step": state.step, "event": "eval", **state.last_metrics})
        value = metrics[self.task.metric]
        if _is_better(self.task, value, state.best, cfg.min_delta):
            state.best, state.best_step, state.bad_evals, state.best_metrics = value, state.step, 0, state.last_metrics
            self.save_artifact("best", state.best_metrics)
        else:
            state.bad_evals += 1
        self.progress("eval", **state.last_metrics, best=state.best, best_step=state.best_step)
        if cfg.patience and state.bad_evals >= cfg.patience:
            state.stopped_early = True

    def check_deadline(self) -> None:
        """Past the ``training_deadline`` (if any), stop after this step; rank 0's clock decides for all."""
        if self.deadline is None or self.state.step >= self.total:
            return
        if self.ranks.on_main(lambda: time.monotonic() >= self.deadline.at):
            self.state.out_of_time = self.deadline.reached = True

    def maybe_checkpoint(self) -> None:
        """Every --checkpoint-every steps, at the last and when stopping early or at the deadline
        (what --resume starts from)."""
        state = self.state
        if not (state.step % self.checkpoint_every == 0 or state.step == self.total or state.stopped_early
                or state.out_of_time):
            return
        # Under FSDP every rank takes part in gathering the full model and optimizer state.
        full_model, full_optimizer = self.ranks.full_model(self.model), self.ranks.full_optimizer(self.model, self.optimizer)
        if self.ranks.is_main:
            save_checkpoint(self.run_dir, state.step, full_model, full_optimizer,
                            state.saved(self.task.epoch_of(state.step * self.cfg.grad_accum)), self.job.aux,
                            self.cfg.keep_checkpoints)

    def finish(self, started: float) -> TrainResult:
        """Evaluate the final weights unless the last step just did, write best/ (if no evaluation
        improved) and last/, and move a staged run into place."""
        state, ranks = self.state, self.ranks
        if not state.last_metrics or state.last_metrics.get("step") != state.step:
            state.last_metrics = {"step": state.step, **{f"val_{k}": v for k, v in self.evaluate().items()}}
        if ranks.on_main(lambda: not (self.run_dir / "best").exists()):
            state.best_metrics = state.last_metrics
            self.save_artifact("best", state.best_metrics)
        self.save_artifact("last", state.last_metrics)
        run_dir = Path(ranks.on_main(lambda: str(_finish_run_dir(self.job, self.run_dir))))
        result = TrainResult(
            run_dir=run_dir, best_dir=run_dir / "best", last_dir=run_dir / "last", steps=state.step,
            best_step=state.best_step, best_metrics=state.best_metrics, last_metrics=state.last_metrics,
            stopped_early=state.stopped_early, resumed_from=state.resumed_from, seconds=time.perf_counter() - started,
            runtime=self.runtime, is_main=ranks.is_main,
        )
        self.progress("done", result=result)
        return result

    # --- helpers of the steps

    def evaluate(self) -> dict:
        def run() -> dict:
            self.model.eval()
            metrics = self.task.evaluate(torch_predict(self.model, self.device), "val")
            self.model.train()
            return metrics

        return self.ranks.evaluate(run)

    def save_artifact(self, name: str, metrics: dict) -> None:
        full = self.ranks.full_model(self.model)  # under FSDP every rank takes part in gathering the weights
        if self.ranks.is_main:
            _save_artifact(self.job, self.run_dir / name, metrics, self.runtime, full)


def train(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    return run_job(prepare_training(cfg), progress)
