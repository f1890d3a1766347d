"""Weight-only quantization on the PyTorch side: smaller checkpoints to distribute.

Every floating-point weight with two or more dimensions (Linear, Conv, Embedding) is stored as
symmetric integers with a scale per output channel (dimension 0):

- ``--bits 8``: ``NAME`` int8, same shape; ``NAME.scale`` float32, one per output channel
  (about 4× smaller than float32);
- ``--bits 4``: each output channel is cut into groups of ``group_size`` weights with one float16
  scale each (``NAME.scale``, shape (out, groups)); values in [-7, 7] are stored offset by 8, two
  per byte, low nibble first (``NAME``, uint8, shape (out, groups × group_size / 2); about 7–8×).

Vectors (biases, norms) stay float. config.json's ``quantization`` section lists the quantized
tensors with their float shapes, and ``Artifact.load_state_dict`` dequantizes them on load, so a
weight-only artifact rebuilds into an ordinary float32 torch model.
"""

from __future__ import annotations

import math

from bigmodel_cli.errors import UserError
# Decoding is storage's job (an artifact dequantizes on load); encoding is this command's.
from bigmodel_cli.weights import SCALE_SUFFIX, dequantize_tensor

DEFAULT_GROUP_SIZE = 64


def _quantizable(name: str, tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() >= 2 and not name.endswith(SCALE_SUFFIX)


def quantize_tensor(weight, bits: int, group_size: int):
    """float weight → (stored integer tensor, scale tensor)."""
    import torch

    w = weight.detach().float().reshape(weight.shape[0], -1)
    if bits == 8:
        scale = w.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return q.reshape(weight.shape), scale.to(torch.float32)
    columns = w.shape[1]
    padded = math.ceil(columns / group_size) * group_size
    if padded != columns:
        w = torch.nn.functional.pad(w, (0, padded - columns))
    groups = w.reshape(w.shape[0], -1, group_size)
    # The scale is stored as float16; the integers are computed against that rounded scale so
    # that dequantization reproduces exactly what was chosen here.
    scale = (groups.abs().amax(dim=2) / 7.0).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(groups / scale.float()[..., None]), -7, 7).to(torch.int16) + 8
    q = q.reshape(w.shape[0], padded).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale.contiguous()


def quantize_state(state: dict, bits: int, group_size: int, keep_float: list[str] | tuple = ()) -> tuple[dict, dict]:
    """A state dict → (tensors to save, {name: float shape} of those quantized)."""
    out, shapes = {}, {}
    for name, tensor in state.items():
        if _quantizable(name, tensor) and name not in keep_float:
            stored, scale = quantize_tensor(tensor, bits, group_size)
            out[name], out[name + SCALE_SUFFIX] = stored, scale
            shapes[name] = list(tensor.shape)
        else:
            out[name] = tensor
    return out, shapes


def tensor_errors(state: dict, bits: int, group_size: int) -> dict[str, float]:
    """SQNR (dB) of each quantizable tensor after a round trip, for the accuracy gate's ranking."""
    from .gate import sqnr_db

    errors = {}
    for name, tensor in state.items():
        if _quantizable(name, tensor):
            stored, scale = quantize_tensor(tensor, bits, group_size)
            back = dequantize_tensor(stored, scale, list(tensor.shape), bits)
            errors[name] = sqnr_db(tensor.float().numpy(), back.numpy())
    return errors


# --- the command's weight-only flow (command.py dispatches here) ------------------------------


