"""Unstructured pruning: L1 magnitude (global or per layer) and N:M semi-structured patterns.

Masks are computed by ``torch.nn.utils.prune`` (the standard implementation; N:M plugs into it as
a ``BasePruningMethod``) and then made permanent with ``prune.remove``: the zeros are in the weights
themselves, and the state dict has no ``weight_orig``/``weight_mask``. During fine-tuning the
masks are kept by a gradient hook instead of the reparametrisation, so the trainer saves plain
weights; a zero weight whose gradient is always zero stays exactly zero under SGD, Adam and AdamW
(a fresh optimizer's moments for it stay zero, and weight decay of zero is zero).
"""

from __future__ import annotations

from collections import Counter

from bigmodel_cli.errors import UserError

SCOPES = ("layer", "global")


def prunable_layers(model) -> list[tuple[str, object]]:
    """Linear and convolution layers, by module name, whose weight belongs to them alone.

    A weight shared with another module (GPT's output head is the token embedding) is left out:
    zeroing it would silently prune the embedding too.
    """
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, kinds) and owners[id(module.weight)] == 1]


def _nm_method():
    from torch.nn.utils import prune

    class NMPruning(prune.BasePruningMethod):
        """Keep the N largest-magnitude weights in every M consecutive weights along the input
        dimension (input channels for convolutions), the layout sparse tensor cores accelerate."""

        PRUNING_TYPE = "unstructured"

        def __init__(self, n: int, m: int):
            self.n, self.m = n, m

        def compute_mask(self, t, default_mask):
            import torch

            moved = t.abs().movedim(1, -1)  # input dimension last; a no-op for Linear
            groups = moved.reshape(-1, self.m)
            keep = groups.topk(self.n, dim=1).indices
            mask = torch.zeros_like(groups).scatter_(1, keep, 1.0)
            return mask.reshape(moved.shape).movedim(-1, 1).to(default_mask.dtype) * default_mask

    return NMPruning


def check_nm(layers: list[tuple[str, object]], m: int) -> None:
    for name, module in layers:
        inputs = module.weight.shape[1]
        if inputs % m:
            raise UserError(
                f"--pattern N:{m}: layer {name} has {inputs} inputs, not a multiple of {m}; "
                f"pass --ignore '{name}' to leave it dense, or choose another M"
            )


def prune_unstructured(layers: list[tuple[str, object]], sparsity: float, scope: str = "layer",
                       pattern: tuple[int, int] | None = None) -> dict:
    """Zero weights in place; returns {layer name: boolean keep-mask} for fine-tuning.

    ``sparsity`` is the fraction of the selected layers' weights that is zero afterwards (weights
    that are already zero count, so calling this again with a higher target continues a schedule).
    """
    from torch.nn.utils import prune

    if not layers:
        return {}
    if pattern is not None:
        method = _nm_method()
        for _, module in layers:
            method.apply(module, "weight", n=pattern[0], m=pattern[1])
    elif scope == "global":
        # One threshold for all layers: layers with many small weights give up more of them.
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for _, module in layers:
            prune.l1_unstructured(module, "weight", amount=sparsity)
    masks = {}
    for name, module in layers:
        masks[name] = module.weight_mask.detach().bool().clone()
        prune.remove(module, "weight")  # permanent: weight = weight_orig * mask, no reparametrisation left
    return masks


def hold_masks(model, masks: dict) -> list:
    """Keep pruned weights at zero while the trainer fine-tunes (gradient hooks; remove the returned
    handles afterwards)."""
    handles = []
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight

        def hook(grad, mask=mask):
            return grad * mask.to(device=grad.device, dtype=grad.dtype)

        handles.append(weight.register_hook(hook))
    return handles


def layer_sparsity(layers: list[tuple[str, object]]) -> list[dict]:
    rows = []
    for name, module in layers:
        weight = module.weight.detach()
        zeros = int((weight == 0).sum())
        rows.append({"layer": name, "shape": list(weight.shape), "params": weight.numel(),
                     "zeros": zeros, "sparsity": zeros / weight.numel()})
    return rows
