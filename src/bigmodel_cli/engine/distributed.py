"""Data-parallel (DDP) and sharded (FSDP2) training over torch.distributed, and the launcher behind
``bigmodel train --nproc N``.

Inside a worker, ``run_job`` asks a ``Ranks`` object everything that depends on the other
processes: which slice of the global micro-batch is this rank's, how to weight its loss, how to wrap
the model, how to gather a full copy for rank 0 to write. With one process every method is a
pass-through, so single-process training is exactly what it was.

Why the loss weighting: each rank takes a strided slice of the same global micro-batch
(``task.batch(step, rank, world)``) and DDP/FSDP *average* gradients over ranks. Averaging per-rank
means is the global mean only when every slice has the same size; at an epoch's ragged end, or with
a batch size that the world size does not divide, it is not. Scaling each rank's mean loss by
``n_rank * world / n_global`` makes the averaged gradient exactly the gradient of the global batch
mean, so N processes train like one process with the same ``--batch-size`` (see
docs/distributed.md for the arithmetic and the measured agreement).

Outside the workers, ``launch`` checks everything it can in the calling process (options, data,
model, output, the resume point) so that a mistake costs nothing, then starts the workers with
torch's elastic launcher (the machinery of ``torchrun --standalone``) and turns a failed rank into
one line and an exit code.

Checkpoints and artifacts are always full (unsharded) and in the single-process format, so a run
can resume with a different number of processes, and every other command reads the artifacts.
Several machines need ``--out`` on a filesystem that every node sees, as rank 0 writes and every
rank reads the checkpoint it resumes from.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BigModelError, UserError, WorkFailed

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


def _device_capacity(device: str) -> tuple[int, str]:
    """How many worker processes this machine can host for ``device``, and what limits it."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count(), "CUDA devices"
    return available_cores(), "CPU cores"


def check_options(nproc: int | None, strategy: str | None, device: str) -> None:
    """Check --nproc and --strategy before any work (nothing is loaded or written yet)."""
    from . import hardware

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
            capacity, what = _device_capacity(hardware.resolve_device(device))
            if nproc > capacity:
                problems.append(f"--nproc {nproc} is more than the {capacity} {what} on this machine; "
                                f"use --nproc {max(capacity, 1)} or fewer (one process per {what[:-1]})")
    if problems:
        from ..errors import ConfigErrors

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


def _check_job(job, strategy: str) -> None:
    if job.stage != "train":
        raise UserError(f"distributed training runs `bigmodel train` only; run `bigmodel {job.stage}` in one "
                        "process (without torchrun or --nproc)")
    if strategy == "fsdp" and job.aux is not None:
        raise UserError("--strategy fsdp does not shard auxiliary trainable modules; use --strategy ddp")
    check_shardable(job.model, strategy)


# --------------------------------------------------------------------------- inside a worker


