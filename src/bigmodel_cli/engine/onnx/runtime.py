"""ONNX Runtime: sessions, execution providers and threads, for any artifact with ``model.onnx``.

This module never imports torch: it is the path a deployed model takes, so it depends only on
onnxruntime, onnx (for reading initializers) and numpy. Exported, quantized and hand-written ONNX
files are all run the same way: the graph's own input/output signature decides the feeding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...artifact import ONNX_FILE, Artifact
from ...config import threads_problem
from ...errors import UserError, first_line
from .files import check_data_beside, check_external_data

DEVICES = ("auto", "cpu", "cuda")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

# ONNX tensor element types (onnx.TensorProto) → numpy, for the types a model may take or hold.
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# Initializer types that count as model parameters (weights); int64/int32 initializers are shape
# and index constants, not weights. int8/uint8/int4 are the weights of quantized models.
_WEIGHT_TYPES = {"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int4", "uint4"}


def default_threads() -> int:
    """The cores this process may use: the same default for torch and ONNX Runtime comparisons."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def providers_for(device: str) -> list[str]:
    """Execution providers to ask for, best first. ``cuda`` is refused (exit 2) when this
    onnxruntime build has no CUDA provider, rather than silently running on the CPU."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise UserError(f"unknown --device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device == "cuda":
        if CUDA_PROVIDER not in available:
            raise UserError(
                "--device cuda: this onnxruntime build has no CUDAExecutionProvider; "
                "install onnxruntime-gpu (pip install onnxruntime-gpu) or use --device cpu"
            )
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "auto" and CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def open_session(path: Path | str, device: str = "cpu", threads: int | None = None, optimization: str = "all",
                 optimized_model_path: Path | None = None, spin: bool = True,
                 optimized_external_data: str | None = None):
    """An InferenceSession with fixed threads (intra-op = ``threads``, inter-op = 1, sequential).

    A file ONNX Runtime cannot load (not ONNX, truncated, an unsupported opset or operator) is the
    user's input problem: one line, exit 2.
    """
    import onnxruntime as ort

    problem = threads_problem(threads)
    if problem:
        raise UserError(problem)
    threads = default_threads() if threads is None else threads
    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    if not spin:
        # Two sessions timed in turn in one process: idle pool threads that spin steal the cores
        # the other session needs (quantize's before/after comparison turns them off for both).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if optimized_external_data is not None:
        # A model over 2 GB cannot be saved as one protobuf: the optimized copy keeps its weights in
        # this file (relative to optimized_model_path). Tensors under ORT's default 1 KiB stay in the
        # graph, where shape inference can read them (Reshape's target shape, for one).
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized_external_data)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file; export the model first (bigmodel export ARTIFACT --out DIR)")
    check_data_beside(path)  # a short model.onnx.data: one line naming that file
    try:
        session = ort.InferenceSession(str(path), options, providers=providers_for(device))
    except UserError:
        raise
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        check_external_data(path)  # a missing data file is the likely cause: if so, say that
        raise UserError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)}); it is not a valid ONNX model "
                        "for this runtime — re-export it with bigmodel export") from None
    return session, threads


def session_signature(session) -> dict:
    """Names, element types and shapes (symbolic dimensions as names) of the graph's inputs and outputs."""
    def describe(values):
        return [{"name": v.name, "type": v.type, "shape": [d if isinstance(d, (int, str)) else None for d in v.shape]}
                for v in values]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def session_predict(session):
    """numpy batch → numpy float32 logits, through the session's one input and first output.

    The batch is cast to the input's element type. When the graph has a fixed batch size (an
    export with ``--dynamic`` not including batch), the batch is fed in chunks of that size,
    the last one padded and the padding dropped from the result.
    """
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise UserError(f"the ONNX model takes {len(inputs)} inputs ({names}); bigmodel runs models with one input")
    name = inputs[0].name
    dtype = _ORT_TYPES.get(inputs[0].type, np.float32)
    fixed_batch = inputs[0].shape[0] if inputs[0].shape and isinstance(inputs[0].shape[0], int) else None
    output = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([output], {name: x})[0]).astype(np.float32, copy=False)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=dtype)
        if fixed_batch is None or len(x) == fixed_batch:
            return run(x)
        parts = []
        for start in range(0, len(x), fixed_batch):
            chunk = x[start:start + fixed_batch]
            n = len(chunk)
            if n < fixed_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - n, axis=0)])
            parts.append(run(chunk)[:n])
        return np.concatenate(parts)

    return predict


def _load_model(path: Path, with_data: bool = True):
    import onnx

    check_data_beside(path)
    try:
        return onnx.load(str(path), load_external_data=with_data)
    except Exception as exc:  # DecodeError, OSError, ...
        check_external_data(path)  # a missing data file is the likely cause: if so, say that
        raise UserError(f"{path}: is not a readable ONNX file ({first_line(exc)}); re-export it") from None


def _initializer_arrays(artifact: Artifact):
    from onnx import numpy_helper

    model = _load_model(artifact.path / ONNX_FILE)
    for init in model.graph.initializer:
        try:
            yield init.name, numpy_helper.to_array(init, base_dir=str(artifact.path))
        except Exception as exc:
            raise UserError(f"{artifact.path / ONNX_FILE}: initializer {init.name!r} cannot be read ({first_line(exc)})") from None


def onnx_tensor_table(artifact: Artifact) -> list[dict]:
    """One row per ONNX initializer, in the same shape as ``inspect.tensor_table``'s rows.

    Scalars and integer shape constants are left out: they are graph plumbing, not weights.
    """
    rows = []
    for name, array in _initializer_arrays(artifact):
        dtype = str(array.dtype)  # int4/bfloat16 come as ml_dtypes types, named alike
        if dtype not in _WEIGHT_TYPES or array.ndim == 0:
            continue
        numel = int(array.size)
        zeros = int(np.count_nonzero(array == 0)) if numel else 0
        rows.append({"name": name, "shape": list(array.shape), "dtype": dtype, "params": numel, "zeros": zeros,
                     "sparsity": zeros / numel if numel else 0.0})
    return rows


def onnx_size_stats(artifact: Artifact) -> dict:
    """Parameters (weight initializers, quantized ones included), non-zero parameters, file bytes."""
    rows = onnx_tensor_table(artifact)
    params = sum(r["params"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return {"params": params, "nonzero_params": params - zeros, "file_bytes": artifact.file_bytes(ONNX_FILE)}
