"""The accuracy gate: per-tensor quantization error, nodes ranked by it, bounded retries.

Errors are signal-to-quantization-noise ratios in dB (higher is better), computed the way ONNX
Runtime's ``qdq_loss_debug`` does and with its helpers: ``modify_model_output_intermediate_tensors``
and ``collect_activations`` record the float model's activations on calibration inputs, and
``compute_signal_to_quantization_noice_ratio`` scores each tensor against its quantized copy. Weights
are paired with their int8 copies from the file and dequantized in float64 here: ORT's
``create_weight_matching`` subtracts the zero point in the stored integer type, which wraps around
for uint8 weights (Gather tables, biases added by Add) and reports nonsense for them. Each activation is put through the
quantization the int8 model applies to it — the calibrated scale and zero point of its
QuantizeLinear (static), or DynamicQuantizeLinear's per-batch uint8 range (dynamic) — so the error
is that tensor's own, not what it inherited from the layers before. (Comparing the QDQ model's
tensors before and after their QDQ pair, ``create_activation_matching``, would charge a ReLU that
QDQ folded into its quantizer with the ReLU's own clipping.)

A node's error is that of its worst input tensor; the worst nodes are kept in float on retry
(1, then 2, then 4 … of them, never all), at most ``max_retries`` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bigmodel_cli.errors import WorkFailed
from ...core.progress import no_progress
from .calibration import make_reader
from .onnx_int8 import COMPUTE_OPS, quiet

RANK_SAMPLES = {"classification": 64, "language-modeling": 8}


def metric_drop(task: str, before: dict, after: dict) -> float:
    """How much worse ``after`` is: accuracy points lost, or perplexity increase in percent."""
    if task == "language-modeling":
        return (after["perplexity"] / before["perplexity"] - 1.0) * 100.0
    return (before["accuracy"] - after["accuracy"]) * 100.0


def drop_unit(task: str) -> str:
    return "% perplexity" if task == "language-modeling" else " accuracy points"


def sqnr_db(reference, approximation) -> float:
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    return float(compute_signal_to_quantization_noice_ratio(reference, approximation))


def _collect(model_path: Path, aug_path: Path, op_types: list[str], input_name: str, batches: list[np.ndarray]) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as in the file
    options.log_severity_level = 3
    with quiet():
        modify_model_output_intermediate_tensors(str(model_path), str(aug_path), op_types_for_saving=op_types)
        return collect_activations(str(aug_path), make_reader(input_name, batches), session_options=options)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(q - zero_point) * scale, per tensor or per channel; the channel axis is the one whose
    length matches the scales (the closest match to the float weight, where several do)."""
    q, scale, zp = q.astype(np.float64), scale.astype(np.float64), zero_point.astype(np.float64)
    if scale.size == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    best, best_err = None, np.inf
    for axis in [a for a in range(q.ndim) if q.shape[a] == scale.size]:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        candidate = (q - zp.reshape(shape)) * scale.reshape(shape)
        err = float(np.abs(candidate - reference).max())
        if err < best_err:
            best, best_err = candidate, err
    return best if best is not None else (q - zp.mean()) * scale.mean()


