"""The decoders ``generate`` and ``chat`` run: next-token logits for a batch of rows, by the KV
cache where the model has one (PyTorch's gpt/llama modules, an export's decoder.onnx on ONNX
Runtime: onnx/decoder.py) or by recomputing the whole (cropped) context (``--no-cache``, a
cache-free graph). ``open_decoder`` picks one; sampling and text are generate.py's.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np

from ..artifact import Artifact
from ..errors import UserError
from .onnx.decoder import PaddedCacheDecoder, RowDecoder


def context_limits(artifact: Artifact, backend_detail: dict) -> tuple[int, int | None]:
    """(longest context the model takes, fixed sequence length of an ONNX graph or None)."""
    model_ctx = artifact.model_spec.get("block_size") or artifact.data_spec.get("block_size")
    if not model_ctx:
        raise UserError(f"{artifact.path}: config.json gives no block_size for this language model; re-create the artifact")
    shape = backend_detail.get("input_shape") or []
    fixed = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
    return int(fixed or model_ctx), fixed


class RecomputeDecoder(RowDecoder):
    """Next-token logits by recomputing the whole (cropped) context: ONNX Runtime and --no-cache.

    Rows of a batch are RIGHT-padded to the longest (or to a graph's fixed sequence length) and
    each is read at its own last real position: causal attention means padding after a position
    cannot change it, so no mask is needed and every row starts at position 0. (A graph with a
    fixed batch size is fed in chunks of it by onnx/runtime.session_predict.)
    """

    cache_bytes = 0

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], context: int, fixed_seq: int | None = None):
        self.predict, self.context, self.fixed_seq = predict, context, fixed_seq
        self.rows: list[list[int]] = []

    @property
    def tokens(self) -> list[int]:
        return self.rows[0] if self.rows else []

    def start_batch(self, prompts: list[list[int]]) -> np.ndarray:
        self.rows = [list(prompt) for prompt in prompts]
        return self.last_logits()

    def step_batch(self, tokens: list[int]) -> np.ndarray:
        for row, token in zip(self.rows, tokens):
            row.append(int(token))
        return self.last_logits()

    def last_logits(self) -> np.ndarray:
        """(batch, vocab): each row's logits at its last real token."""
        windows = [row[-self.context:] for row in self.rows]
        batch = np.zeros((len(windows), self.fixed_seq or max(len(w) for w in windows)), dtype=np.int64)
        for i, window in enumerate(windows):
            batch[i, :len(window)] = window
        out = self.predict(batch)
        return np.stack([out[i, len(window) - 1] for i, window in enumerate(windows)])


def supports_cache(model: object) -> bool:
    """Whether a torch module takes ``forward(idx, past, use_cache)`` (models/gpt.py, llama.py)."""
    forward = getattr(model, "forward", None)
    return forward is not None and "use_cache" in inspect.signature(forward).parameters


class CachedTorchDecoder(PaddedCacheDecoder):
    """Next-token logits from a PyTorch model with a KV cache: prefill once, then one token a step
    (the batch's padding, mask, positions and sliding window: PaddedCacheDecoder)."""

    def __init__(self, model, context: int, device: str, precision: str, vocab: int):
        super().__init__(context)
        self.model, self.device, self.precision, self.vocab = model, device, precision, vocab

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past) -> np.ndarray:
        import torch

        from .core.hardware import autocast

        padded = not mask.all()  # without padding the model's own positions (past's length) are these
        with torch.inference_mode(), autocast(self.device, self.precision):
            extra = {"attention_mask": torch.from_numpy(mask).to(self.device),
                     "position_ids": torch.from_numpy(positions).to(self.device)} if padded else {}
            logits, self.past = self.model(torch.from_numpy(ids).to(self.device), past=past, use_cache=True, **extra)
            last = logits[:, -1, :self.vocab].float().cpu().numpy()
        self.cache_bytes = max(self.cache_bytes, sum(k.nbytes + v.nbytes for k, v in self.past))
        return last


def open_decoder(runner, use_cache: bool, context: int, fixed: int | None, vocab: int,
                 artifact: Artifact | None = None):
    """The cached decoder where the model has one and it is wanted (PyTorch's KV cache, or an
    export's decoder.onnx on ONNX Runtime); else recompute."""
    if runner.name == "torch" and use_cache and supports_cache(runner.model):
        return CachedTorchDecoder(runner.model, context, runner.device, runner.detail.get("precision", "fp32"), vocab)
    onnx_meta = (artifact.config.get("onnx") or {}) if artifact is not None else {}
    if runner.name == "onnx" and use_cache and "decoder" in onnx_meta:
        from .onnx.decoder import open_ort_decoder

        return open_ort_decoder(artifact.path, onnx_meta["decoder"], context, vocab, runner.device, runner.threads)

    def predict(batch: np.ndarray) -> np.ndarray:
        # Embedding rows past the tokenizer (a padded vocabulary) are ids no text decodes from.
        return runner.predict(batch)[..., :vocab]

    return RecomputeDecoder(predict, context, fixed)
