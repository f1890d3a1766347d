"""Calibration inputs: what static quantization measures activation ranges on, and what the
accuracy gate measures per-tensor error on.

Inputs are fed exactly as the model was trained: drawn from the artifact's training split, or
read from ``--calib-data`` (the ``--data`` forms, or a plain ``.npy`` array of raw inputs) and
normalized with the statistics stored in config.json. Anything that does not fit the model's
input is refused before any work, with a line that says what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bigmodel_cli.artifact import Artifact
from bigmodel_cli.errors import UserError

CLASSIFIER_BATCH = 64
LM_BATCH = 8  # windows per calibration batch: a language model's activations are (batch, seq, width)


@dataclass
class InputSpec:
    """The ONNX model's one input, read from the graph: a fixed batch or sequence length is respected."""

    name: str
    shape: list  # ints for fixed dimensions, names (or None) for symbolic ones

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0 else None

    @property
    def fixed_seq(self) -> int | None:
        return self.shape[1] if len(self.shape) > 1 and isinstance(self.shape[1], int) and self.shape[1] > 0 else None


def onnx_input(path: Path) -> InputSpec:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{path}: the ONNX model takes {len(inputs)} inputs; bigmodel quantizes models with one input")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return InputSpec(inputs[0].name, shape)


@dataclass
class CalibrationSet:
    batches: list[np.ndarray]
    samples: int
    source: str
    sample_shape: list[int] = field(default_factory=list)

    def describe(self) -> dict:
        return {"samples": self.samples, "source": self.source, "batches": len(self.batches),
                "sample_shape": self.sample_shape}


def _parse(calib_data: str, target: str | None = None) -> dict:
    """``parse_data_arg``, with its messages naming --calib-data rather than --data."""
    from bigmodel_cli.data import parse_data_arg

    try:
        return parse_data_arg(calib_data, target)
    except UserError as exc:
        raise UserError(str(exc).replace("--data ", "--calib-data ")) from None


def _classifier_inputs(artifact: Artifact, calib_data: str | None, target: str | None) -> tuple[np.ndarray, str]:
    from bigmodel_cli.data import load_dataset
    from bigmodel_cli.data.classification import preprocess

    spec = artifact.data_spec
    if calib_data is None:
        data = load_dataset(dict(spec))
        x, _ = data.arrays("train")
        return x, f"training split of {spec.get('name', 'the data')}"
    if calib_data.endswith(".npy") and ":" not in calib_data:
        path = Path(calib_data)
        if not path.is_file():
            raise UserError(f"--calib-data {calib_data}: no such file")
        try:
            raw = np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise UserError(f"--calib-data {calib_data}: cannot read without pickle ({exc}); save a plain numeric array") from None
        except Exception as exc:  # truncated or not a .npy file
            raise UserError(f"--calib-data {calib_data}: not a readable .npy file ({type(exc).__name__}); save it with numpy.save") from None
        if not np.issubdtype(raw.dtype, np.number):
            raise UserError(f"--calib-data {calib_data}: holds {raw.dtype} values; calibration inputs must be numeric")
        x, source = raw, f"--calib-data {calib_data}"
    else:
        new = _parse(calib_data, target)
        if new["name"] == "text":
            raise UserError(f"--calib-data {calib_data} is text (language-modelling data) but the model is a classifier; "
                            "give inputs shaped like its training data (npz:PATH, csv:PATH or a .npy array)")
        if new["name"] == "synthetic":
            raise UserError("--calib-data synthetic is random data, not representative inputs; give npz:PATH, csv:PATH or a .npy array")
        data = load_dataset(new)
        x, source = data.x, f"--calib-data {calib_data}"
    want = tuple(int(s) for s in spec.get("input_shape", x.shape[1:]))
    if x.ndim < 2 or tuple(x.shape[1:]) != want:
        got = "×".join(map(str, x.shape[1:])) if x.ndim >= 2 else f"a {x.ndim}-d array"
        raise UserError(f"--calib-data {calib_data}: samples are shaped {got} but the model takes "
                        f"{'×'.join(map(str, want))} (an array of shape (N, {', '.join(map(str, want))}))")
    if len(x) == 0:
        raise UserError(f"--calib-data {calib_data}: has no samples")
    if not np.isfinite(x).all():
        raise UserError(f"--calib-data {calib_data}: contains NaN or Inf; clean the data")
    # Raw inputs, normalized with the training statistics in config.json, as the model was trained.
    return preprocess(x, spec), source


