"""Model weights to and from safetensors, with tied weights handled.

safetensors refuses two names for one storage (GPT's embedding and output head are tied), so the
second name is dropped on save and restored by the model's own tying on load.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError

# A weight-only quantized tensor NAME keeps its scales in NAME + this (engine/compress/quantize/weight_only.py);
# here, in the storage layer, because reading an artifact's weight shapes needs it too.
SCALE_SUFFIX = ".scale"


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


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a safetensors file, from its header alone (no tensor is
    read; safetensors caps the header's size and checks its offsets against the file's)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read weights ({exc}); re-create the artifact") from None


def check_fits_weights(spec: dict, shapes: dict[str, tuple[int, ...]], source: Path | str, base_dir: Path | None = None) -> None:
    """Refuse (one line) a model spec that does not match the weights' shapes, before the model is
    built: a config.json that asks for a 20M-wide layer or 100,000 layers next to small weights
    would otherwise allocate gigabytes first. Built-in models are sized by formula, then built on
    the meta device (no memory) and compared tensor by tensor."""
    import math

    import torch

    from .models import USER_ARCH, build_model, parameter_count, validate_spec

    stored = sum(math.prod(shape) for shape in shapes.values())
    if spec.get("arch") != USER_ARCH:
        validate_spec(spec)
        wanted = parameter_count(spec)
        if wanted > stored:
            raise UserError(f"{source}: holds {stored:,} weights but the model in config.json has {wanted:,} "
                            "parameters; config.json and the weights do not belong together")
    try:
        with torch.device("meta"):
            model = build_model(spec, base_dir=base_dir)
    except UserError:
        raise
    except Exception:  # user code that cannot run on the meta device: the real build checks the shapes
        if spec.get("arch") == USER_ARCH:
            return
        raise
    _compare_shapes(model, shapes, source)


def _compare_shapes(model, shapes: dict[str, tuple[int, ...]], source: Path | str) -> None:
    """Every tensor of the (meta) model present in ``shapes`` with the same shape, except tied
    names, which the model restores itself (meta tensors share no storage to compare, so ties are
    found by parameter identity)."""
    expected = model.state_dict()
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UserError(f"{source}: has tensors the model in config.json does not ({', '.join(unexpected[:3])}); "
                        "config.json and the weights do not belong together")
    missing = [name for name in expected if name in unique and name not in shapes]
    if missing:
        raise UserError(f"{source}: is missing tensors ({', '.join(missing[:3])}); re-create the artifact")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(shape)} but the model in config.json expects "
                f"{tuple(expected[name].shape)}; config.json and the weights do not belong together"
            )
