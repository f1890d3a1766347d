"""Inputs for ``bigmodel explain`` besides files (which ``engine.inputs`` reads, for predict too):
prompts, rows of the artifact's own data, and the blurred-image baseline.

Inputs are returned *raw*, in the units of the training data (digits: 0–16 ink), so two artifacts
compared on one input each apply their own stored normalization.
"""

from __future__ import annotations

import numpy as np

from ...artifact import Artifact
from ...data import SPLITS
from ...errors import UserError



def read_prompt(text: str, context: int | None, tokenizer=None) -> np.ndarray:
    """A prompt → token ids (the model's tokenizer, else bytes), checked against its context length."""
    if tokenizer is not None and not tokenizer.is_byte_level:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    else:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if len(ids) == 0:
        raise UserError("the prompt is empty; give some text to explain the next-token prediction of")
    if context and len(ids) > int(context):
        unit = "tokens" if tokenizer is not None and not tokenizer.is_byte_level else "tokens (bytes)"
        raise UserError(f"the prompt has {len(ids)} {unit} but the model's context is {context}; shorten it")
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
