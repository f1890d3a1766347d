"""The dataset registry: ``--data`` string → a dataset spec (stored in config.json) → a dataset.

Specs are plain dicts so that an artifact re-opens its data (split, normalization, classes) with no
data flags. Two kinds of dataset exist: ``ClassificationData`` (in-memory arrays) and ``TextData``
(memory-mapped bytes for language modelling).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class DatasetKind:
    name: str
    syntax: str
    task: str
    summary: str


DATASETS: dict[str, DatasetKind] = {
    "digits": DatasetKind("digits", "digits", "classification", "1,797 real 8×8 handwritten digits, 10 classes (bundled)"),
    "csv": DatasetKind("csv", "csv:PATH --target COLUMN", "classification", "numeric feature columns and a class column"),
    "npz": DatasetKind("npz", "npz:PATH", "classification", "NumPy arrays x (features or images) and y (integer labels)"),
    "synthetic": DatasetKind("synthetic", "synthetic", "classification", "Gaussian clusters shaped to the model (tests, quick checks)"),
    "text": DatasetKind("text", "text:PATH | text:stdlib", "language-modeling", "byte-level text, memory-mapped; stdlib = this Python's own source"),
}
DEFAULT_SPLIT = {"val": 0.1, "test": 0.1, "seed": 0}
SPLITS = ("train", "val", "test")


def parse_data_arg(value: str, target: str | None = None, **shape_hints) -> dict:
    """'csv:rows.csv' etc. → a dataset spec. ``shape_hints`` size synthetic data to the model."""
    name, _, arg = value.partition(":")
    if name not in DATASETS:
        raise UserError(f"unknown dataset {value!r}; use one of: " + ", ".join(k.syntax for k in DATASETS.values()))
    if name in ("csv", "npz", "text") and not arg:
        raise UserError(f"--data {name} needs a path: {DATASETS[name].syntax}")
    if name == "csv" and not target:
        raise UserError("--data csv:PATH needs --target COLUMN (the class column)")
    if target and name != "csv":
        raise UserError("--target is only for --data csv:PATH")
    spec: dict = {"name": name, "split": dict(DEFAULT_SPLIT)}
    if name in ("csv", "npz"):
        path = Path(arg)
        if not path.is_file():
            raise UserError(f"--data {value}: {path} does not exist")
        spec["path"] = str(path.resolve())
    if name == "csv":
        spec["target"] = target
    if name == "text":
        spec["path"] = arg if arg == "stdlib" else str(Path(arg).resolve())
        spec["split"] = {"val": 0.05, "test": 0.05}
    if name == "synthetic":
        spec.update({"input_shape": list(shape_hints.get("input_shape") or [16]),
                     "num_classes": int(shape_hints.get("num_classes") or 4), "samples": 2048})
    return spec


def load_dataset(spec: dict):
    """A dataset spec (from the CLI or config.json) → ClassificationData or TextData."""
    name = spec.get("name")
    if name == "digits":
        from .digits import load_digits

        return load_digits(spec)
    if name == "csv":
        from .tabular import load_csv

        return load_csv(spec)
    if name == "npz":
        from .tabular import load_npz

        return load_npz(spec)
    if name == "synthetic":
        from .synthetic import load_synthetic

        return load_synthetic(spec)
    if name == "text":
        from .text import load_text

        return load_text(spec)
    raise UserError(f"unknown dataset {name!r} in the data spec; known: {', '.join(DATASETS)}")
