"""Quantization-aware training: fine-tune with int8 simulated, so the weights learn the int8 grid.

What is simulated is what ONNX Runtime's static QDQ flow (``onnx_int8.py``, per channel) computes:

- weights: per output channel, symmetric int8 (``[-127, 127]``, ``[-64, 64]`` with reduce_range),
  recomputed from the fp32 shadow weights at every step, as the quantizer does from the final ones;
- activations: per tensor, the dtype the CPU scheme chose (uint8 or int8, asymmetric, the range
  holding 0 as ORT's minmax calibration makes it), at the inputs of every Linear and Conv (the
  MatMul, Gemm and Conv nodes the static flow quantizes), and the model's output when a layer
  returns it (the logits, which the QDQ flow quantizes as a graph output).

In a transformer ORT's full QDQ flow also quantizes what no Linear or Conv sees (embedding outputs,
bias Adds, q, k, v, the scores, the softmax probabilities, the logits), and those placements cost
1-2.5 points of top-1 agreement between simulation and export (measured: docs/quantize.md). Where
the graph has such places (``onnx_int8.quantizes_beyond_weight_layers``: a MatMul of two
activations or an embedding Gather) the export is made to quantize only what is simulated instead
(``onnx_int8.weight_layer_nodes``, outputs in float), and the logits are not quantized in either;
ORT runs those MatMuls as MatMulIntegerToFloat.

Activation ranges are calibrated once with minmax on the calibration set and then *frozen* during
fine-tuning (not LSQ learned scales): frozen minmax ranges are what the static flow computes from the
same set, so the model trains against the kind of scale it will ship with, and no second optimiser
state or scale-gradient heuristics are needed. After fine-tuning, the ranges are re-calibrated on the
trained weights, in PyTorch and by the static flow on the same calibration set with the same
minmax rule, so the exported scales and zero points are the ones the final simulation uses. Gradients pass straight through
(``torch.fake_quantize_*``: identity inside the range, zero outside).

The fake quantization replaces each layer's ``forward`` on the instance only: the state dict keeps
its keys, so the training loop's checkpoints, resume and saved artifacts hold the fp32 shadow weights
that load into the unmodified model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigmodel_cli.errors import UserError

ATTRIBUTE = "qat_activation"  # where a layer keeps its frozen activation quantization
OUTPUT_ATTRIBUTE = "qat_output"  # the layer that returns the model's output: that output's quantization
# Layers without a fake-quant place that hold 2-D weights would run in float in the simulation but
# not in the exported model's plan: refused rather than simulated wrongly.
FLOAT_OK = ("Embedding", "LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "GroupNorm")
# The fine-tuning learning rate, as a fraction of the rate that trained the model: QAT starts from
# trained weights that only need to settle on the int8 grid, and the straight-through gradient is
# an approximation that a large step turns into noise; but a budget of a few epochs at 1% (what
# guides give for long schedules) moves few weights by one int8 step (docs/quantize.md, "Learning rate").
QAT_LR_FRACTION = 0.1
FALLBACK_TRAINING_LR = 1e-3  # TrainConfig's default, for a source with no recorded rate (an import)


@dataclass(frozen=True)
class ActivationQuant:
    scale: float
    zero_point: int
    qmin: int
    qmax: int


def activation_range(activation_type: str) -> tuple[int, int]:
    return (0, 255) if activation_type == "uint8" else (-128, 127)


def activation_quant(low: float, high: float, activation_type: str) -> ActivationQuant:
    """ORT's minmax parameters for a tensor seen in [low, high]: the range widened to hold 0."""
    qmin, qmax = activation_range(activation_type)
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (qmax - qmin) or 1.0
    zero_point = int(round(qmin - low / scale))
    return ActivationQuant(float(scale), max(qmin, min(qmax, zero_point)), qmin, qmax)


def default_learning_rate(source) -> float:
    """QAT_LR_FRACTION of the learning rate recorded in ``source``'s manifest (the run that made its
    weights: train, or prune's and distill's fine-tuning), or of TrainConfig's default."""
    from bigmodel_cli.config import is_finite_number

    options = source.manifest.get("options")
    recorded = options.get("lr") if isinstance(options, dict) else None
    ok = is_finite_number(recorded) and recorded > 0
    return QAT_LR_FRACTION * (float(recorded) if ok else FALLBACK_TRAINING_LR)


