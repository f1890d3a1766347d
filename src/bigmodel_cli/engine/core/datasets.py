"""The data a command measures or trains on, fed exactly as the artifact's model was trained."""

from __future__ import annotations

from ...artifact import Artifact
from ...data import load_dataset, parse_data_arg
from ...errors import UserError


def open_data(artifact: Artifact, data_arg: str | None = None, target: str | None = None):
    """The artifact's own dataset (split, normalization from config.json), or ``--data`` fed the same way."""
    spec = dict(artifact.data_spec)
    if data_arg:
        new = parse_data_arg(data_arg, target, input_shape=spec.get("input_shape"), num_classes=spec.get("num_classes"))
        # Feed new data exactly as the model was trained: same normalization and classes.
        for key in ("normalization", "block_size"):
            if key in spec:
                new[key] = spec[key]
        spec = new
    # A language model reads text through its own tokenizer (bytes when it has none).
    tokenizer = artifact.tokenizer() if artifact.task == "language-modeling" else None
    data = load_dataset(spec, tokenizer)
    if data.task != artifact.task:
        raise UserError(f"--data {data_arg} is {data.task} data but the model does {artifact.task}")
    if data.task == "classification":
        if tuple(data.input_shape) != tuple(artifact.data_spec.get("input_shape", data.input_shape)):
            raise UserError(
                f"--data {data_arg} has inputs of shape {tuple(data.input_shape)} but the model takes "
                f"{tuple(artifact.data_spec['input_shape'])}"
            )
        if data.num_classes > artifact.data_spec.get("num_classes", data.num_classes):
            raise UserError(f"--data {data_arg} has labels up to {data.num_classes - 1}; the model knows {artifact.data_spec['num_classes']} classes")
    return data
