"""Checking and starting the workers of a distributed run: the launcher behind ``bigmodel train
--nproc N``.

``launch`` checks everything it can in the calling process (options, data, model, output, the
resume point) so that a mistake costs nothing, then starts the workers with torch's elastic
launcher (the machinery of ``torchrun --standalone``) and turns a failed rank into one line and an
exit code.

The checks it makes are here too: the environment (is this process a torchrun worker, how many
workers this machine can host), the options (``check_options``, before any work) and the job
(``check_job``: ``bigmodel train`` only, and a model that FSDP can shard). A worker repeats the job's
checks when it joins the others (engine/training/distributed.py), as torchrun may have started it directly.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

from ...errors import BigModelError, UserError, WorkFailed

STRATEGIES = ("ddp", "fsdp")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- environment and checks


def under_torchrun() -> bool:
    """True in a worker started by torchrun (or ``--nproc``), which sets these variables."""
    return all(k in os.environ for k in _TORCHRUN_ENV)


def env_rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ["RANK"]) if under_torchrun() else 0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup CPU sets, unlike cpu_count
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def device_capacity(device: str) -> tuple[int, str]:
    """How many worker processes this machine can host for ``device``, and what limits it."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count(), "CUDA devices"
    return available_cores(), "CPU cores"


def check_options(nproc: int | None, strategy: str | None, device: str) -> None:
    """Check --nproc and --strategy before any work (nothing is loaded or written yet)."""
    from ..core import hardware

    problems = []
    if strategy is not None and strategy not in STRATEGIES:
        problems.append(f"unknown --strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if nproc is not None:
        if nproc < 1:
            problems.append(f"--nproc must be at least 1, got {nproc}")
        elif under_torchrun():
            problems.append("--nproc starts its own workers, but this process is already a torchrun worker; "
                            "drop --nproc (torchrun's --nproc-per-node sets the number)")
        elif nproc > 1:
            capacity, what = device_capacity(hardware.resolve_device(device))
            if nproc > capacity:
                problems.append(f"--nproc {nproc} is more than the {capacity} {what} on this machine; "
                                f"use --nproc {max(capacity, 1)} or fewer (one process per {what[:-1]})")
    if problems:
        from ...errors import ConfigErrors

        raise ConfigErrors(problems, "distributed options")


def check_shardable(model, strategy: str | None) -> None:
    """FSDP splits every parameter along its first dimension: refuse models where it cannot."""
    if strategy != "fsdp":
        return
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise UserError("--strategy fsdp: the model has no trainable parameters to shard; use --strategy ddp")
    scalars = [name for name, p in trainable if p.dim() == 0]
    if scalars:
        listed = ", ".join(scalars[:3]) + (" …" if len(scalars) > 3 else "")
        raise UserError(
            f"--strategy fsdp cannot shard 0-d parameter(s) {listed} (FSDP splits each parameter along its first "
            "dimension); give them shape (1,) in the model, or use --strategy ddp"
        )
    odd = [name for name, p in trainable if not p.is_floating_point()]
    if odd:
        raise UserError(f"--strategy fsdp shards floating-point parameters only; {odd[0]} is not; use --strategy ddp")


def check_job(job, strategy: str) -> None:
    """What a distributed job must be: ``bigmodel train``, and shardable under FSDP."""
    if job.stage != "train":
        raise UserError(f"distributed training runs `bigmodel train` only; run `bigmodel {job.stage}` in one "
                        "process (without torchrun or --nproc)")
    if strategy == "fsdp" and job.aux is not None:
        raise UserError("--strategy fsdp does not shard auxiliary trainable modules; use --strategy ddp")
    check_shardable(job.model, strategy)


# --------------------------------------------------------------------------- the launcher


def launch(job, nproc: int, argv: list[str], command: list[str] | None = None) -> None:
    """Run ``bigmodel train ARGV`` in ``nproc`` workers on this machine, like
    ``torchrun --standalone --nproc-per-node N -m bigmodel_cli train ARGV``. ``command``: what comes
    before ARGV instead of ``train`` (``quantize --qat`` runs its fine-tuning as ``qat-worker SPEC``).

    Everything that can be checked is checked here first, in this process. Rank 0 inherits this
    terminal (progress bar and results); the other ranks' output goes to log files that are read
    back only when one of them fails.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from ..core import hardware

    strategy = job.strategy or "ddp"
    check_options(nproc, strategy, job.cfg.device)
    check_job(job, strategy)
    if job.cfg.resume:
        from .run_dir import check_resume

        check_resume(job)
    out = Path(job.cfg.out)
    logs = Path(tempfile.mkdtemp(prefix="bigmodel-ranks-"))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # what torchrun --standalone uses
        max_restarts=0,  # a failed rank is reported, not silently restarted
        logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects={r: Std.ALL for r in range(1, nproc)}),
    )
    env_before = os.environ.get("OMP_NUM_THREADS")
    if env_before is None and job.cfg.threads is None and hardware.resolve_device(job.cfg.device) == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(max(1, available_cores() // nproc))  # no oversubscription
    # The agent's own logging (each module sets its logger's level) repeats what our one line says.
    quiet = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "bigmodel_cli", *(command or ["train"]), *argv)
    except ChildFailedError as exc:
        _remove_staging(out)
        if all(f.exitcode in (130, -signal.SIGINT) for f in exc.failures.values()):
            raise SystemExit(130) from None  # Ctrl-C: rank 0 has already said "interrupted"
        raise _failure(exc, logs, out) from None
    except SignalException as exc:  # the agent got SIGINT/SIGTERM and stopped the ranks
        _remove_staging(out)
        raise SystemExit(128 + int(exc.sigval)) from None  # rank 0 has said "interrupted" (Ctrl-C)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        shutil.rmtree(logs, ignore_errors=True)


def _remove_staging(out: Path) -> None:
    """A rank stopped mid-write leaves a hidden staging directory or temporary file (never
    loadable); remove it."""
    for parent in (out, out / "checkpoints"):
        for pattern in (".*.tmp-*", ".*.old-*"):
            for path in parent.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:  # output_file.atomic_path's temporary (metrics log, run.json)
                    path.unlink(missing_ok=True)


def _rank_error(logs: Path, local_rank: int) -> str | None:
    """The last error line a redirected rank printed."""
    for path in glob.glob(str(logs / "**" / str(local_rank) / "stderr.log"), recursive=True):
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        if lines:
            return lines[-1]
    return None


def root_cause(failures: dict) -> int:
    """The rank whose failure most likely caused the others (``failures``: rank → a record with
    ``exitcode`` and ``timestamp``, as torch's elastic agent reports them).

    Most likely first: a rank killed from outside (SIGKILL from the OOM killer or a user, SIGSEGV),
    then one that exited with an error, then one that aborted (gloo aborts a rank whose peer
    vanished, so SIGABRT is usually a consequence), and last one that the agent itself stopped with
    SIGTERM after the first failure. The agent's timestamps have one-second resolution, so they only
    order failures that are seconds apart.
    """

    def consequence(exitcode: int) -> int:
        if exitcode == -signal.SIGTERM:
            return 3
        if exitcode == -signal.SIGABRT:
            return 2
        return 1 if exitcode >= 0 else 0

    return min(failures, key=lambda r: (consequence(failures[r].exitcode), failures[r].timestamp, r))


def _failure(exc, logs: Path, out: Path) -> BigModelError:
    from .checkpoint import latest_checkpoint

    failures = exc.failures
    rank = root_cause(failures)
    failure = failures[rank]
    if failure.exitcode < 0:
        try:
            how = f"died ({signal.Signals(-failure.exitcode).name})"
        except ValueError:
            how = f"died (signal {-failure.exitcode})"
    else:
        how = f"exited with code {failure.exitcode}"
    detail = _rank_error(logs, failure.local_rank) if failure.local_rank != 0 else None
    where = f": {detail}" if detail else (" (its error is above)" if failure.local_rank == 0 else "")
    if all(f.exitcode == 2 for f in failures.values()):
        return UserError(f"rank {rank} rejected the input{where}")
    checkpoint = latest_checkpoint(out) if out.is_dir() else None
    kept = (f"{out} keeps its last checkpoint ({checkpoint.name}); continue with --resume"
            if checkpoint else f"no checkpoint was written yet; {out} holds no artifact")
    return WorkFailed(f"rank {rank} {how}{where}; training stopped and nothing half-written was left: {kept}")

