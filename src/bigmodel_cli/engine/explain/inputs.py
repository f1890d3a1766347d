"""Inputs for ``bigmodel explain``: files named on the command line (.npy, .npz, .csv, PNG/JPEG),
prompts, rows of the artifact's own data, and the blurred-image baseline.

Inputs are returned *raw*, in the units of the training data (digits: 0–16 ink), so two artifacts
compared on one input each apply their own stored normalization. Nothing here unpickles:
``np.load(allow_pickle=False)``, the csv module, and matplotlib's PNG reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...artifact import Artifact
from ...data import SPLITS
from ...errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INPUT_SUFFIXES = (".npy", ".npz", ".csv", *IMAGE_SUFFIXES)


def shape_text(shape) -> str:
    return "×".join(str(int(d)) for d in shape)


def default_pixel_max(spec: dict) -> float:
    # The bundled digits are 0–16 ink intensities; other image data is usually 8-bit.
    return 16.0 if spec.get("name") == "digits" else 255.0


def _fit_shape(arr: np.ndarray, shape: tuple[int, ...], row: int | None, where: str) -> np.ndarray:
    """One sample of ``shape`` from an array that is one sample or a batch (axes of size 1 tolerated)."""
    core = tuple(d for d in shape if d != 1)
    if tuple(d for d in arr.shape if d != 1) == core and arr.size == int(np.prod(shape)):
        if row not in (None, 0):
            raise UserError(f"{where}: holds one sample, so --row {row} does not exist; drop --row")
        return arr.reshape(shape)
    if arr.ndim >= 2 and tuple(d for d in arr.shape[1:] if d != 1) == core:
        row = 0 if row is None else row
        if not 0 <= row < arr.shape[0]:
            raise UserError(f"{where}: has {arr.shape[0]} samples; --row must be 0–{arr.shape[0] - 1}")
        return arr[row].reshape(shape)
    raise UserError(f"{where}: shape {shape_text(arr.shape)} does not fit the model's input {shape_text(shape)}; give one "
                    f"sample of shape {shape_text(shape)} (or N×{shape_text(shape)} with --row)")


def _numeric(arr: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise UserError(f"{where}: holds {arr.dtype} values; give real numbers")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise UserError(f"{where}: contains NaN or Inf; give finite values")
    return arr


def _read_csv(path: Path, feature_names: list[str] | None) -> np.ndarray:
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    if not rows:
        raise UserError(f"{path}: is empty; give a header row (optional) and at least one row of numbers")

    def number(cell: str) -> float | None:
        try:
            return float(cell)
        except ValueError:
            return None

    header = None if all(number(c) is not None for c in rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header else rows
    columns = list(range(len(rows[0])))
    if header and feature_names:
        missing = [n for n in feature_names if n not in header]
        if missing:
            raise UserError(f"{path}: has no column(s) {', '.join(missing)} that the model was trained on; "
                            f"its header is {', '.join(header)}")
        columns = [header.index(n) for n in feature_names]  # extra columns (such as the label) are ignored
    values = []
    for line, row in enumerate(body, start=2 if header else 1):
        cells = []
        for i in columns:
            value = number(row[i]) if i < len(row) else None
            if value is None:
                name = header[i] if header else f"{i + 1}"
                raise UserError(f"{path} line {line}, column {name}: {row[i] if i < len(row) else ''!r} is not a number")
            cells.append(value)
        values.append(cells)
    if not values:
        raise UserError(f"{path}: has a header but no rows of numbers")
    return np.asarray(values, dtype=np.float64)


def _read_image(path: Path, shape: tuple[int, ...], pixel_max: float) -> np.ndarray:
    import matplotlib.image as mpimg

    try:
        img = np.asarray(mpimg.imread(path))
    except Exception as exc:  # PIL / libpng errors for a broken or foreign file
        raise UserError(f"{path}: cannot read the image ({type(exc).__name__}); give a PNG or JPEG file") from None
    img = img.astype(np.float64) / (255.0 if img.dtype == np.uint8 else 1.0)  # PNG reads as 0–1 floats
    if img.ndim == 3:
        img = img[..., :3]  # drop alpha
    channels, (height, width) = (shape[0] if len(shape) == 3 else 1), shape[-2:]
    if img.shape[:2] != (height, width):
        raise UserError(f"{path}: the image is {img.shape[1]}×{img.shape[0]} pixels but the model takes "
                        f"{width}×{height}; resize it to {width}×{height}")
    if channels == 1:
        img = img.mean(axis=2) if img.ndim == 3 else img
        img = img[None]
    elif channels == 3:
        img = np.stack([img] * 3) if img.ndim == 2 else img.transpose(2, 0, 1)
    else:
        raise UserError(f"{path}: the model takes {channels}-channel inputs; give them as a .npy array instead of an image")
    return (img * pixel_max).reshape(shape)


def _read_numpy(path: Path, suffix: str) -> np.ndarray:
    """The inputs in a .npy file, or in a .npz file's 'x' (or only) array. An .npz member is read
    only when it is accessed, so reading it is inside the same error handling as opening the file."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if suffix != ".npz":
            return loaded
        with loaded:
            names = list(loaded.files)
            if "x" not in names and len(names) != 1:
                raise UserError(f"{path}: holds several arrays ({', '.join(names)}); name the inputs 'x'")
            return loaded["x" if "x" in names else names[0]]
    except UserError:
        raise
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise UserError(f"{path}: cannot read without pickle ({exc}); save plain numeric arrays") from None
    except Exception as exc:  # truncated, not a zip, a damaged member
        raise UserError(f"{path}: not a valid {suffix} file ({type(exc).__name__}); save it with numpy") from None


