"""The one reader of user input files for ``bigmodel predict`` and ``bigmodel explain``: the same
file gives the same raw samples to both commands.

Accepted files:

- ``.npy`` (one array) and ``.npz`` (its ``x`` array, or its only one), read without pickle; the
  sizes their headers declare are checked before anything is allocated;
- ``.csv`` (one sample per row; a header row is optional and, when it names the training features,
  selects and orders them) and ``.txt`` (numbers separated by spaces or commas, one sample per
  line, ``#`` starts a comment);
- images, for image models: ``.png``, ``.jpg``/``.jpeg`` (read by Pillow, values divided by their
  type's maximum: 255, or 65535 for 16-bit PNGs) and ``.pgm``/``.pnm`` (netpbm greyscale, binary or
  text, divided by their header's maximum). An image is one sample at the model's height and width
  (never resized); RGB becomes greyscale by ITU-R 601 luma for 1-channel models and channels-first
  for 3-channel ones. Its values in [0, 1] are multiplied by ``pixel_max``, the raw value of a white
  pixel in the training data (default 16 for the bundled digits, 255 for other data).

Samples come back *raw*, in the units of the training data, as float32 of shape (N, *input_shape):
each command applies the artifact's stored normalization itself. Any array whose per-sample size
matches is fitted: a batch (N, 64) or (N, 8, 8), or one sample in another layout, such as a flat
vector of 64 values for a 1×8×8 image model; ``Inputs.read_as`` keeps the shape the file held, so
the commands can show how it was read.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import is_finite_number
from ..data.tabular import memory_budget
from ..errors import UserError

ARRAY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".csv", ".txt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".pnm")
SUFFIXES = (*ARRAY_SUFFIXES, *TEXT_SUFFIXES, *IMAGE_SUFFIXES)
# Text and netpbm files are parsed into Python objects first (tens of bytes per number), so their
# size is capped; larger batches belong in a .npy file, which is read straight into an array.
MAX_TEXT_BYTES = 8 * 1024 * 1024
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601: the weights of Pillow's convert("L")


@dataclass(frozen=True)
class Inputs:
    """Raw samples read from one file."""

    samples: np.ndarray  # (N, *input_shape), float32, not yet normalized
    read_as: tuple[int, ...]  # the shape the file held (an image: H×W or H×W×C)
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape[1:])

    def to_dict(self) -> dict:
        return {"read_as": list(self.read_as), "input_shape": list(self.input_shape), "samples": len(self.samples)}

    def row(self, index: int | None) -> np.ndarray:
        """One sample (``--row``; the first when None), as float64 for attribution arithmetic."""
        count = len(self.samples)
        if index is not None and count == 1 and index != 0:
            raise UserError(f"{self.source}: holds one sample, so --row {index} does not exist; drop --row")
        index = 0 if index is None else index
        if not 0 <= index < count:
            raise UserError(f"{self.source}: has {count} samples; --row must be 0–{count - 1}")
        return self.samples[index].astype(np.float64)


def shape_text(shape) -> str:
    return "×".join(str(int(d)) for d in shape)


def default_pixel_max(spec: dict) -> float:
    # The bundled digits are 0–16 ink intensities; other image data is usually 8-bit.
    return 16.0 if spec.get("name") == "digits" else 255.0


def pixel_max_problem(value: float | None, flag: str = "--pixel-max") -> str | None:
    """What is wrong with a --pixel-max value (given as ``flag``), or None."""
    # pixels are float32: a larger value would turn white into inf
    if value is not None and not (is_finite_number(value) and 0 < value <= float(np.finfo(np.float32).max)):
        return f"{flag} must be a finite positive number (at most 3.4e38), got {value}"
    return None


def read_inputs(path: Path | str, spec: dict, pixel_max: float | None = None) -> Inputs:
    """A file → raw samples for a model whose data spec is ``spec``; ``pixel_max`` (None: the
    default for the data) is the raw value of a white pixel in image files."""
    problem = pixel_max_problem(pixel_max)
    if problem:
        raise UserError(problem)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a {', '.join(SUFFIXES)} file")
    input_shape = tuple(int(d) for d in spec.get("input_shape") or ())
    if not input_shape:
        raise UserError("the artifact's config.json gives no input_shape; re-create the artifact")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        pixels = _read_image(path, input_shape)
        scale = pixel_max if pixel_max is not None else default_pixel_max(spec)
        return Inputs(_image_sample(pixels, input_shape, path) * np.float32(scale), tuple(pixels.shape), str(path))
    if suffix in ARRAY_SUFFIXES:
        x = _numeric(_read_numpy(path, suffix), path)
    elif suffix in TEXT_SUFFIXES:
        x = _read_text(path, spec.get("feature_names"), csv_file=suffix == ".csv")
    else:
        raise UserError(f"{path}: unsupported input {suffix or '(no suffix)'}; give one of {', '.join(SUFFIXES)}")
    if x.size == 0:
        raise UserError(f"{path}: holds no values")
    return Inputs(fit_to_input_shape(x, input_shape, str(path)), tuple(x.shape), str(path))


def fit_to_input_shape(x: np.ndarray, input_shape: tuple[int, ...], source: str) -> np.ndarray:
    """One sample or a batch of samples, in any layout with the right number of values per sample,
    → (N, *input_shape)."""
    per_sample = math.prod(input_shape)
    if tuple(x.shape) == input_shape:
        return x.reshape(1, *input_shape)
    if x.ndim >= 2 and math.prod(x.shape[1:]) == per_sample:  # a batch: (N, 64), (N, 8, 8), (N, 1, 8, 8)
        return x.reshape(len(x), *input_shape)
    if x.size == per_sample:  # one sample in another layout: (8, 8), (64,)
        return x.reshape(1, *input_shape)
    raise UserError(f"{source}: shape {shape_text(x.shape)} does not fit the model, which takes samples of "
                    f"{shape_text(input_shape)} ({per_sample} values); give one sample or a batch N×{shape_text(input_shape)}")


# --------------------------------------------------------------------------- arrays


def _numeric(x: np.ndarray, path: Path) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UserError(f"{path}: holds {x.dtype} values; save an array of real numbers")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{path}: contains NaN or Inf (or values too large for float32); clean the input")
    return x


def _declared_bytes(handle) -> int:
    """What the .npy array at ``handle`` will take once loaded, from its header alone."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(handle)
    return math.prod(shape) * dtype.itemsize


