"""Where an artifact runs: PyTorch or ONNX Runtime, behind one ``predict`` interface.

A backend turns a numpy batch into numpy logits. Evaluation, benchmarking, prediction and
generation take a backend, so both runtimes are measured by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..artifact import ONNX_FILE, Artifact
from ..errors import UserError

BACKENDS = ("auto", "torch", "onnx")


@dataclass
class Backend:
    name: str  # "torch" or "onnx"
    predict: Callable[[np.ndarray], np.ndarray]
    device: str
    threads: int
    detail: dict = field(default_factory=dict)  # e.g. the ONNX Runtime provider actually used
    model: object = None  # the torch module, when there is one


def torch_backend(artifact: Artifact, device: str = "cpu", threads: int | None = None, precision: str = "fp32") -> Backend:
    from .core import hardware
    from .core.tasks import torch_predict

    threads = hardware.set_threads(threads)
    device = hardware.resolve_device(device)
    model = artifact.build_model().to(device)
    return Backend("torch", torch_predict(model, device, precision), device, threads,
                   {"precision": precision}, model=model)


def onnx_backend(artifact: Artifact, device: str = "cpu", threads: int | None = None) -> Backend:
    """ONNX Runtime on an artifact's ``model.onnx`` (exported or quantized alike).

    ``detail`` records the provider ONNX Runtime actually chose (CUDA may fall back to CPU for a
    session it cannot place), and the graph's input shape so callers can respect fixed dimensions.
    """
    from .onnx.runtime import CUDA_PROVIDER, open_session, session_predict, session_signature

    session, threads = open_session(artifact.path / ONNX_FILE, device=device, threads=threads)
    provider = session.get_providers()[0]
    signature = session_signature(session)
    onnx_meta = artifact.config.get("onnx") or {}
    detail = {"provider": provider, "input_shape": signature["inputs"][0]["shape"]}
    if onnx_meta.get("dtype"):
        detail["onnx_dtype"] = onnx_meta["dtype"]
    used = "cuda" if provider == CUDA_PROVIDER else "cpu"
    backend = Backend("onnx", session_predict(session), used, threads, detail)
    backend.model = session  # the session, for callers that need more than predict()
    return backend


def open_backend(artifact: Artifact, backend: str = "auto", device: str = "cpu", threads: int | None = None) -> Backend:
    """``auto`` prefers ONNX Runtime when the artifact has an ONNX model, else PyTorch."""
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "onnx" if artifact.has_onnx else "torch"
    if backend == "onnx":
        if not artifact.has_onnx:
            raise UserError(f"{artifact.path}: has no model.onnx; export it first (bigmodel export {artifact.path} --out DIR)")
        return onnx_backend(artifact, device=device, threads=threads)
    if not artifact.has_weights:
        raise UserError(f"{artifact.path}: is ONNX-only; use --backend onnx (or the PyTorch parent for --backend torch)")
    return torch_backend(artifact, device=device, threads=threads)