def fake_quantize(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear."""
    q = np.clip(np.round(x.astype(np.float32) / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def simulate_dynamic_u8(x: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeLinear does to ``x`` (uint8, range widened to include 0), dequantized."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return fake_quantize(x, scale, int(np.clip(np.round(-lo / scale), 0, 255)), 0, 255)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _activation_quantizers(int8_path: Path) -> dict[str, tuple]:
    """Static QDQ: each quantized activation's (scale, zero point, qmin, qmax), by its float name."""
    from onnxruntime.quantization.quant_utils import QUANT_INPUT_SUFFIX

    from .onnx_int8 import load_graph

    graph = load_graph(int8_path)
    values = _initializers(int8_path)
    out = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[0] in values:
            continue  # weights: _qdq_weight_errors
        scale, zp = values.get(node.input[1]), values.get(node.input[2])
        if scale is None or zp is None or scale.size != 1:
            continue
        info = np.iinfo(zp.dtype)
        name = node.input[0]
        if name.endswith(QUANT_INPUT_SUFFIX):  # a graph output, renamed so the QDQ pair can keep its name
            name = name[: -len(QUANT_INPUT_SUFFIX)]
        out[name] = (float(scale.reshape(())), int(zp.reshape(())), int(info.min), int(info.max))
    return out


def _qdq_weight_errors(floats: dict, quantized: dict, int8_path: Path) -> dict[str, float]:
    """Each weight that feeds a DequantizeLinear, against its float original."""
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

    from .onnx_int8 import load_graph

    errors = {}
    for node in load_graph(int8_path).node:
        stored = node.input[0] if node.op_type == "DequantizeLinear" else ""
        if stored not in quantized or not stored.endswith(TENSOR_NAME_QUANT_SUFFIX):
            continue
        name = stored[: -len(TENSOR_NAME_QUANT_SUFFIX)]
        weight, scale = floats.get(name), quantized.get(node.input[1])
        if weight is None or scale is None:
            continue
        zp = quantized.get(node.input[2]) if len(node.input) > 2 else None
        zp = np.zeros_like(scale) if zp is None else zp
        errors[name] = sqnr_db(np.atleast_1d(weight).astype(np.float64),
                               np.atleast_1d(_dequantize(quantized[stored], scale, zp, weight)))
    return errors


def tensor_errors(float_path: Path, int8_path: Path, mode: str, input_name: str, batches: list[np.ndarray],
                  workdir: Path) -> dict[str, float]:
    """SQNR (dB) of every quantized tensor — weights and activations — keyed by its float name."""
    errors: dict[str, float] = {}
    float_acts = _collect(float_path, workdir / "float-activations.onnx", sorted(COMPUTE_OPS), input_name, batches)
    floats, quantized = _initializers(float_path), _initializers(int8_path)
    if mode == "static":
        errors.update(_qdq_weight_errors(floats, quantized, int8_path))
        for name, (scale, zp, qmin, qmax) in _activation_quantizers(int8_path).items():
            if float_acts.get(name):
                errors[name] = sqnr_db(float_acts[name], [fake_quantize(v, scale, zp, qmin, qmax) for v in float_acts[name]])
        return errors
    for name, weight in floats.items():
        q = quantized.get(name + "_quantized")
        if q is None or name + "_scale" not in quantized:
            continue
        zp = quantized.get(name + "_zero_point", np.zeros_like(quantized[name + "_scale"]))
        errors[name] = sqnr_db(np.atleast_1d(weight).astype(np.float64), np.atleast_1d(_dequantize(q, quantized[name + "_scale"], zp, weight)))
    for name, values in float_acts.items():
        if values and np.issubdtype(values[0].dtype, np.floating):
            errors[name] = sqnr_db(values, [simulate_dynamic_u8(v) for v in values])
    return errors


def rank_nodes(float_graph, candidates: list[str], errors: dict[str, float]) -> list[dict]:
    """The candidate nodes, worst first: each scored by its worst (lowest-SQNR) input tensor."""
    nodes = {n.name: n for n in float_graph.node}
    ranking = []
    for name in candidates:
        node = nodes.get(name)
        if node is None:
            continue
        scored = [(errors[t], t) for t in node.input if t in errors]
        if scored:
            sqnr, tensor = min(scored)
            ranking.append({"node": name, "op": node.op_type, "sqnr_db": round(sqnr, 2), "tensor": tensor})
    ranking.sort(key=lambda r: r["sqnr_db"])
    return ranking


@dataclass
class GateResult:
    limit: float | None
    unit: str
    passed: bool
    attempts: list[dict] = field(default_factory=list)  # {"excluded": [...], "drop": x, metric...}
    ranking: list[dict] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # what the final, passing model keeps in float

    def as_dict(self) -> dict:
        return {"max_metric_drop": self.limit, "unit": self.unit.strip(), "passed": self.passed,
                "attempts": self.attempts, "ranking": self.ranking[:20], "excluded": self.excluded}


def run_gate(*, task: str, limit: float | None, before: dict, first: dict, rank: Callable[[], list[dict]],
             retry: Callable[[list[str]], dict], max_retries: int, progress: Callable | None = None) -> GateResult:
    """Check ``first`` (the metrics of the int8 model) against ``limit``; when it fails, rank the
    nodes and retry with the worst 1, 2, 4 … kept in float. ``retry(excluded)`` quantizes again
    and returns the new metrics."""
    say = progress or no_progress
    unit = drop_unit(task)
    drop = metric_drop(task, before, first)
    attempts = [{"excluded": [], "drop": drop, **_metric(first)}]
    if limit is None or drop <= limit:
        return GateResult(limit, unit, True, attempts)
    say("stage", name="rank")
    ranking = rank()
    excluded: list[str] = []
    most = len(ranking) - 1  # keeping every node in float would not be a quantized model
    for attempt in range(1, max_retries + 1):
        wanted = [r["node"] for r in ranking[:min(2 ** (attempt - 1), most)]]
        if not wanted or wanted == excluded:  # nothing (more) to keep in float
            break
        excluded = wanted
        say("stage", name="retry", attempt=attempt, excluded=excluded)
        metrics = retry(excluded)
        drop = metric_drop(task, before, metrics)
        attempts.append({"excluded": list(excluded), "drop": drop, **_metric(metrics)})
        if drop <= limit:
            return GateResult(limit, unit, True, attempts, ranking, list(excluded))
    return GateResult(limit, unit, False, attempts, ranking, list(excluded))


def _metric(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "perplexity", "loss") if k in metrics}


def failure(gate: GateResult) -> WorkFailed:
    """The one line for a gate that still fails after its retries (exit 1, nothing written)."""
    last = gate.attempts[-1]
    tried = "; ".join(f"{len(a['excluded'])} in float ({', '.join(a['excluded'])}): {a['drop']:.3g}" for a in gate.attempts[1:])
    detail = f"retries kept the worst nodes by quantization error in float — {tried}" if tried else (
        "no retry was possible (--max-retries 0, or too few quantized nodes to keep one in float)")
    return WorkFailed(f"accuracy gate failed: the quantized model loses {last['drop']:.3g}{gate.unit} "
                      f"(--max-metric-drop {gate.limit:g}); {detail}; nothing was written — "
                      "raise --max-metric-drop or --max-retries, or try another --mode/--method")
