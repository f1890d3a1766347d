"""``bigmodel predict``: a classifier's class, probabilities and top-k for inputs read from a file.

Inputs are raw features, in the units of the training data, read by ``engine.inputs`` (the reader
``bigmodel explain`` uses too, so one file means the same samples to both); they are normalized with
the statistics stored in config.json (``data.classification.preprocess``), exactly as in training,
so the same file gives the same answer on PyTorch and on ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from ..errors import UserError
from .inputs import read_inputs


@dataclass
class PredictOptions:
    top_k: int = 3
    pixel_max: float | None = None  # image files: raw value of a white pixel; None = 16 for digits, else 255
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict_file(artifact: Artifact, input_path: Path | str, options: PredictOptions | None = None) -> dict:
    """Class, probabilities and top-k for every sample in ``input_path``."""
    from ..data.classification import preprocess
    from .backends import open_backend

    options = options or PredictOptions()
    if artifact.task != "classification":
        raise UserError(f"{artifact.path}: is a language model; use bigmodel generate {artifact.path} --prompt TEXT")
    if options.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {options.top_k}")
    inputs = read_inputs(input_path, artifact.data_spec, options.pixel_max)
    runner = open_backend(artifact, options.backend, options.device, options.threads)
    probs = softmax(runner.predict(preprocess(inputs.samples, artifact.data_spec)))
    names = list(artifact.data_spec.get("class_names") or [])
    names += [str(i) for i in range(len(names), probs.shape[-1])]
    k = min(options.top_k, probs.shape[-1])
    predictions = []
    for i, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")[:k]
        predictions.append({
            "index": i, "class_index": int(order[0]), "class": names[order[0]], "probability": float(p[order[0]]),
            "top_k": [{"class_index": int(c), "class": names[c], "probability": float(p[c])} for c in order],
            "probabilities": [float(v) for v in p],
        })
    return {"artifact": str(artifact.path), "input": str(input_path), "backend": runner.name, "device": runner.device,
            **({"provider": runner.detail["provider"]} if "provider" in runner.detail else {}),
            **inputs.to_dict(), "predictions": predictions}
