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
    "text": DatasetKind("text", "text:PATH | text:stdlib", "language-modeling", "text, memory-mapped: bytes, or the model's tokenizer; stdlib = this Python's own source"),
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
    if _reads_user_path(spec):
        spec["fingerprint"] = data_fingerprint(spec)
    if name == "synthetic":
        spec.update({"input_shape": list(shape_hints.get("input_shape") or [16]),
                     "num_classes": int(shape_hints.get("num_classes") or 4), "samples": 2048})
    return spec


# A data path in config.json is the path of the data the model was trained on, and
# ``bigmodel eval ARTIFACT`` re-opens it with no flags. config.json could name any file, though,
# so the path is read only if it still holds the data recorded at training: each file's name,
# size, and first and last MiB (cheap for a corpus of any size). Anything else needs --data.
_FINGERPRINT_EDGE = 1 << 20


def _reads_user_path(spec: dict) -> bool:
    return spec.get("name") in ("csv", "npz", "text") and spec.get("path") not in (None, "stdlib")


def data_fingerprint(spec: dict) -> str:
    """sha256 over the data a spec's path holds (see _FINGERPRINT_EDGE); "" when nothing is there."""
    import hashlib

    root = Path(spec["path"])
    if spec["name"] == "text" and root.is_dir():
        from .text import corpus_files

        files = corpus_files(str(root))
    else:
        files = [root] if root.is_file() else []
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix() if file != root else ''}\0{size}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_EDGE))
            if size > 2 * _FINGERPRINT_EDGE:
                handle.seek(size - _FINGERPRINT_EDGE)
                digest.update(handle.read(_FINGERPRINT_EDGE))
    return digest.hexdigest() if files else ""


def check_recorded_path(spec: dict) -> None:
    """Refuse to read a data path that config.json names unless it holds the data recorded there."""
    if not _reads_user_path(spec) or not Path(spec["path"]).exists():
        return  # no path to read, or the loader says it is missing
    recorded = spec.get("fingerprint")
    if not isinstance(recorded, str) or recorded != data_fingerprint(spec):
        raise UserError(f"{spec['path']}: is not the {spec['name']} data this artifact was trained on (no matching "
                        f"fingerprint in config.json), so it is not read; pass --data {spec['name']}:PATH to use it")


def load_dataset(spec: dict, tokenizer=None):
    """A dataset spec (from the CLI or config.json) → ClassificationData or TextData; text is read
    through ``tokenizer`` (data/tokenizer.py) when one is given, else as bytes."""
    check_recorded_path(spec)
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

        return load_text(spec, tokenizer)
    raise UserError(f"unknown dataset {name!r} in the data spec; known: {', '.join(DATASETS)}")