def read_input(spec: dict, kind: str, source: str, row: int | None = None, pixel_max: float | None = None) -> np.ndarray:
    """A file named on the command line → one raw input (the units the training data was in) for a
    model of input ``kind`` (image or tabular) whose data spec is ``spec``."""
    shape = tuple(int(d) for d in spec["input_shape"])
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{source}: no such file; give a {', '.join(INPUT_SUFFIXES)} file, or --data SPLIT")
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise UserError(f"{path}: unknown input type {suffix or '(no suffix)'}; give one of {', '.join(INPUT_SUFFIXES)}")
    if suffix in IMAGE_SUFFIXES:
        if kind != "image":
            raise UserError(f"{path}: image files are for image models; this model takes {shape_text(shape)} "
                            "features, give a .csv, .npy or .npz row")
        if row is not None:
            raise UserError(f"{path}: an image is one sample; drop --row")
        return _read_image(path, shape, pixel_max or default_pixel_max(spec))
    if suffix == ".csv":
        arr = _read_csv(path, spec.get("feature_names"))
    else:
        arr = _read_numpy(path, suffix)
    return _fit_shape(_numeric(np.asarray(arr), str(path)), shape, row, str(path))


def read_prompt(text: str, context: int | None) -> np.ndarray:
    """A prompt → byte token ids, checked against the model's context length."""
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if len(ids) == 0:
        raise UserError("the prompt is empty; give some text to explain the next-token prediction of")
    if context and len(ids) > int(context):
        raise UserError(f"the prompt has {len(ids)} tokens (bytes) but the model's context is {context}; shorten it")
    return ids


def dataset_inputs(artifact: Artifact, split: str, count: int, first: int = 0) -> list[np.ndarray]:
    """``count`` raw inputs from the artifact's own data split, from position ``first`` on: images or
    rows as stored (before normalization), or windows of byte tokens for language models."""
    from ..core.datasets import open_data

    if split not in SPLITS:
        raise UserError(f"unknown --data {split!r}; choose one of {', '.join(SPLITS)} (the artifact's own data)")
    if first < 0:
        raise UserError(f"--row must be 0 or more, got {first}")
    data = open_data(artifact)
    if artifact.task == "language-modeling":
        block = int(artifact.data_spec.get("block_size") or 128)
        starts = data.eval_starts(split, block, first + count)
        if len(starts) <= first:
            raise UserError(f"the {split} split has {len(starts)} windows of {block} bytes; ask for fewer")
        x, _ = data.windows(starts[first:first + count], block)
        return [w for w in x.numpy()]
    raw = data.x[data.splits[split]]
    if len(raw) <= first:
        raise UserError(f"the {split} split has {len(raw)} samples; --row must be below that")
    return [np.asarray(r, dtype=np.float64) for r in raw[first:first + count]]


def gaussian_blur(image: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Blur the last two axes (H, W) with a separable Gaussian; sigma defaults to a quarter of the image."""
    h, w = image.shape[-2:]
    sigma = sigma or max(h, w) / 4.0
    out = np.asarray(image, dtype=np.float64)
    for axis, size in ((-2, h), (-1, w)):
        radius = max(1, min(size - 1, int(3 * sigma)))
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return out