def weight_bound(reduce_range: bool) -> int:
    return 64 if reduce_range else 127


def quantizable_layers(model) -> list[tuple[str, object]]:
    """The Linear and Conv layers (in module order), refusing a layer no fake-quant place fits."""
    from torch import nn

    layers, unplaceable = [], []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            layers.append((name, module))
        elif any(p.dim() >= 2 for p in module.parameters(recurse=False)) and type(module).__name__ not in FLOAT_OK:
            unplaceable.append(f"{name or 'the model'} ({type(module).__name__})")
    if unplaceable:
        raise UserError(f"--qat cannot place fake quantization on {', '.join(unplaceable[:5])}: only Linear and Conv "
                        "layers are simulated; quantize this model after training with --mode static instead")
    if not layers:
        raise UserError("--qat found no Linear or Conv layer to quantize in this model; there is nothing to train for int8")
    return layers


def calibrate(model, layers, batches: list[np.ndarray], activation_type: str, quantize_output: bool = True) -> None:
    """Minmax ranges of every layer's input over the calibration batches, then frozen on the layer;
    and, with ``quantize_output``, of the model's output when a layer returns it as is (ONNX
    Runtime's full QDQ flow quantizes a graph output that a quantized MatMul or Gemm produces: the
    logits)."""
    import torch

    seen: dict[int, list[float]] = {}
    produced: dict[int, object] = {}  # id(output tensor) -> the layer that returned it (last batch)

    def widen(key: int, x) -> None:
        low, high = float(x.min()), float(x.max())
        old = seen.setdefault(key, [low, high])
        old[0], old[1] = min(old[0], low), max(old[1], high)

    def record(module, args):
        widen(id(module), args[0].detach())

    def returned(module, _args, output):
        produced[id(output)] = module

    handles = [m.register_forward_pre_hook(record) for _, m in layers]
    handles += [m.register_forward_hook(returned) for _, m in layers]
    last, out_range = None, None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                produced.clear()
                y = model(torch.from_numpy(np.asarray(batch)))
                last = produced.get(id(y)) if torch.is_tensor(y) else None
                if last is not None:
                    low, high = float(y.min()), float(y.max())
                    out_range = [min(out_range[0], low), max(out_range[1], high)] if out_range else [low, high]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, module in layers:
        if id(module) not in seen:
            raise UserError(f"--qat: layer {name} never ran on the calibration inputs, so it has no activation range; "
                            "quantize this model with --mode static instead")
        low, high = seen[id(module)]
        setattr(module, ATTRIBUTE, activation_quant(low, high, activation_type))
        module.__dict__.pop(OUTPUT_ATTRIBUTE, None)
    if quantize_output and last is not None and out_range is not None:
        setattr(last, OUTPUT_ATTRIBUTE, activation_quant(out_range[0], out_range[1], activation_type))


def fake_quant_weight(weight, bound: int):
    """Per output channel, symmetric: scale = max|w| / bound, zero point 0 (ORT's per-channel int8)."""
    import torch

    absmax = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
    scale = (absmax / bound).clamp(min=1e-12).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -bound, bound)


def fake_quant_activation(x, q: ActivationQuant):
    import torch

    return torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, q.qmin, q.qmax)


def simulate(layers, reduce_range: bool) -> None:
    """Give every layer a forward that fake-quantizes its input and its weight (on the instance only)."""
    from torch import nn
    import torch.nn.functional as F

    bound = weight_bound(reduce_range)
    for _, module in layers:
        q = getattr(module, ATTRIBUTE)
        out_q = getattr(module, OUTPUT_ATTRIBUTE, None)
        if isinstance(module, nn.Linear):
            def layer(x, m=module, q=q):
                return F.linear(fake_quant_activation(x, q), fake_quant_weight(m.weight, bound), m.bias)
        else:
            def layer(x, m=module, q=q):
                return m._conv_forward(fake_quant_activation(x, q), fake_quant_weight(m.weight, bound), m.bias)
        if out_q is None:
            module.forward = layer
        else:
            module.forward = lambda x, layer=layer, out_q=out_q: fake_quant_activation(layer(x), out_q)


def activation_record(layers) -> dict:
    """Each simulated activation quantization (scale, zero point, range), by layer input or output."""
    record = {}
    for name, module in layers:
        record[name] = dataclasses.asdict(getattr(module, ATTRIBUTE))
        if getattr(module, OUTPUT_ATTRIBUTE, None) is not None:
            record[f"{name} (output)"] = dataclasses.asdict(getattr(module, OUTPUT_ATTRIBUTE))
    return record