def quantize_weights(source, out, options, overwrite: bool, tmp, say, options_record: dict) -> tuple[dict, dict, dict, dict]:
    """Quantize ``source``'s weights, measure before/after with PyTorch, apply the accuracy gate
    (worst tensors by SQNR kept in float), write the artifact. Returns (report, section, gate, manifest)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from bigmodel_cli import artifact as art
    from ...core import hardware
    from ...onnx.export import compare_outputs
    from ...core.tasks import torch_predict
    from . import gate as gating
    from .measure import Evaluator, build_report, manifest_metrics, model_bytes

    hardware.set_threads(options.threads)
    say("stage", name="load")
    state = source.load_state_dict()
    with safe_open(source.path / art.WEIGHTS_FILE, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})  # keeps the record of tied weights
    quantizable = sorted(n for n, t in state.items() if _quantizable(n, t))
    if not quantizable:
        raise UserError(f"{source.path}: has no weight matrices (2-D or more) to quantize")
    unknown = [n for n in options.exclude if n not in quantizable]
    if unknown:
        raise UserError(f"--exclude {', '.join(unknown)}: not a weight matrix of this model; its weight matrices are "
                        + ", ".join(quantizable)[:300])
    config_base = {k: v for k, v in source.config.items() if k != "onnx"}  # the output has no model.onnx
    weights = tmp / art.WEIGHTS_FILE
    say("stage", name="evaluate")
    evaluator = Evaluator(source, options.split, options.limit)
    reference = source.build_model()
    before = evaluator(torch_predict(reference))

    def build(keep_float: list[str]):
        say("stage", name="quantize")
        kept = list(options.exclude) + keep_float
        tensors, shapes = quantize_state(state, options.bits, options.group_size, keep_float=kept)
        save_file(tensors, str(weights), metadata=metadata)
        section = {"mode": "weight-only", "bits": options.bits, "scheme": "symmetric, per output channel",
                   "group_size": options.group_size if options.bits == 4 else None,
                   "scale_dtype": "float16" if options.bits == 4 else "float32",
                   "packing": "two 4-bit values per byte, low nibble first, offset by 8" if options.bits == 4 else None,
                   "excluded_tensors": kept, "tensors": shapes}
        # Loaded back through the real path: Artifact.load_state_dict's dequantization.
        model = art.Artifact(path=tmp, config={**config_base, "quantization": section}, manifest={}).build_model()
        return section, model

    section, model = build([])
    first = evaluator(torch_predict(model))
    last = {"metrics": first}

    def retry(keep_float: list[str]) -> dict:
        nonlocal section, model
        section, model = build(keep_float)
        last["metrics"] = evaluator(torch_predict(model))
        return last["metrics"]

    def rank() -> list[dict]:
        errors = tensor_errors({n: t for n, t in state.items() if n not in options.exclude}, options.bits, options.group_size)
        return [{"node": n, "op": "weight", "sqnr_db": round(e, 2), "tensor": n}
                for n, e in sorted(errors.items(), key=lambda kv: kv[1])]

    gate = gating.run_gate(task=source.task, limit=options.max_metric_drop, before=before, first=first, rank=rank,
                           retry=retry, max_retries=options.max_retries, progress=say)
    if not gate.passed:
        raise gating.failure(gate)
    error = compare_outputs(torch_predict(reference), torch_predict(model), _probe_inputs(evaluator))
    error.pop("shapes", None)
    report = build_report(source.task, {**before, "file_bytes": model_bytes(source.path / art.WEIGHTS_FILE)},
                          {**last["metrics"], "file_bytes": model_bytes(weights)}, None)
    report["output_error"] = section["output_error"] = error
    say("stage", name="write")
    with art.atomic_directory(out, overwrite) as staging:
        shutil.copyfile(weights, staging / art.WEIGHTS_FILE)
        if (source.path / art.MODEL_CODE_FILE).is_file():
            shutil.copyfile(source.path / art.MODEL_CODE_FILE, staging / art.MODEL_CODE_FILE)
        source.copy_tokenizer(staging)
        manifest = art.write_metadata(
            staging, config={**config_base, "quantization": section}, stage="quantize", parent=source,
            options=options_record, metrics={**manifest_metrics(report), "output_max_abs_diff": error["max_abs_diff"],
                                             "output_top1_agreement": error["top1_agreement"]},
            extra={"report": report, "quantization": section, "gate": gate.as_dict()})
    return report, section, gate.as_dict(), manifest


def _probe_inputs(evaluator) -> list:
    """Real inputs from the evaluation split, on which the output error is measured."""
    task = evaluator.task
    if task.name == "language-modeling":
        starts = task.data.eval_starts(evaluator.split, task.block_size, 8)
        return [task.data.windows(starts, task.block_size)[0].numpy()] if starts else []
    x, _ = task.data.arrays(evaluator.split)
    return [x[:256]] if len(x) else []
