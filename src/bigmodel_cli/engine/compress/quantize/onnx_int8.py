"""int8 ONNX models through ONNX Runtime's quantization tools (no hand-written int8 kernels).

- ``preprocess``: ORT's ``quant_pre_process`` (symbolic shape inference, ORT's basic graph
  optimizations, ONNX shape inference), which the quantizer needs to see every tensor's shape.
- ``quantize_file``: ``quantize_dynamic`` (weights int8 ahead of time, activations quantized at
  run time) or ``quantize_static`` in QDQ format with a calibration reader and a calibration method.
- ``sensitive_nodes``: for transformers, the ops int8 is known to hurt (LayerNorm, Softmax, GELU,
  residual Add) — kept in float by default.

Everything here reads and writes files in a directory the caller owns (a TemporaryDirectory or
the atomic staging directory); ORT's own temporary files go to its own temporary directories.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bigmodel_cli.errors import UserError, WorkFailed, first_line
from ...onnx.files import data_path, has_external_data
from ...core.quiet import silenced
from .scheme import Scheme

MODES = ("dynamic", "static")
METHODS = ("minmax", "entropy", "percentile")
PERCENTILE = 99.999  # ORT's default for the percentile calibrator
# Ops that do the multiply-accumulate work int8 exists for; the accuracy gate ranks these.
COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"}
# Known to lose accuracy in int8 inside transformers: normalizations, attention softmax, GELU.
_SENSITIVE_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "Softmax",
                  "Gelu", "FastGelu", "BiasGelu", "Erf", "Tanh"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def quiet():
    """ORT's quantization tools log advice to the root logger and print to stdout."""
    return silenced()


def preprocess(src: Path, dst: Path) -> dict:
    """ORT's pre-processing into ``dst``. When it fails, quantization goes ahead on the model as
    exported and the reason is recorded.

    Symbolic shape inference runs only where it helps: for contrib (com.microsoft) ops, which ONNX
    shape inference does not know. For standard ops ONNX shape inference gives the quantizer the
    same shapes, and skipping it saves importing sympy (seconds).
    """
    from onnxruntime.quantization import quant_pre_process

    external = has_external_data(src)
    symbolic = any(n.domain not in ("", "ai.onnx") for n in load_graph(src).node)
    steps = (["symbolic shape inference"] if symbolic else []) + ["ONNX Runtime basic optimizations", "ONNX shape inference"]
    try:
        with quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=not symbolic, save_as_external_data=external,
                              all_tensors_to_one_file=True, external_data_location=data_path(dst).name if external else None)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # shape inference and the optimizer raise many types
        for leftover in (dst, data_path(dst)):
            leftover.unlink(missing_ok=True)
        return {"applied": False, "reason": first_line(exc, 240, with_type=True)}
    return {"applied": True, "steps": steps}