def unsimulate(layers) -> None:
    """Back to float layers (the fp32 shadow weights)."""
    for _, module in layers:
        module.__dict__.pop("forward", None)
        module.__dict__.pop(ATTRIBUTE, None)
        module.__dict__.pop(OUTPUT_ATTRIBUTE, None)


def _carried_files(source) -> dict:
    """What every artifact of the run needs besides weights: the tokenizer, a user model's code."""
    from bigmodel_cli import artifact as art

    files = dict(source.tokenizer_files())
    if (source.path / art.MODEL_CODE_FILE).is_file():
        files[art.MODEL_CODE_FILE] = source.path / art.MODEL_CODE_FILE
    return files


def restore(layers, record: dict) -> None:
    """Give the layers the activation quantization ``activation_record`` wrote (a --nproc worker
    takes the launching process's calibration rather than repeating it)."""
    from bigmodel_cli.errors import WorkFailed

    names = {name for name, _ in layers}
    if not names <= set(record):
        raise WorkFailed(f"--nproc: the worker's record lacks layers {sorted(names - set(record))[:3]}; "
                         "the model changed under the run — run the command again")
    for name, module in layers:
        setattr(module, ATTRIBUTE, ActivationQuant(**record[name]))
        module.__dict__.pop(OUTPUT_ATTRIBUTE, None)
        if f"{name} (output)" in record:
            setattr(module, OUTPUT_ATTRIBUTE, ActivationQuant(**record[f"{name} (output)"]))


def _training_job(source, model, layers, train_cfg, scheme_name: str):
    """The shared training loop's job for the simulated ``model`` on ``source``'s own data."""
    from bigmodel_cli.data.augment import policy_from_option
    from ...core.datasets import open_data
    from ...core.tasks import make_task
    from ...training.job import TrainJob

    data = open_data(source)
    task = make_task(data, train_cfg.batch_size, train_cfg.seed, source.data_spec.get("block_size"),
                     train_cfg.eval_windows, policy_from_option(train_cfg.augment, data, mixing_allowed=True))
    # evaluate_start: the calibrated simulation before any step is a candidate too, so a fine-tune
    # whose steps all hurt hands back the starting weights rather than worse ones.
    return TrainJob(cfg=train_cfg, model=model, data=data, task=task, artifact_config=dict(source.config),
                    stage="train", parent=source, extra_files=_carried_files(source),
                    manifest_extra={"qat": {"scheme": scheme_name, "layers": len(layers)}}, evaluate_start=True)


def _facts(result) -> dict:
    """What the caller needs of a run_job result (JSON, so a --nproc worker can hand it back)."""
    return {"best_dir": str(result.best_dir), "steps": result.steps, "best_step": result.best_step,
            "stopped_early": result.stopped_early, "resumed_from": result.resumed_from, "seconds": result.seconds,
            "processes": result.runtime.get("world_size", 1),
            "best_metrics": {k: v for k, v in result.best_metrics.items() if k != "step"}}


def finetune(source, calib_batches: list[np.ndarray], scheme, train_cfg, run_dir, progress,
             quantize_output: bool = True, nproc: int | None = None, work=None) -> dict:
    """Calibrate, simulate int8 and fine-tune ``source``'s model with the shared training loop
    (resume, progress, early stopping; ``nproc`` > 1: in that many data-parallel workers, which
    take this calibration from ``work``/qat-worker.json). Returns the run's facts and ``best_dir``:
    the best step's artifact, whose model.safetensors holds the fp32 shadow weights.
    ``quantize_output``: simulate the quantized logits (not where the export leaves them in float)."""
    import torch
    from safetensors.torch import load_file

    from bigmodel_cli import artifact as art
    from bigmodel_cli.weights import load_into
    from ...training.loop import run_job

    torch.manual_seed(train_cfg.seed)
    model = source.build_model()
    layers = quantizable_layers(model)
    calibrate(model, layers, calib_batches, scheme.activation_type, quantize_output)
    if nproc is not None and nproc > 1:
        facts = _finetune_in_workers(source, model, layers, scheme, train_cfg, nproc, work)
    else:
        simulate(layers, scheme.reduce_range)
        facts = _facts(run_job(_training_job(source, model, layers, train_cfg, scheme.name), progress))
    # The best step's shadow weights, with activation ranges re-calibrated on them exactly as the
    # static flow will calibrate the export: the simulated model is then the one that ships.
    model.cpu()
    best = Path(facts["best_dir"]) / art.WEIGHTS_FILE
    unsimulate(layers)
    load_into(model, load_file(best), source=best)
    calibrate(model, layers, calib_batches, scheme.activation_type, quantize_output)
    simulate(layers, scheme.reduce_range)
    return {**{k: v for k, v in facts.items() if k != "best_metrics"}, "best_dir": Path(facts["best_dir"]),
            "layers": [name for name, _ in layers], "model": model,
            "activations": activation_record(layers), "quantized_layers": layers, **facts["best_metrics"]}


