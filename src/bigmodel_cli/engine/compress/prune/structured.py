"""Structured pruning of the built-in architectures: remove whole units, so the model is smaller.

For mlp, cnn and gpt the coupling between layers is known, so it is written down here as data: a
``UnitGroup`` lists every tensor slice that belongs to one hidden unit, channel or attention head
(the producing layer's rows and bias, the consuming layer's columns). Pruning a unit removes all of
its slices together. The pruned model is then *rebuilt from its new config* and the kept slices are
copied in, so what is saved is by construction what ``config.json`` describes: it reloads from the
config alone, with no pickle and no code but the architecture's own.

Importance follows Torch-Pruning's definitions (used for users' models in ``user_graph``), so both
paths rank units the same way: group L1/L2 is the mean over the group's layers of Σ|w|^p over the
unit's weights; Taylor (Molchanov et al. 2019) is the mean of Σ|w · ∂L/∂w|, with gradients summed
over calibration batches. Biases do not vote (Torch-Pruning's default) but are pruned with their unit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from bigmodel_cli.errors import UserError
from .plan import kept_width, split_ignored

CRITERIA = ("l1", "l2", "taylor")
ARCHS = ("mlp", "cnn", "gpt", "llama")
HEAD_KINDS = ("heads", "kv groups")  # pruned by --head-sparsity, one whole unit at a time


@dataclass
class UnitGroup:
    name: str  # the layer whose outputs are the units; what --ignore matches
    kind: str  # "units", "channels" or "heads"
    size: int
    members: list  # (tensor name, dim, positions): positions[u] = indices of unit u along dim; None = u itself
    width_key: tuple  # where the width lives in the model spec: ("hidden_sizes", i), ("mlp_hidden",), ...
    linked: tuple = ()  # (spec key, multiple of the width): other widths that follow this one (llama's n_head)


def _linear_names(container, prefix: str) -> list[str]:
    from torch import nn

    return [f"{prefix}.{n}" for n, m in container.named_children() if isinstance(m, nn.Linear)]


def _dense_chain(names: list[str], widths: list[int], kind: str, key: str) -> list[UnitGroup]:
    """Hidden layers of a Linear stack: layer i's outputs are layer i+1's inputs."""
    return [
        UnitGroup(names[i], kind, width,
                  [(f"{names[i]}.weight", 0, None), (f"{names[i]}.bias", 0, None), (f"{names[i + 1]}.weight", 1, None)],
                  (key, i))
        for i, width in enumerate(widths)
    ]


def unit_groups(model, spec: dict) -> list[UnitGroup]:
    """Every prunable group of a built-in model, in forward order."""
    from torch import nn

    arch = spec["arch"]
    if arch == "mlp":
        return _dense_chain(_linear_names(model.net, "net"), spec["hidden_sizes"], "units", "hidden_sizes")
    if arch == "cnn":
        convs = [f"features.{n}" for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
        head = _linear_names(model.head, "head")
        channels = spec["channels"]
        # The last conv's channels reach the head through flatten(): channel c is columns c·hw … (c+1)·hw − 1.
        hw = model.get_submodule(head[0]).in_features // channels[-1]
        groups = []
        for i, width in enumerate(channels):
            if i + 1 < len(convs):
                consumer = (f"{convs[i + 1]}.weight", 1, None)
            else:
                consumer = (f"{head[0]}.weight", 1, [list(range(c * hw, (c + 1) * hw)) for c in range(width)])
            groups.append(UnitGroup(convs[i], "channels", width,
                                    [(f"{convs[i]}.weight", 0, None), (f"{convs[i]}.bias", 0, None), consumer],
                                    ("channels", i)))
        return groups + _dense_chain(head, spec["hidden_sizes"], "units", "hidden_sizes")
    if arch == "gpt":
        heads, dim = spec["n_head"], spec["head_dim"]
        inner = heads * dim
        qkv_rows = [[*range(h * dim, (h + 1) * dim), *range(inner + h * dim, inner + (h + 1) * dim),
                     *range(2 * inner + h * dim, 2 * inner + (h + 1) * dim)] for h in range(heads)]
        proj_cols = [list(range(h * dim, (h + 1) * dim)) for h in range(heads)]
        groups = []
        for layer in range(spec["n_layer"]):
            p = f"blocks.{layer}"
            groups.append(UnitGroup(f"{p}.mlp.fc", "units", spec["mlp_hidden"],
                                    [(f"{p}.mlp.fc.weight", 0, None), (f"{p}.mlp.fc.bias", 0, None),
                                     (f"{p}.mlp.proj.weight", 1, None)], ("mlp_hidden",)))
            groups.append(UnitGroup(f"{p}.attn.qkv", "heads", heads,
                                    [(f"{p}.attn.qkv.weight", 0, qkv_rows), (f"{p}.attn.qkv.bias", 0, qkv_rows),
                                     (f"{p}.attn.proj.weight", 1, proj_cols)], ("n_head",)))
        return groups
    if arch == "llama":
        return _llama_groups(spec)
    raise UserError(f"structured pruning knows mlp, cnn, gpt and llama; this artifact's model is {arch!r}")


def _llama_groups(spec: dict) -> list[UnitGroup]:
    """A llama's MLP units (gate and up rows, down columns) and its key/value groups.

    Attention is pruned one whole GQA group at a time: a key/value head together with the
    ``n_head // n_kv_head`` query heads that read it (their q rows, the kv head's k and v rows, the
    query heads' o_proj columns). Every group stays the same size, as ``repeat_interleave`` in the
    forward needs; the KV cache shrinks with the query heads; and plain multi-head attention
    (groups of one) is pruned head by head exactly as gpt is. Pruning query heads inside each group
    instead would leave the KV cache whole and could not prune an MHA model at all.
    """
    kv, dim = spec["n_kv_head"], spec["head_dim"]
    per_group = spec["n_head"] // kv
    q_rows = [list(range(g * per_group * dim, (g + 1) * per_group * dim)) for g in range(kv)]
    kv_rows = [list(range(g * dim, (g + 1) * dim)) for g in range(kv)]
    groups = []
    for layer in range(spec["n_layer"]):
        p = f"blocks.{layer}"
        groups.append(UnitGroup(f"{p}.mlp", "units", spec["mlp_hidden"],
                                [(f"{p}.mlp.gate_proj.weight", 0, None), (f"{p}.mlp.up_proj.weight", 0, None),
                                 (f"{p}.mlp.down_proj.weight", 1, None)], ("mlp_hidden",)))
        attention = [(f"{p}.attn.q_proj.{kind}", 0, q_rows) for kind in ("weight", "bias")]
        attention += [(f"{p}.attn.{proj}.{kind}", 0, kv_rows) for proj in ("k_proj", "v_proj") for kind in ("weight", "bias")]
        attention.append((f"{p}.attn.o_proj.weight", 1, q_rows))
        groups.append(UnitGroup(f"{p}.attn", "kv groups", kv, attention, ("n_kv_head",), (("n_head", per_group),)))
    return groups


def accumulate_gradients(model, task, batches: int, device: str = "cpu") -> None:
    """Sum the loss gradients of ``batches`` training batches into ``.grad`` (for Taylor importance)."""
    model.eval()  # no dropout: score the network that will be kept
    model.zero_grad(set_to_none=True)
    for i in range(batches):
        x, y = task.batch(i)
        task.loss(model(x.to(device)), y.to(device)).backward()


def importance(group: UnitGroup, state: dict, grads: dict, criterion: str):
    """One score per unit (higher = keep)."""
    import torch

    total, voters = torch.zeros(group.size, dtype=torch.float64), 0
    for name, dim, positions in group.members:
        if name not in state or name.endswith(".bias"):
            continue
        w = state[name].detach().double()
        if criterion == "taylor":
            grad = grads.get(name)
            if grad is None:
                raise UserError("--importance taylor needs gradients; none were computed (is --calibration-batches 0?)")
            values = (w * grad.double()).abs()
        else:
            values = w.abs().pow(1 if criterion == "l1" else 2)
        per_index = values.movedim(dim, 0).reshape(w.shape[dim], -1).sum(1)
        if positions is None:
            total += per_index
        else:
            total += torch.stack([per_index[pos].sum() for pos in positions])
        voters += 1
    return total / max(voters, 1)


def check_ignore(groups: list[UnitGroup], spec: dict, ignore: list[str]) -> list[str]:
    """The names of the groups to prune; refuses patterns that match nothing, and (gpt) keeping
    some blocks' width but not others', which one width per model cannot express."""
    pruned, _kept = split_ignored([g.name for g in groups], ignore, "layer")
    by_key: dict[tuple, list[UnitGroup]] = {}
    for group in groups:
        by_key.setdefault(group.width_key, []).append(group)
    for key, members in by_key.items():
        chosen = {g.name in pruned for g in members}
        if len(chosen) > 1:
            names = [g.name for g in members]
            raise UserError(
                f"{spec['arch']} has one {key[0]} for all blocks, but --ignore keeps some of "
                f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''} and not others; ignore all of them or none"
            )
    return pruned


def _set_width(spec: dict, key: tuple, width: int) -> None:
    if len(key) == 2:
        spec[key[0]][key[1]] = width
    else:
        spec[key[0]] = width


def prune_builtin(model, spec: dict, *, sparsity: float, head_sparsity: float, criterion: str,
                  round_to: int, ignore: list[str], original: dict[str, int], grads: dict | None = None):
    """Remove units; returns (new model, new spec, rows for the report).

    ``original`` maps group name → width before the first step, so a schedule's targets are
    fractions of the original width whatever the current one is.
    """
    import torch

    from bigmodel_cli.models import build_model

    groups = unit_groups(model, spec)
    pruned_names = check_ignore(groups, spec, ignore)
    state = model.state_dict()
    new_spec = copy.deepcopy(spec)
    selections: dict[str, list] = {}
    rows = []
    widths: dict[tuple, set] = {}
    linked: dict[tuple, tuple] = {}
    for group in groups:
        fraction = head_sparsity if group.kind in HEAD_KINDS else sparsity
        start = original.get(group.name, group.size)
        target = group.size
        if group.name in pruned_names and fraction > 0:
            target = min(group.size, kept_width(start, fraction, 1 if group.kind in HEAD_KINDS else round_to))
        rows.append({"layer": group.name, "kind": group.kind, "original": start, "before": group.size, "after": target})
        widths.setdefault(group.width_key, set()).add(target)
        linked[group.width_key] = group.linked
        if target == group.size:
            continue
        scores = importance(group, state, grads or {}, criterion)
        keep = torch.topk(scores, target).indices.sort().values
        for name, dim, positions in group.members:
            if name not in state:
                continue
            # Sorted, not unit by unit: a head's q, k and v rows sit in three separate blocks of
            # qkv, and the kept heads' rows must stay in that q…k…v layout.
            index = keep if positions is None else torch.tensor(sorted(i for u in keep.tolist() for i in positions[u]))
            selections.setdefault(name, []).append((dim, index))
    for key, values in widths.items():
        width = values.pop()
        _set_width(new_spec, key, width)
        for other, multiple in linked[key]:
            new_spec[other] = width * multiple
    new_state = {}
    for name, tensor in state.items():
        for dim, index in selections.get(name, []):
            tensor = tensor.index_select(dim, index)
        new_state[name] = tensor.clone()
    with torch.device("cpu"):
        new_model = build_model(new_spec)
    new_model.load_state_dict(new_state)  # strict: the rebuilt model must match slice for slice
    return new_model, new_spec, rows