class _StateView:
    """Stands in for a module or optimizer where only ``state_dict()`` is needed (saving)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


@dataclass
class Ranks:
    """This process's place among the workers. The defaults describe a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    strategy: str | None = None  # None: one process, nothing to coordinate
    device: str = "cpu"
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy is not None

    @property
    def shards(self) -> bool:
        return self.strategy == "fsdp"

    def describe(self) -> dict:
        """What run_job records in the manifest's runtime (nothing for a single process)."""
        return {"world_size": self.world, "strategy": self.strategy} if self.distributed else {}

    def threads(self, requested: int | None) -> int | None:
        """Threads per rank: without --threads or OMP_NUM_THREADS, split the cores between local ranks."""
        if requested is not None or not self.distributed or self.device == "cuda" or "OMP_NUM_THREADS" in os.environ:
            return requested
        return max(1, available_cores() // self.local_world)

    # -- the model and the optimizer

    def wrap(self, model, optimizer, make_optimizer: Callable[[list], Any]):
        """The module to run training forward passes through, and the optimizer to step.

        DDP wraps the model and keeps the optimizer. FSDP shards the model in place, so the
        optimizer is rebuilt over the sharded parameters and given the (full) state the plain one
        was loaded with from a checkpoint.
        """
        if not self.distributed:
            return model, optimizer
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if self.device == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids), optimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        full_state = optimizer.state_dict()
        mesh = init_device_mesh(self.device, (self.world,))
        # One FSDP unit per block (its parameters are gathered just before it runs and freed after),
        # plus the root for what is left (embeddings, head, norms).
        for block in _shard_units(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = make_optimizer([p for p in model.parameters() if p.requires_grad])
        if full_state["state"]:
            set_optimizer_state_dict(model, sharded, _optimizer_by_name(full_state, sharded, model),
                                     options=StateDictOptions(full_state_dict=True))
        return model, sharded

    def full_model(self, model):
        """A complete copy of the weights for rank 0 to save (a collective under FSDP; None elsewhere)."""
        if not self.shards:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # Gathering copies tied parameters (GPT's embedding and head) separately: tie them again, so
        # the artifact stores them once, exactly as a single-process run would.
        for name, first in _tied_names(model).items():
            if name in state and first in state:
                state[name] = state[first]
        return _StateView(state)

    def full_optimizer(self, model, optimizer):
        """The optimizer's full state in the single-process layout (a collective under FSDP)."""
        if not self.shards:
            return optimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _StateView(_optimizer_by_index(state)) if self.is_main else None

    # -- the step

    def batch(self, task, micro_step: int):
        """This rank's slice of the global micro-batch, and how many real samples it holds.

        At an epoch's ragged end a slice can be empty (fewer samples than ranks); the rank then
        computes on one stand-in sample with weight 0, so it still joins the gradient all-reduce.
        """
        if not self.distributed:
            x, y = task.batch(micro_step)
            return x, y, len(y)
        x, y = task.batch(micro_step, self.rank, self.world)
        if len(y):
            return x, y, len(y)
        x, y = task.batch(micro_step, 0, self.world)
        return x[:1], y[:1], 0

    def global_sizes(self, counts: list[int]) -> list[int]:
        """Samples in each global micro-batch of this step (one all-reduce for the whole step)."""
        if not self.distributed:
            return counts
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(counts, dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(tensor)
        return [int(v) for v in tensor.tolist()]

    def loss_weight(self, count: int, global_count: int) -> float:
        """Scale a rank's mean loss so the averaged gradient is that of the global micro-batch mean."""
        if not self.distributed:
            return 1.0
        return count * self.world / global_count

    def sync_gradients(self, module, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if self.strategy == "ddp" and not sync:
            return module.no_sync()
        if self.strategy == "fsdp":
            module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    @staticmethod
    def scalar(value) -> float:
        """A float from a tensor that FSDP may hand back as a (replicated) DTensor."""
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        return float(value)

    # -- coordination

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; every rank gets its (JSON) result, or raises its error."""
        if not self.distributed:
            return fn()
        payload, error = None, None
        if self.is_main:
            try:
                payload = {"ok": fn()}
            except BigModelError as exc:
                error = exc
                payload = {"error": str(exc), "exit_code": exc.exit_code}
        payload = self._broadcast_json(payload)
        if error is not None:
            raise error
        if "error" in payload:
            raise (UserError if payload["exit_code"] == 2 else WorkFailed)(payload["error"])
        return payload["ok"]

    def evaluate(self, fn: Callable[[], dict]) -> dict:
        """Validation metrics, identical on every rank. Rank 0 evaluates its replica; a sharded
        model needs every rank in its forward pass, and rank 0's numbers are then shared."""
        if not self.shards:
            return self.on_main(fn)
        metrics = fn()
        return self._broadcast_json(metrics if self.is_main else None)

    def close(self, ok: bool) -> None:
        if not self.owns_group:
            return
        import torch.distributed as dist

        if ok:
            dist.barrier()  # return only when rank 0 has written the last artifact
        dist.destroy_process_group()
        self.owns_group = False

    @property
    def _comm_device(self) -> str:
        return "cuda" if self.device == "cuda" else "cpu"  # NCCL moves CUDA tensors only

    def _broadcast_json(self, value: Any) -> Any:
        """Rank 0's value on every rank, as JSON bytes (no pickle between processes either)."""
        import torch
        import torch.distributed as dist

        data = json.dumps(value).encode("utf-8") if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._comm_device)
        dist.broadcast(size, 0)
        if self.is_main:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._comm_device)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=self._comm_device)
        dist.broadcast(buffer, 0)
        return json.loads(buffer.cpu().numpy().tobytes().decode("utf-8"))