WORKER_SPEC = "qat-worker.json"  # in the command's work directory: what the --nproc workers run
WORKER_RESULT = "qat-result.json"  # written there by rank 0: the run's facts


def _finetune_in_workers(source, model, layers, scheme, train_cfg, nproc: int, work) -> dict:
    """Fine-tune in ``nproc`` workers (``bigmodel qat-worker SPEC`` under torch's elastic launcher,
    as ``train --nproc`` does); the calibration made here is handed to them in SPEC."""
    from bigmodel_cli.config import asdict
    from bigmodel_cli.models.user import trust_model_code_enabled
    from bigmodel_cli.output_file import write_json_atomic
    from ...training import launcher

    spec_path, result_path = Path(work) / WORKER_SPEC, Path(work) / WORKER_RESULT
    write_json_atomic(spec_path, {"source": str(source.path), "train": asdict(train_cfg),
                                  "activations": activation_record(layers), "reduce_range": scheme.reduce_range,
                                  "scheme": scheme.name, "result": str(result_path)})
    # The job is built here too, for the launcher's checks (cores, --resume) before any worker starts.
    job = _training_job(source, model, layers, train_cfg, scheme.name)
    command = (["--trust-model-code"] if trust_model_code_enabled() else []) + ["qat-worker"]
    launcher.launch(job, nproc, [str(spec_path)], command=command)
    return json.loads(result_path.read_text(encoding="utf-8"))


def run_worker(spec_path, progress) -> None:
    """One --nproc worker of a QAT fine-tune: the simulated model from the spec the launching
    process wrote, trained by run_job as one rank; rank 0 writes the run's facts."""
    import torch

    from bigmodel_cli import artifact as art
    from bigmodel_cli.config import TrainConfig, build_config
    from bigmodel_cli.output_file import write_json_atomic
    from ...training.loop import run_job

    spec = read_worker_spec(Path(spec_path))
    cfg = build_config(TrainConfig, spec["train"], source=str(spec_path))
    torch.manual_seed(cfg.seed)
    source = art.open_artifact(spec["source"])
    model = source.build_model()
    layers = quantizable_layers(model)
    restore(layers, spec["activations"])
    simulate(layers, bool(spec["reduce_range"]))
    result = run_job(_training_job(source, model, layers, cfg, spec["scheme"]), progress)
    if result.is_main:
        write_json_atomic(spec["result"], _facts(result))


SPEC_KEYS = {"source": str, "train": dict, "activations": dict, "reduce_range": bool, "scheme": str, "result": str}
QUANT_KEYS = {f.name for f in dataclasses.fields(ActivationQuant)}


def read_worker_spec(path: Path) -> dict:
    """The spec ``_finetune_in_workers`` wrote, checked for that shape: a worker started by hand with
    anything else gets one line (exit 2), not a traceback."""
    fix = f"{path}: is not a worker spec written by `bigmodel quantize --qat --nproc`; run that command instead"
    try:
        with path.open("rb") as file:
            raw = file.read((1 << 20) + 1)  # ours are a few KB
        if len(raw) > 1 << 20:
            raise ValueError("larger than 1 MB")
        spec = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{fix} ({exc})") from None
    ok = isinstance(spec, dict) and all(isinstance(spec.get(k), t) for k, t in SPEC_KEYS.items())
    ok = ok and all(isinstance(q, dict) and set(q) == QUANT_KEYS and all(isinstance(v, (int, float)) for v in q.values())
                    for q in spec["activations"].values())
    if not ok:
        raise UserError(fix)
    return spec
