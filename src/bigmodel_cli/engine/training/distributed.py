"""What runs inside a training worker: data-parallel (DDP) and sharded (FSDP2) training over
torch.distributed.

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

Checkpoints and artifacts are always full (unsharded) and in the single-process format, so a run
can resume with a different number of processes, and every other command reads the artifacts.
Several machines need ``--out`` on a filesystem that every node sees, as rank 0 writes and every
rank reads the checkpoint it resumes from.

Starting the workers (``bigmodel train --nproc N``) and the checks made before they start are in
engine/training/launcher.py; ``join`` makes the job's checks again, for workers that torchrun started itself.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from ...errors import BigModelError, UserError, WorkFailed, first_line
from .launcher import STRATEGIES, available_cores, check_job, check_shardable, device_capacity, under_torchrun


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
    check_job(job, strategy)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    capacity, what = device_capacity(device)
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
                             f"{os.environ['MASTER_PORT']} ({_collective_reason(exc)}); check the rendezvous endpoint") from None
    return Ranks(rank, world, local_rank, local_world, strategy, device, owns)


def lost_contact(exc: BaseException, ranks: Ranks) -> BaseException:
    """A collective failing because another rank died becomes one clear line (exit 1)."""
    if not ranks.distributed or isinstance(exc, BigModelError):
        return exc
    import torch.distributed as dist

    # gloo reports a vanished peer as a plain RuntimeError naming its transport; NCCL as DistError.
    transport = isinstance(exc, RuntimeError) and any(w in str(exc) for w in ("gloo", "NCCL", "Connection", "peer"))
    if isinstance(exc, dist.DistError) or transport:
        return WorkFailed(f"rank {ranks.rank} lost contact with the other ranks ({_collective_reason(exc)}); "
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


def _collective_reason(exc: BaseException) -> str:
    """errors.first_line, cut to what a collective's failure says happened."""
    import re

    line = first_line(exc, limit=10_000)
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo's "[/path/pair.cc:537]" source location
    line = line.split(". ")[0]  # its first sentence says what happened; the rest is general advice
    return line.replace("[", "(").replace("]", ")")  # not console markup