def join(job, device: str) -> Ranks:
    """The Ranks for this process: a single process, or a torchrun worker joining the group."""
    strategy = job.strategy
    if strategy is not None and strategy not in STRATEGIES:
        raise UserError(f"unknown --strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not under_torchrun():
        check_shardable(job.model, strategy)  # one process: nothing to shard, but say so now, not on 8 nodes
        return Ranks()
    strategy = strategy or "ddp"
    _check_job(job, strategy)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    capacity, what = _device_capacity(device)
    if local_world > capacity:
        raise UserError(f"{local_world} processes on this machine but only {capacity} {what}; "
                        f"start at most {capacity} per node (torchrun --nproc-per-node)")
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        try:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        except dist.DistError as exc:
            raise WorkFailed(f"rank {rank} could not join the other ranks at {os.environ['MASTER_ADDR']}:"
                             f"{os.environ['MASTER_PORT']} ({_first_line(exc)}); check the rendezvous endpoint") from None
    return Ranks(rank, world, local_rank, local_world, strategy, device, owns)


def lost_contact(exc: BaseException, ranks: Ranks) -> BaseException:
    """A collective failing because another rank died becomes one clear line (exit 1)."""
    if not ranks.distributed or isinstance(exc, BigModelError):
        return exc
    import torch.distributed as dist

    # gloo reports a vanished peer as a plain RuntimeError naming its transport; NCCL as DistError.
    transport = isinstance(exc, RuntimeError) and any(w in str(exc) for w in ("gloo", "NCCL", "Connection", "peer"))
    if isinstance(exc, dist.DistError) or transport:
        return WorkFailed(f"rank {ranks.rank} lost contact with the other ranks ({_first_line(exc)}); "
                          "another rank probably failed — see its error")
    return exc


def _shard_units(model) -> list:
    """Blocks to shard one by one: the elements of the model's ModuleLists (transformer blocks)."""
    from torch import nn

    units = []
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList):
            units += [m for m in module if any(p.requires_grad for p in m.parameters())]
    return units


def _tied_names(model) -> dict[str, str]:
    """{second name: first name} for parameters registered under two names."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _optimizer_by_index(state: dict) -> dict:
    """Name-keyed full optimizer state (torch.distributed.checkpoint) → the index-keyed layout of
    ``optimizer.state_dict()``, which numbers parameters in param-group order."""
    index, groups = 0, []
    by_index = {}
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            if name in state["state"]:
                by_index[index] = state["state"][name]
            ids.append(index)
            index += 1
        groups.append({**group, "params": ids})
    return {"state": by_index, "param_groups": groups}


def _optimizer_by_name(state: dict, optimizer, model) -> dict:
    """The inverse: index-keyed state (from a checkpoint) → names, for set_optimizer_state_dict."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = []
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        groups.append({**saved, "params": [order[i] for i in saved["params"]]})
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def _first_line(exc: BaseException) -> str:
    import re

    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo's "[/path/pair.cc:537]" source location
    line = line.split(". ")[0]  # its first sentence says what happened; the rest is general advice
    return line.replace("[", "(").replace("]", ")")  # not console markup


# --------------------------------------------------------------------------- the launcher


def launch(job, nproc: int, argv: list[str]) -> None:
    """Run ``bigmodel train ARGV`` in ``nproc`` workers on this machine, like
    ``torchrun --standalone --nproc-per-node N -m bigmodel_cli train ARGV``.

    Everything that can be checked is checked here first, in this process. Rank 0 inherits this
    terminal (progress bar and results); the other ranks' output goes to log files that are read
    back only when one of them fails.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from . import hardware

    strategy = job.strategy or "ddp"
    check_options(nproc, strategy, job.cfg.device)
    _check_job(job, strategy)
    if job.cfg.resume:
        from .train import check_resume

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
        elastic_launch(config, sys.executable)("-m", "bigmodel_cli", "train", *argv)
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
    """A rank stopped mid-write leaves a hidden staging directory (never loadable); remove it."""
    for parent in (out, out / "checkpoints"):
        for pattern in (".*.tmp-*", ".*.old-*"):
            for path in parent.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)


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


def _failure(exc, logs: Path, out: Path) -> BigModelError:
    from .checkpoint import latest_checkpoint

    failures = exc.failures
    # The root cause: not a rank that the agent itself stopped with SIGTERM after the first failure,
    # and among the others a rank killed by a signal before one that exited with an error.
    rank = min(failures, key=lambda r: (failures[r].exitcode == -signal.SIGTERM, failures[r].exitcode >= 0,
                                        failures[r].timestamp, r))
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
