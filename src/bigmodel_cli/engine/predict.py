"""``bigmodel predict``: a classifier's class, probabilities and top-k for inputs read from a file.

Inputs are raw features, in the units of the training data; they are normalized with the
statistics stored in config.json (``data.classification.preprocess``), exactly as in training,
so the same file gives the same answer on PyTorch and on ONNX Runtime.

Accepted files: ``.npy`` (one sample or a batch; read without pickle), ``.csv`` (one sample per
row; a header row is optional and, when it names the training features, selects and orders them)
and images for image models: ``.png`` (read by matplotlib, values in [0, 1]) and ``.pgm``/``.pnm``
(binary or text netpbm, values divided by their maximum). Images must already have the model's
height and width; ``image_scale`` maps [0, 1] to the training data's range (16 for the bundled
digits).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from ..config import is_finite_number
from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".pgm", ".pnm")
SUFFIXES = (".npy", ".csv", *IMAGE_SUFFIXES)


@dataclass
class PredictOptions:
    top_k: int = 3
    image_scale: float = 1.0
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None


def _shape_text(shape) -> str:
    return "×".join(str(s) for s in shape)


def fit_to_input_shape(x: np.ndarray, input_shape: tuple[int, ...], source: str) -> np.ndarray:
    """One sample or a batch of samples, in any layout with the right number of values per sample,
    → (N, *input_shape)."""
    per_sample = int(np.prod(input_shape))
    if tuple(x.shape) == input_shape:
        return x.reshape(1, *input_shape)
    if x.ndim >= 2 and int(np.prod(x.shape[1:])) == per_sample:  # a batch: (N, 64), (N, 8, 8), (N, 1, 8, 8)
        return x.reshape(len(x), *input_shape)
    if x.size == per_sample:  # one sample in another layout: (8, 8), (64,)
        return x.reshape(1, *input_shape)
    raise UserError(f"{source}: has shape {_shape_text(x.shape)} but the model takes samples of {_shape_text(input_shape)} "
                    f"({per_sample} values); give one sample or a batch N×{_shape_text(input_shape)}")


def _read_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays would need pickle, which we refuse
        raise UserError(f"{path}: cannot be read without pickle ({exc}); save a plain numeric array with numpy.save") from None
    except Exception as exc:
        raise UserError(f"{path}: not a valid .npy file ({type(exc).__name__}); save it with numpy.save") from None
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.number):
        raise UserError(f"{path}: must hold a numeric array (got {getattr(x, 'dtype', type(x).__name__)})")
    return x.astype(np.float32)


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(path: Path, data_spec: dict) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [(n, r) for n, r in enumerate(csv.reader(handle), start=1) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    if not rows:
        raise UserError(f"{path}: is empty; give one sample per row")
    columns = None
    if any(_number(c.strip()) is None for c in rows[0][1]):  # a header row
        header = [c.strip() for c in rows[0][1]]
        rows = rows[1:]
        wanted = data_spec.get("feature_names")
        if wanted:
            missing = [name for name in wanted if name not in header]
            if missing:
                raise UserError(f"{path}: the header lacks the feature column(s) {', '.join(missing[:5])} the model was trained on")
            columns = [header.index(name) for name in wanted]  # the target column, if present, is ignored
    values = []
    for line_no, row in rows:
        cells = [row[i] if i < len(row) else "" for i in columns] if columns is not None else row
        numbers = [_number(c.strip()) for c in cells]
        if any(n is None or not np.isfinite(n) for n in numbers):
            bad = next(c for c, n in zip(cells, numbers) if n is None or not np.isfinite(n))
            raise UserError(f"{path} line {line_no}: {bad.strip()!r} is not a finite number; features must be numeric")
        values.append(numbers)
    if not values:
        raise UserError(f"{path}: has a header but no data rows")
    widths = {len(v) for v in values}
    if len(widths) != 1:
        raise UserError(f"{path}: rows have different numbers of values ({', '.join(map(str, sorted(widths)))})")
    return np.asarray(values, dtype=np.float32)


def _read_pgm(path: Path) -> np.ndarray:
    """Netpbm greyscale (P2 text, P5 binary), values divided by their maximum."""
    data = path.read_bytes()
    tokens, pos = [], 0
    while len(tokens) < 4:  # magic, width, height, maxval; '#' starts a comment
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise UserError(f"{path}: truncated netpbm header; save the image as PNG or PGM")
        tokens.append(data[start:pos].decode("ascii", "replace"))
    magic, width, height, maxval = tokens[0], *(int(t) if t.isdigit() else -1 for t in tokens[1:])
    if magic not in ("P2", "P5") or min(width, height, maxval) < 1:
        raise UserError(f"{path}: not a greyscale PGM (P2/P5) image; save the image as PNG or PGM")
    count = width * height
    if magic == "P5":
        dtype = np.uint8 if maxval < 256 else np.dtype(">u2")
        raw = np.frombuffer(data[pos + 1:pos + 1 + count * np.dtype(dtype).itemsize], dtype=dtype)
    else:
        raw = np.array(data[pos:].split()[:count], dtype=np.float64)
    if raw.size != count:
        raise UserError(f"{path}: holds {raw.size} pixels but its header says {width}×{height}")
    return (raw.astype(np.float32) / maxval).reshape(height, width)


def _read_image(path: Path, input_shape: tuple[int, ...], scale: float) -> np.ndarray:
    if len(input_shape) not in (2, 3):
        raise UserError(f"{path}: the model takes {_shape_text(input_shape)} feature vectors, not images; give a .npy or .csv file")
    channels = input_shape[0] if len(input_shape) == 3 else 1
    height, width = input_shape[-2:]
    if path.suffix.lower() == ".png":
        from matplotlib import image as mpimg

        try:
            pixels = np.asarray(mpimg.imread(path), dtype=np.float32)
        except Exception as exc:  # PIL/matplotlib raise several types for a bad file
            raise UserError(f"{path}: not a readable PNG image ({type(exc).__name__}: {exc})") from None
        if pixels.max(initial=0) > 1.0:  # 16-bit or integer PNGs come back unscaled
            pixels = pixels / (65535.0 if pixels.max() > 255 else 255.0)
    else:
        pixels = _read_pgm(path)
    if pixels.ndim == 3:
        pixels = pixels[..., :3]  # drop alpha
        if channels == 1:
            pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma
        else:
            pixels = np.moveaxis(pixels, -1, 0)
    elif channels == 3:
        pixels = np.repeat(pixels[None], 3, axis=0)
    if pixels.shape[-2:] != (height, width):
        raise UserError(f"{path}: is {pixels.shape[-1]}×{pixels.shape[-2]} pixels but the model takes {width}×{height}; "
                        "resize the image first")
    return (pixels * scale).reshape(1, *input_shape)


def read_inputs(path: Path | str, data_spec: dict, image_scale: float = 1.0) -> np.ndarray:
    """A file → raw samples of shape (N, *input_shape), not yet normalized."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a .npy, .csv or image file")
    input_shape = tuple(int(s) for s in data_spec.get("input_shape") or ())
    if not input_shape:
        raise UserError("the artifact's config.json gives no input_shape; re-create the artifact")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = _read_npy(path)
    elif suffix == ".csv":
        x = _read_csv(path, data_spec)
    elif suffix in IMAGE_SUFFIXES:
        return _read_image(path, input_shape, image_scale)
    else:
        raise UserError(f"{path}: unsupported input {suffix or '(no suffix)'}; give one of {', '.join(SUFFIXES)}")
    if x.size == 0:
        raise UserError(f"{path}: holds no values")
    if not np.isfinite(x).all():
        raise UserError(f"{path}: contains NaN or Inf; clean the input")
    return fit_to_input_shape(x, input_shape, str(path))


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
    if not (is_finite_number(options.image_scale) and options.image_scale > 0):
        raise UserError(f"--image-scale must be a finite positive number, got {options.image_scale}")
    raw = read_inputs(input_path, artifact.data_spec, options.image_scale)
    runner = open_backend(artifact, options.backend, options.device, options.threads)
    probs = softmax(runner.predict(preprocess(raw, artifact.data_spec)))
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
            "samples": len(predictions), "predictions": predictions}