def load_graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _constants(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def is_transformer(graph) -> bool:
    ops = {n.op_type for n in graph.node}
    return bool(ops & {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"}) and bool(
        ops & {"Softmax", "Attention", "MultiHeadAttention"})


def sensitive_nodes(graph) -> list[dict]:
    """Nodes a transformer keeps in float: normalizations, Softmax, GELU (fused, or the Erf/Tanh
    form the exporters write, with its Div/Mul/Add around it), and Adds of two activations
    (residual connections, the attention mask)."""
    constants = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in _SENSITIVE_OPS:
            found.setdefault(node.name, node.op_type if node.op_type not in ("Erf", "Tanh") else "GELU")
            if node.op_type in ("Erf", "Tanh"):
                # x * 0.5 * (1 + erf(x / sqrt 2)): the scaling before, the Add/Mul chain after.
                for i in node.input:
                    p = producers.get(i)
                    if p is not None and p.op_type in ("Div", "Mul"):
                        found.setdefault(p.name, "GELU")
                frontier = list(node.output)
                for _ in range(3):
                    nxt = []
                    for t in frontier:
                        for c in consumers.get(t, []):
                            if c.op_type in ("Add", "Mul"):
                                found.setdefault(c.name, "GELU")
                                nxt.extend(c.output)
                    frontier = nxt
        elif node.op_type == "Add" and len(node.input) == 2 and not (set(node.input) & constants):
            found.setdefault(node.name, "residual Add")
    return [{"node": name, "kind": kind} for name, kind in found.items() if name]


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


@dataclass
class Int8Settings:
    mode: str  # dynamic | static
    scheme: Scheme
    per_channel: bool
    method: str = "minmax"  # static only
    # static: quantize only the weight layers' MatMul/Gemm/Conv (inputs and weights), not their outputs:
    # exactly what --qat simulates in a transformer (see weight_layer_nodes)
    weight_layers_only: bool = False


def quantizes_beyond_weight_layers(graph) -> bool:
    """Whether the full static QDQ flow would quantize tensors that no Linear or Conv layer takes
    as input: a MatMul of two activations (attention's scores and output) or an embedding Gather.
    (In a Conv/Gemm network the flow's other placements sit on those layers' outputs, which equal
    the next layer's input quantization after a ReLU.)"""
    constants = _constants(graph)
    return any((n.op_type == "MatMul" and not set(n.input) & constants)
               or (n.op_type == "Gather" and n.input and n.input[0] in constants) for n in graph.node)


def weight_layer_nodes(graph) -> list[str]:
    """The MatMul, Gemm and Conv nodes whose second input is a weight (an initializer): the model's
    Linear and Conv layers, and not the attention's products of two activations."""
    constants = _constants(graph)
    return [n.name for n in graph.node
            if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in constants and n.name]


def quantize_file(float_path: Path, out_path: Path, settings: Int8Settings, exclude: list[str], reader=None,
                  cache: Path | None = None) -> None:
    """Quantize ``float_path`` into ``out_path`` with ONNX Runtime; ``exclude`` are node names kept in
    float. Static: ``cache`` keeps the calibrated ranges, so a retry does not calibrate again."""
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    external = has_external_data(float_path)
    scheme = settings.scheme
    try:
        with quiet():
            if settings.mode == "dynamic":
                # Activations are quantized at run time by DynamicQuantizeLinear, which is uint8 only.
                quantize_dynamic(str(float_path), str(out_path), per_channel=settings.per_channel,
                                 reduce_range=scheme.reduce_range, weight_type=_quant_type(scheme.weight_type),
                                 nodes_to_exclude=list(exclude), use_external_data_format=external,
                                 extra_options={"MatMulConstBOnly": True})
            else:
                # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 the MinMax calibrator drops the
                # batches it has collected when that limit is reached, instead of merging their ranges.
                extra, only = {}, None
                if settings.method == "percentile":
                    extra["CalibPercentile"] = PERCENTILE
                if settings.weight_layers_only:
                    only = weight_layer_nodes(load_graph(float_path))
                    extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm", "Conv"]
                quantize_static(str(float_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                                per_channel=settings.per_channel, reduce_range=scheme.reduce_range,
                                activation_type=_quant_type(scheme.activation_type),
                                weight_type=_quant_type(scheme.weight_type), nodes_to_exclude=list(exclude),
                                nodes_to_quantize=only, use_external_data_format=external, calibrate_method=calibration_method(settings.method),
                                extra_options=extra, calibration_cache_path=str(cache) if cache else None)
    except (KeyboardInterrupt, MemoryError, UserError, WorkFailed):
        raise
    except Exception as exc:  # the quantizer raises many types; one line says which step failed
        raise WorkFailed(f"ONNX Runtime's {settings.mode} quantization failed ({first_line(exc, 240, with_type=True)}); nothing was written") from None


def quantized_nodes(float_graph, int8_path: Path, mode: str) -> list[str]:
    """The float model's compute nodes that ended up int8 in ``int8_path``.

    Dynamic quantization replaces a node by ``<name>_quant`` (MatMulInteger/ConvInteger) or feeds it
    int8 weights (Gather); QDQ keeps the node and feeds it from DequantizeLinear.
    """
    graph = load_graph(int8_path)
    names = {n.name: n for n in graph.node}
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for node in float_graph.node:
        if node.op_type not in COMPUTE_OPS or not node.name:
            continue
        if mode == "dynamic":
            now = names.get(node.name)
            if node.name + "_quant" in names or (now is not None and any(i.endswith("_quantized") for i in now.input)):
                out.append(node.name)
        else:
            now = names.get(node.name)
            if now is not None and any((producers.get(i) is not None and producers[i].op_type == "DequantizeLinear")
                                       for i in now.input):
                out.append(node.name)
    return out
