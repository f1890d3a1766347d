"""Tabular classification data from the user's files: ``csv:PATH --target COLUMN`` and ``npz:PATH``.

Both are parsed without pickle (csv module; ``np.load(allow_pickle=False)``), and every bad cell is
reported with its line and column.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import UserError
from .classification import ClassificationData, check_labels


def _class_index(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Label strings → indices; numeric labels sort numerically, others alphabetically."""
    unique = sorted(set(values))
    try:
        unique = sorted(unique, key=float)
    except ValueError:
        pass
    lookup = {name: i for i, name in enumerate(unique)}
    return np.array([lookup[v] for v in values], dtype=np.int64), unique


def load_csv(spec: dict) -> ClassificationData:
    path = Path(spec["path"])
    if not path.is_file():
        raise UserError(f"{path}: the CSV file of this dataset is missing; pass --data csv:PATH")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    if not rows or not rows[0]:
        raise UserError(f"{path}: is empty; a CSV needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    target = spec["target"]
    if target not in header:
        raise UserError(f"{path}: no column {target!r} for --target (columns: {', '.join(header)})")
    t = header.index(target)
    features = [i for i in range(len(header)) if i != t]
    if not features:
        raise UserError(f"{path}: has no feature columns besides {target!r}")
    x_rows, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path} line {line_no}: {len(row)} cells but the header has {len(header)}; fix the row")
        values = []
        for i in features:
            cell = row[i].strip()
            try:
                number = float(cell)
            except ValueError:
                raise UserError(
                    f"{path} line {line_no}, column {header[i]!r}: {cell!r} is not a number; "
                    "features must be numeric (encode or drop the column)"
                ) from None
            if not np.isfinite(number):
                raise UserError(f"{path} line {line_no}, column {header[i]!r}: {cell!r} is not finite; fill or drop it")
            values.append(number)
        x_rows.append(values)
        labels.append(row[t].strip())
    if not x_rows:
        raise UserError(f"{path}: has a header but no data rows")
    y, class_names = _class_index(labels)
    spec["feature_names"] = [header[i] for i in features]
    return ClassificationData(spec=spec, x=np.asarray(x_rows, dtype=np.float32), y=y, class_names=class_names)


def memory_budget() -> int:
    """Bytes one in-memory dataset may take: a quarter of the memory this process can have (the
    arrays are copied while being converted and split, and the model needs room too)."""
    import os
    import resource

    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    return limit // 4


def _declared_npz_bytes(path: Path) -> int:
    """What arrays x and y will take once loaded, from their .npy headers alone: a compressed npz
    of a few MB can inflate to gigabytes, and np.load allocates before it reads."""
    import math
    import zipfile

    total = 0
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        for member in ("x.npy", "y.npy"):
            if member not in names:
                continue
            with archive.open(member) as handle:
                try:
                    version = np.lib.format.read_magic(handle)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _fortran, dtype = read(handle)
                except ValueError as exc:
                    raise UserError(f"{path}: {member} is not a NumPy array ({exc}); save the file with numpy.savez") from None
            total += math.prod(shape) * dtype.itemsize
    return total


def load_npz(spec: dict) -> ClassificationData:
    path = Path(spec["path"])
    try:
        declared, budget = _declared_npz_bytes(path), memory_budget()
        if declared > budget:
            raise UserError(f"{path}: its arrays x and y take {declared:,} bytes once loaded, more than the {budget:,} "
                            "bigmodel loads into memory here; use a smaller file (or a text corpus, which is memory-mapped)")
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise UserError(f"{path}: an npz dataset needs arrays named 'x' and 'y' (found: {', '.join(arrays.files)})")
            x, y = arrays["x"], arrays["y"]
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: the npz file of this dataset is missing; pass --data npz:PATH") from None
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise UserError(f"{path}: cannot read without pickle ({exc}); save plain numeric arrays") from None
    except Exception as exc:  # zipfile.BadZipFile, OSError, ...
        raise UserError(f"{path}: not a valid .npz file ({type(exc).__name__}); save it with numpy.savez") from None
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{path}: x must be (N, features...) and y (N,); got x{x.shape} and y{y.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: x must be numeric and y integer class labels (got {x.dtype} and {y.dtype})")
    if len(x) and not np.isfinite(x).all():
        raise UserError(f"{path}: x contains NaN or Inf; clean the data")
    if len(y):
        check_labels(y)  # before one class name is made per label value
    classes = int(y.max()) + 1 if len(y) else 0
    return ClassificationData(spec=spec, x=x.astype(np.float32), y=y.astype(np.int64),
                              class_names=[str(i) for i in range(classes)])