def _check_declared(path: Path, declared: int, available: int | None) -> None:
    """np.load allocates what the header declares before reading: refuse a size the file cannot
    hold (``available``: the bytes after the header) or memory cannot take."""
    if available is not None and declared > available:
        raise UserError(f"{path}: is truncated: its header declares {declared:,} bytes of data but the file holds "
                        f"{available:,}; save it again with numpy.save")
    budget = memory_budget()
    if declared > budget:
        raise UserError(f"{path}: its array takes {declared:,} bytes once loaded, more than the {budget:,} bytes "
                        "bigmodel loads into memory here; give fewer samples per file")


def _read_numpy(path: Path, suffix: str) -> np.ndarray:
    """The array in a .npy file, or in a .npz file's 'x' (or only) member; sizes checked first."""
    import zipfile

    try:
        if suffix == ".npy":
            with open(path, "rb") as handle:
                declared = _declared_bytes(handle)
                _check_declared(path, declared, path.stat().st_size - handle.tell())
            return np.load(path, allow_pickle=False)
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".npy")]
            if not names:
                raise UserError(f"{path}: holds no arrays; save the inputs with numpy.savez(path, x=inputs)")
            if "x.npy" not in names and len(names) != 1:
                raise UserError(f"{path}: holds several arrays ({', '.join(n[:-4] for n in names)}); "
                                "name the inputs 'x'")
            member = "x.npy" if "x.npy" in names else names[0]
            with archive.open(member) as handle:  # a compressed member may inflate far beyond the file
                _check_declared(path, _declared_bytes(handle), None)
        with np.load(path, allow_pickle=False) as arrays:
            return arrays[member[:-4]]
    except UserError:
        raise
    except ValueError as exc:  # object arrays need pickle, which is refused; a bad header
        raise UserError(f"{path}: cannot be read without pickle ({exc}); save a plain numeric array with numpy.save") from None
    except Exception as exc:  # truncated, not a zip, a damaged member
        raise UserError(f"{path}: not a valid {suffix} file ({type(exc).__name__}); save it with numpy") from None


