"""A user's model that structured pruning shrank, rebuilt at its pruned shapes without pickle.

``engine/compress/prune/user_graph.py`` writes the record (``structure_record``): for each module
whose tensors or plain attributes pruning changed, the new shapes and values, as JSON in
config.json's model section under ``PRUNED_KEY``. Reading it back belongs here, with the models,
because ``build_model`` needs it to rebuild such a model from its config alone.
"""

from __future__ import annotations

from ..errors import UserError

PRUNED_KEY = "pruned"  # config.json model key holding the record


def restore_pruned_shapes(model, record: dict) -> None:
    """Make a freshly built user model take the shapes in ``record`` (weights are loaded after)."""
    import torch

    for name, entry in record.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(
                f"config.json records pruned layer {name!r} but the model file has no such layer; "
                "the artifact's model.py and config.json do not belong together"
            ) from None
        for key, value in entry.get("attrs", {}).items():
            current = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
        for key, shape in entry.get("shapes", {}).items():
            old = getattr(module, key)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            setattr(module, key, torch.nn.Parameter(new, requires_grad=old.requires_grad)
                    if isinstance(old, torch.nn.Parameter) else new)