def _lm_windows(artifact: Artifact, calib_data: str | None, samples: int, window: int, seed: int) -> tuple[np.ndarray, str]:
    import torch

    from bigmodel_cli.data import load_dataset

    spec = dict(artifact.data_spec)
    if calib_data is None:
        source = f"training split of {spec.get('name', 'the corpus')}"
    else:
        new = _parse(calib_data)
        if new["name"] != "text":
            raise UserError(f"--calib-data {calib_data} is classification data but the model is a language model; "
                            "give text:PATH (a text file or a directory of them)")
        new["split"] = {"val": 0.0, "test": 0.0}  # all of the user's calibration text is used
        spec, source = new, f"--calib-data {calib_data}"
    data = load_dataset(spec, artifact.tokenizer())
    available = data.split_size("train")
    if available < window + 1:
        where = f"--calib-data {calib_data}" if calib_data else "the training split"
        raise UserError(f"{where} has {available} {data.unit}, fewer than one calibration window of {window + 1}; "
                        "give more text (or a smaller --seq-len)")
    starts = data.window_starts("train", samples, window, torch.Generator().manual_seed(seed))
    x, _ = data.windows(starts, window)
    vocab = int(artifact.model_spec.get("vocab_size") or artifact.data_spec.get("vocab_size") or 256)
    x = x.numpy()
    if x.size and int(x.max()) >= vocab:
        raise UserError(f"--calib-data {calib_data}: has token ids up to {int(x.max())} but the model's vocabulary is {vocab}")
    return x, source


def calibration_set(artifact: Artifact, onnx_input_spec: InputSpec | None, *, samples: int,
                    calib_data: str | None = None, target: str | None = None, seq_len: int | None = None,
                    seed: int = 0) -> CalibrationSet:
    """``samples`` inputs in batches the model accepts (its fixed batch size, if it has one)."""
    fixed_batch = onnx_input_spec.fixed_batch if onnx_input_spec else None
    if artifact.task == "language-modeling":
        window = (onnx_input_spec.fixed_seq if onnx_input_spec else None) or seq_len or int(
            artifact.data_spec.get("block_size") or artifact.model_spec.get("block_size") or 128)
        x, source = _lm_windows(artifact, calib_data, samples, window, seed)
        batch = fixed_batch or LM_BATCH
    else:
        x, source = _classifier_inputs(artifact, calib_data, target)
        order = np.random.default_rng(seed).permutation(len(x))[:samples]
        x = x[np.sort(order)]
        batch = fixed_batch or CLASSIFIER_BATCH
    batches = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if fixed_batch and len(chunk) < fixed_batch:  # a fixed-batch graph takes exactly that many
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - len(chunk), axis=0)])
        batches.append(np.ascontiguousarray(chunk))
    return CalibrationSet(batches, int(len(x)), source, list(x.shape[1:]))


def make_reader(input_name: str, batches: list[np.ndarray], progress: Callable | None = None, label: str = "calibrate"):
    """An ONNX Runtime CalibrationDataReader over ``batches``, reporting progress per batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.position = 0

        def get_next(self):
            if self.position >= len(batches):
                return None
            batch = batches[self.position]
            self.position += 1
            if progress:
                progress(label, done=self.position, total=len(batches))
            return {input_name: batch}

        def rewind(self):
            self.position = 0

    return Reader()