# --------------------------------------------------------------------------- text


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _text_rows(path: Path, csv_file: bool) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank line."""
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise UserError(f"{path}: is {size:,} bytes; text inputs may be up to {MAX_TEXT_BYTES:,}, "
                        "save larger batches with numpy.save as .npy")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            if csv_file:
                rows = list(enumerate(csv.reader(handle), start=1))
            else:
                rows = [(n, [c for c in re.split(r"[\s,]+", line.split("#", 1)[0].strip()) if c])
                        for n, line in enumerate(handle, start=1)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable UTF-8 text file ({exc})") from None
    return [(n, [c.strip() for c in r]) for n, r in rows if r and any(c.strip() for c in r)]


def _read_text(path: Path, feature_names: list[str] | None, csv_file: bool) -> np.ndarray:
    rows = _text_rows(path, csv_file)
    if not rows:
        raise UserError(f"{path}: is empty; give one sample per line")
    header, columns = None, None
    if csv_file and any(_number(c) is None for c in rows[0][1]):  # a header row
        header, rows = rows[0][1], rows[1:]
        if feature_names:
            missing = [name for name in feature_names if name not in header]
            if missing:
                raise UserError(f"{path}: the header lacks the feature column(s) {', '.join(missing[:5])} "
                                "the model was trained on")
            columns = [header.index(name) for name in feature_names]  # other columns (the label) are ignored
    values = []
    for line_no, row in rows:
        cells = [row[i] if i < len(row) else "" for i in columns] if columns is not None else row
        numbers = [_number(c) for c in cells]
        for i, (cell, n) in enumerate(zip(cells, numbers)):
            if n is None or not math.isfinite(n):
                column = header[columns[i] if columns is not None else i] if header and i < len(header) else str(i + 1)
                raise UserError(f"{path} line {line_no}, column {column}: {cell!r} is not a finite number; "
                                "features must be numeric")
        values.append(numbers)
    if not values:
        raise UserError(f"{path}: has a header but no data rows")
    widths = {len(v) for v in values}
    if len(widths) != 1:
        raise UserError(f"{path}: rows have different numbers of values ({', '.join(map(str, sorted(widths)))})")
    x = np.asarray(values, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{path}: holds values too large for float32; scale the input")
    return x


# --------------------------------------------------------------------------- images


def _check_size(path: Path, width: int, height: int, input_shape: tuple[int, ...]) -> None:
    """Before any pixel is decoded: an image has the model's size (a huge header costs nothing)."""
    if len(input_shape) not in (2, 3):
        raise UserError(f"{path}: the model takes feature vectors of {shape_text(input_shape)}, not images; "
                        "give a .npy, .npz, .csv or .txt file")
    want_h, want_w = input_shape[-2:]
    if (height, width) != (want_h, want_w):
        raise UserError(f"{path}: is {width}×{height} pixels but the model takes {want_w}×{want_h}; resize the image first")


def _read_image(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """Pixels in [0, 1]: H×W (greyscale) or H×W×3."""
    if path.suffix.lower() in (".pgm", ".pnm"):
        return _read_pgm(path, input_shape)
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns about huge headers on stderr; the size check refuses them anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_size(path, img.width, img.height, input_shape)
                return _pixels(img)
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({type(exc).__name__}: {exc}); save it as PNG") from None


def _pixels(img) -> np.ndarray:
    """A Pillow image → its pixels in [0, 1], H×W or H×W×3."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    if img.mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # palette, alpha, CMYK → RGB


def _read_pgm(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """Netpbm greyscale (P2 text, P5 binary), values divided by their maximum."""
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise UserError(f"{path}: is {size:,} bytes, too large for an image of the model's size; resize the image first")
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
    if magic not in ("P2", "P5") or min(width, height, maxval) < 1 or maxval > 65535:
        raise UserError(f"{path}: not a greyscale PGM (P2/P5) image; save the image as PNG or PGM")
    _check_size(path, width, height, input_shape)
    count = width * height
    if magic == "P5":
        dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
        raw = np.frombuffer(data[pos + 1:pos + 1 + count * dtype.itemsize], dtype=dtype)
    else:
        cells = data[pos:].split()[:count]
        if not all(c.isdigit() for c in cells):
            raise UserError(f"{path}: a text PGM's pixels must be whole numbers")
        raw = np.array(cells, dtype=np.float64)
    if raw.size != count:
        raise UserError(f"{path}: holds {raw.size} pixels but its header says {width}×{height}")
    return (raw.astype(np.float32) / maxval).reshape(height, width)


def _image_sample(pixels: np.ndarray, input_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """Pixels (H×W or H×W×3) → one sample (1, *input_shape) in the model's channel layout."""
    channels = input_shape[0] if len(input_shape) == 3 else 1
    if channels not in (1, 3):
        raise UserError(f"{path}: the model takes {channels}-channel inputs; give them as a .npy array instead of an image")
    if pixels.ndim == 3:
        pixels = pixels @ _LUMA if channels == 1 else np.moveaxis(pixels, -1, 0)
    elif channels == 3:
        pixels = np.repeat(pixels[None], 3, axis=0)
    return np.ascontiguousarray(pixels, dtype=np.float32).reshape(1, *input_shape)
