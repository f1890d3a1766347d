"""Before/after measurements for ``bigmodel prune``: size, task metric and latency, the dense and
the pruned model measured by the same code on the same inputs."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

from bigmodel_cli import artifact as art


def parameter_counts(model) -> tuple[int, int]:
    """(parameters, non-zero parameters): the floating-point tensors of the state dict, each storage
    once — what ``bigmodel eval`` counts in the saved file."""
    params = nonzero = 0
    seen = set()
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen or not tensor.is_floating_point():
            continue
        seen.add(key)
        params += tensor.numel()
        nonzero += int((tensor != 0).sum())
    return params, nonzero


def file_sizes(path: Path) -> dict:
    data = path.read_bytes()
    # Dense storage keeps zeros, so unstructured sparsity does not shrink the file; it does make it
    # compress, which is what shipping it zipped would buy.
    return {"file_bytes": len(data), "compressed_bytes": len(zlib.compress(data, 6))}


def size_figures(model, weights: Path) -> dict:
    params, nonzero = parameter_counts(model)
    return {"params": params, "nonzero_params": nonzero, **file_sizes(weights)}


def task_metrics(task, model, split: str) -> dict:
    from ...core.tasks import torch_predict

    model.eval()
    metrics = task.evaluate(torch_predict(model.cpu()), split)
    return {k: v for k, v in metrics.items() if k not in ("samples", "tokens")}


def side_by_side_latency(predicts: dict[str, Callable], example, iterations: int, warmup: int = 3) -> dict:
    """p50/p95 in ms of each predict on the same input, side by side (``timing.take_turns``)."""
    from ...core.timing import latency_stats, take_turns

    return {name: latency_stats(t) for name, t in take_turns(predicts, example, iterations, warmup).items()}


def onnx_latency(artifact, model, config: dict, files: dict, example, threads: int, iterations: int):
    """Export the dense and the pruned model with ``engine.onnx.export`` (verified against torch) into a
    temporary directory and time both ONNX Runtime sessions side by side. The exports are not kept:
    ``bigmodel export DIR`` makes the deployable one. Returns ({"before": …, "after": …}, details)."""
    import tempfile

    from ...onnx.export import ExportOptions, export_artifact
    from ...onnx.runtime import open_session, session_predict

    with tempfile.TemporaryDirectory(prefix="bigmodel-prune-") as tmp:
        tmp = Path(tmp)
        pruned = art.save_torch_artifact(tmp / "pruned", model, config=config, stage="prune", parent=artifact,
                                         extra_files=files).path
        options = ExportOptions(weights=False)
        if artifact.has_onnx:  # an exported artifact that kept its weights: time its own ONNX file
            dense_onnx = artifact.path / art.ONNX_FILE
        else:
            dense_onnx = export_artifact(artifact, tmp / "dense-onnx", options, threads=threads).path / art.ONNX_FILE
        result = export_artifact(art.open_artifact(pruned), tmp / "pruned-onnx", options, threads=threads)
        sessions = {"before": open_session(dense_onnx, threads=threads)[0],
                    "after": open_session(result.path / art.ONNX_FILE, threads=threads)[0]}
        timed = side_by_side_latency({k: session_predict(v) for k, v in sessions.items()}, example, iterations)
        provider = sessions["after"].get_providers()[0]
        del sessions
    figures = {k: {f"onnx_{name}": v for name, v in values.items()} for k, values in timed.items()}
    return figures, {"backend": "onnxruntime", "provider": provider, "threads": threads, "exporter": result.exporter,
                     "input_shape": list(example.shape)}


def ratios(before: dict, after: dict) -> dict:
    return {k: after[k] / before[k] for k, v in before.items()
            if k in after and isinstance(v, (int, float)) and not isinstance(v, bool) and v}
