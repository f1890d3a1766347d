"""In-memory classification data: a stratified split, normalization, and numpy preprocessing.

Normalization statistics come from the training split only and are stored in config.json, and
``preprocess`` is plain numpy, so a deployment client with no torch feeds the model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

# Labels are class indices, so the largest one sizes the output layer: a label of 300,000,000 in a
# two-class file would make a head of 300M rows. Real label sets are far smaller.
MAX_CLASSES = 100_000

def preprocess(x: np.ndarray, data_spec: dict) -> np.ndarray:
    """Raw features → what the model eats: float32, normalized with the stored statistics."""
    x = np.asarray(x, dtype=np.float32)
    norm = data_spec.get("normalization") or {}
    if norm:
        mean = np.asarray(norm["mean"], dtype=np.float32)
        std = np.asarray(norm["std"], dtype=np.float32)
        x = (x - mean) / std
    return x.astype(np.float32, copy=False)


def stratified_split(y: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Indices for train/val/test, each class spread proportionally (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(idx) * test))
        n_val = int(round(len(idx) * val))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)) if v else np.array([], dtype=np.int64) for k, v in parts.items()}


def rows_for_one(fraction: float) -> int:
    """The fewest rows of a class for which the split gives ``fraction`` of them at least one row."""
    if not fraction > 0:
        return 0
    n = 1
    while int(round(n * fraction)) < 1:
        n += 1
    return n


def check_labels(y: np.ndarray) -> None:
    """Class indices: not negative, and not so large that the output layer (one row per value up
    to the largest) would be absurd. Call it before anything is sized by the labels."""
    if y.min() < 0:
        raise UserError("labels must be non-negative integers (found a negative label)")
    if int(y.max()) >= MAX_CLASSES:
        raise UserError(f"label {int(y.max()):,} would make a {int(y.max()) + 1:,}-class output layer "
                        f"(bigmodel allows {MAX_CLASSES:,}); number the classes 0, 1, 2, …")


@dataclass
class ClassificationData:
    task = "classification"
    spec: dict
    x: np.ndarray  # raw features, all samples
    y: np.ndarray  # int64 labels
    class_names: list[str]
    splits: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.y) == 0:
            raise UserError(f"dataset {self.spec.get('path', self.spec['name'])} is empty; give it at least one row per class")
        check_labels(self.y)
        split = self.spec.get("split") or {}
        self.splits = stratified_split(self.y, split.get("val", 0.1), split.get("test", 0.1), split.get("seed", 0))
        if len(self.splits["train"]) == 0:
            raise UserError("the training split is empty; give more data or smaller --val/--test fractions")
        if "normalization" not in self.spec:
            train = self.x[self.splits["train"]].astype(np.float64)
            if train.ndim == 2:  # tabular: per feature
                mean, std = train.mean(axis=0), train.std(axis=0)
                std = np.where(std < 1e-8, 1.0, std)
                self.spec["normalization"] = {"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
            else:  # images: one statistic for all pixels
                self.spec["normalization"] = {"mean": round(float(train.mean()), 6), "std": round(float(train.std()) or 1.0, 6)}
        self.spec.update({
            "input_shape": list(self.x.shape[1:]),
            "num_classes": int(max(len(self.class_names), int(self.y.max()) + 1)),
            "class_names": list(self.class_names),
        })

    def check_trainable(self) -> None:
        """A classifier needs two classes to tell apart and a validation split to pick its best
        step by; without them training "succeeded" with a constant model, or failed after the
        first epoch on an empty evaluation."""
        where = self.spec.get("path", self.spec["name"])
        present = np.unique(self.y)
        if len(present) < 2:
            only = self.class_names[int(present[0])] if int(present[0]) < len(self.class_names) else str(int(present[0]))
            raise UserError(f"{where}: every row has the label {only!r}; a classifier needs at least 2 classes")
        if len(self.splits["val"]) == 0:
            val = (self.spec.get("split") or {}).get("val", 0.1)
            raise UserError(f"{where}: {len(self.y)} rows leave the validation split empty (it takes a fraction {val:g} "
                            f"of each class, rounded); give at least {rows_for_one(val)} rows of some class")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return self.spec["num_classes"]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        idx = self.splits[split]
        return preprocess(self.x[idx], self.spec), self.y[idx]

    def model_fit(self) -> dict:
        """Model sizes this data implies, for any architecture."""
        shape = self.input_shape
        fit = {"input_size": int(np.prod(shape)), "num_classes": self.num_classes}
        if len(shape) == 3:
            fit.update(in_channels=shape[0], height=shape[1], width=shape[2])
        elif len(shape) == 2:
            fit.update(in_channels=1, height=shape[0], width=shape[1])
        return fit
