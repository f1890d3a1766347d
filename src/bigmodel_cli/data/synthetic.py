"""Synthetic classification: Gaussian clusters shaped to the model, for tests and quick checks."""

from __future__ import annotations

import numpy as np

from .classification import ClassificationData


def load_synthetic(spec: dict) -> ClassificationData:
    rng = np.random.default_rng(spec.get("seed", 1234))
    shape = tuple(spec["input_shape"])
    classes, n = int(spec["num_classes"]), int(spec.get("samples", 2048))
    centers = rng.normal(0.0, 1.0, size=(classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(0.0, 1.0, size=(n, *shape)).astype(np.float32)
    return ClassificationData(spec=spec, x=x.astype(np.float32), y=y.astype(np.int64),
                              class_names=[f"class{i}" for i in range(classes)])
