"""Structured pruning of users' own models with Torch-Pruning's dependency graph.

We cannot know how an arbitrary ``nn.Module`` couples its layers (residual adds, concatenations,
flattens), so we let Torch-Pruning trace it: its ``DependencyGraph`` finds every group of slices
that must be removed together, and its importance criteria and iterative pruner do the rest. It is
the field's maintained library for exactly this (Fang et al., CVPR 2023), and writing our own tracer
would be a worse copy of it.

Reloading without pickle: Torch-Pruning's own save format pickles modules, so we do not use it.
Instead ``structure_record`` compares the pruned model with a freshly built one and writes, as JSON
in config.json's model section, the shapes of the tensors and the plain attributes (in_features,
out_channels, num_features, …) that changed. ``restore_pruned_shapes`` — called by
``models.build_model`` — rebuilds the user's module, reapplies those attributes and resizes those
tensors, and the weights then load from safetensors as usual.
"""

from __future__ import annotations

import itertools

from bigmodel_cli.errors import UserError
from .plan import split_ignored
from .structured import accumulate_gradients


def _layers(model):
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def _width(module) -> int:
    return getattr(module, "out_features", None) or getattr(module, "out_channels")


def output_layers(model, example) -> list[str]:
    """The last Linear/Conv layer to run: its width is the number of classes (or the vocabulary)
    and must not change, whatever the user's forward() does after it."""
    import torch

    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_a, name=name: order.append(name)) for name, m in _layers(model)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


class GraphPruner:
    """Torch-Pruning's pruner, set up once for the whole schedule (it remembers each layer's
    original width, so the cubic targets are fractions of those)."""

    def __init__(self, model, example, *, sparsity: float, steps: int, criterion: str, round_to: int,
                 ignore: list[str], schedule):
        import torch
        import torch_pruning as tp

        self.model, self.example, self.criterion = model, example, criterion
        names = [name for name, _ in _layers(model)]
        if not names:
            raise UserError("the model has no Linear or Conv layers for structured pruning to shrink")
        _pruned, kept = split_ignored(names, ignore)
        self.protected = sorted(set(kept) | set(output_layers(model, example)))
        if criterion == "taylor":
            imp = tp.importance.GroupTaylorImportance()
        else:
            imp = tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2)
        self.before = {name: _width(m) for name, m in _layers(model)}
        with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
            self.pruner = tp.pruner.BasePruner(
                model, example, importance=imp, pruning_ratio=sparsity, iterative_steps=steps,
                iterative_pruning_ratio_scheduler=schedule, round_to=round_to if round_to > 1 else None,
                ignored_layers=[model.get_submodule(n) for n in self.protected],
            )

    def step(self, task, calibration_batches: int) -> list[dict]:
        import torch

        self.model.cpu()
        with torch.no_grad():
            expected = tuple(self.model(self.example).shape)
        widths = {name: _width(m) for name, m in _layers(self.model)}
        if self.criterion == "taylor":
            accumulate_gradients(self.model, task, calibration_batches)
        self.pruner.step()
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            got = tuple(self.model(self.example).shape)
        if got != expected:
            raise UserError(
                f"pruning changed the model's output shape {expected} → {got}; pass --ignore for the layers "
                f"that produce the output (ignored now: {', '.join(self.protected)})"
            )
        return [{"layer": name, "kind": "channels" if hasattr(m, "out_channels") else "units",
                 "original": self.before[name], "before": widths[name], "after": _width(m)}
                for name, m in _layers(self.model)]


# --------------------------------------------------------------------------- reload without pickle


def _plain(value) -> bool:
    scalar = (bool, int, float, str, type(None))
    if isinstance(value, scalar):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, scalar) for v in value)


def structure_record(fresh, pruned) -> dict:
    """{module name: {"shapes": {tensor: shape}, "attrs": {attr: value}}} for what pruning changed."""
    fresh_modules = dict(fresh.named_modules())
    record = {}
    for name, module in pruned.named_modules():
        base = fresh_modules.get(name)
        if base is None:
            continue
        tensors = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        shapes = {key: list(t.shape) for key, t in tensors
                  if t is not None and getattr(base, key, None) is not None and tuple(t.shape) != tuple(getattr(base, key).shape)}
        attrs = {key: list(v) if isinstance(v, tuple) else v for key, v in vars(module).items()
                 if not key.startswith("_") and key != "training" and _plain(v) and vars(base).get(key) != v}
        entry = {k: v for k, v in (("shapes", shapes), ("attrs", attrs)) if v}
        if entry:
            record[name] = entry
    return record
