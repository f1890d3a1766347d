"""Model weights to and from safetensors, with tied weights handled.

safetensors refuses two names for one storage (GPT's embedding and output head are tied), so the
second name is dropped on save and restored by the model's own tying on load.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError


def _deduplicated_state(model) -> tuple[dict, dict]:
    """state_dict with each storage once; returns (tensors, {dropped_name: kept_name})."""
    tensors, seen, tied = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, tied


def save_model_weights(model, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors, tied = _deduplicated_state(model)
    meta = {"format": "pt", **(metadata or {})}
    if tied:
        meta["tied"] = ",".join(f"{a}={b}" for a, b in tied.items())
    save_file(tensors, str(path), metadata=meta)


def load_into(model, state: dict, source: Path | str = "weights") -> None:
    """Load ``state`` into ``model`` strictly, except for names the model ties to a loaded one."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(
            f"{source}: has tensors the model in config.json does not ({', '.join(unexpected[:3])}); "
            "config.json and the weights do not belong together"
        )
    loaded_ptrs = {expected[name].untyped_storage().data_ptr() for name in state}
    missing = [
        name for name in expected
        if name not in state and expected[name].untyped_storage().data_ptr() not in loaded_ptrs
    ]
    if missing:
        raise UserError(f"{source}: is missing tensors ({', '.join(missing[:3])}); re-create the artifact")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} but the model in config.json "
                f"expects {tuple(expected[name].shape)}; config.json and the weights do not belong together"
            )
    model.load_state_dict(state, strict=False)


# --- weight-only int8 / int4 (bigmodel quantize --weight-only), decoded on load ------------------
# The stored layout is described in engine/compress/quantize/weight_only.py, which encodes it.

BITS = (8, 4)
SCALE_SUFFIX = ".scale"


def dequantize_tensor(stored, scale, shape: list[int], bits: int):
    """The float32 weight back from its integers and scales."""
    import torch

    if bits == 8:
        flat = stored.reshape(shape[0], -1).float() * scale.float()[:, None]
        return flat.reshape(shape)
    low, high = (stored & 0x0F).to(torch.int16), (stored >> 4).to(torch.int16)
    q = torch.stack([low, high], dim=2).reshape(stored.shape[0], -1) - 8
    groups = scale.shape[1]
    w = (q.reshape(stored.shape[0], groups, -1).float() * scale.float()[..., None]).reshape(stored.shape[0], -1)
    columns = math.prod(shape[1:])
    return w[:, :columns].reshape(shape).contiguous()


def dequantize_state(state: dict, section: dict, source: str = "weights") -> dict:
    """Undo ``quantize_state`` for the tensors the ``quantization`` section of config.json lists."""
    bits = section.get("bits")
    shapes = section.get("tensors") or {}
    if bits not in BITS or not isinstance(shapes, dict):
        raise UserError(f"{source}: config.json's quantization section is not readable (bits {bits!r}); re-create the artifact")
    out = dict(state)
    for name, shape in shapes.items():
        if name not in out or name + SCALE_SUFFIX not in out:
            raise UserError(f"{source}: quantized tensor {name} or its scale is missing; re-create the artifact")
        out[name] = dequantize_tensor(out[name], out.pop(name + SCALE_SUFFIX), list(shape), bits)
    return out
