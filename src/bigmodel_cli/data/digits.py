"""The bundled digits: 1,797 real 8×8 handwritten digits (UCI, via scikit-learn; see docs/data.md)."""

from __future__ import annotations

from importlib import resources

import numpy as np

from .classification import ClassificationData


def load_digits(spec: dict) -> ClassificationData:
    with resources.files(__package__).joinpath("digits.npz").open("rb") as handle:
        arrays = np.load(handle, allow_pickle=False)
        x, y = arrays["x"].astype(np.float32)[:, None, :, :], arrays["y"].astype(np.int64)
    return ClassificationData(spec=spec, x=x, y=y, class_names=[str(i) for i in range(10)])
