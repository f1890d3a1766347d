"""What differs between classification and language modelling, behind one small interface.

A task knows how to draw training batches (deterministically from the step number, so resume and
data-parallel ranks need no sampler state), how to compute the training loss, and how to evaluate
any ``predict(np.ndarray) -> np.ndarray`` function. Evaluation takes a plain function so that
PyTorch and ONNX Runtime are measured by the same code.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _generator(*seeds: int):
    import torch

    # Mix the seeds into one 63-bit number; each (seed, epoch/step) gets its own stream.
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class ClassificationTask:
    name = "classification"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, data, batch_size: int, seed: int = 0, augment: dict | None = None):
        import torch

        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment or {}  # data/augment.py's checked policies; {}: plain batches
        x, y = data.arrays("train")
        self.x_train, self.y_train = torch.from_numpy(x), torch.from_numpy(y)
        self.micro_batches_per_epoch = math.ceil(len(self.y_train) / batch_size)

    def example_input(self, batch: int = 2) -> np.ndarray:
        return self.data.arrays("train")[0][:batch]

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.micro_batches_per_epoch

    def batch(self, micro_step: int, rank: int = 0, world: int = 1):
        """The micro-batch for a global micro-step; with ``world`` ranks each takes a strided slice."""
        import torch

        epoch, i = divmod(micro_step, self.micro_batches_per_epoch)
        order = torch.randperm(len(self.y_train), generator=_generator(self.seed, epoch))
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        if not self.augment:
            idx = idx[rank::world]
            return self.x_train[idx], self.y_train[idx]
        from ...data.augment import augment_batch

        # The whole global batch is augmented, then sliced: every rank sees what one process sees.
        x, y = augment_batch(self.x_train[idx], self.y_train[idx], self.augment, self.seed, micro_step,
                             self.data.num_classes)
        return x[rank::world], y[rank::world]

    def loss(self, logits, targets):
        from torch.nn import functional as F

        if targets.dtype.is_floating_point:  # soft targets (mixup); the model may have spare outputs
            targets = F.pad(targets, (0, logits.shape[-1] - targets.shape[-1]))
        return F.cross_entropy(logits.float(), targets)

    def evaluate(self, predict: Predict, split: str = "val", batch_size: int = 512, limit: int | None = None) -> dict:
        x, y = self.data.arrays(split)
        if limit:
            x, y = x[:limit], y[:limit]
        if len(y) == 0:
            return {"samples": 0}
        total_loss, correct = 0.0, 0
        for start in range(0, len(y), batch_size):
            logits = predict(x[start:start + batch_size])
            logp = _log_softmax(logits)
            target = y[start:start + batch_size]
            total_loss -= logp[np.arange(len(target)), target].sum()
            correct += int((logits.argmax(axis=-1) == target).sum())
        return {"loss": float(total_loss / len(y)), "accuracy": correct / len(y), "samples": int(len(y))}


class LanguageModelingTask:
    name = "language-modeling"
    metric = "loss"
    higher_is_better = False

    def __init__(self, data, batch_size: int, block_size: int, seed: int = 0, eval_windows: int = 64):
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.eval_windows = eval_windows
        data.check_block(block_size)
        # An "epoch" is one pass worth of tokens; only used to report progress and for --epochs.
        self.micro_batches_per_epoch = max(1, data.split_size("train") // (batch_size * block_size))

    def example_input(self, batch: int = 2) -> np.ndarray:
        starts = self.data.eval_starts("train", self.block_size, batch)
        return self.data.windows(starts, self.block_size)[0].numpy()

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.micro_batches_per_epoch

    def batch(self, micro_step: int, rank: int = 0, world: int = 1):
        starts = self.data.window_starts("train", self.batch_size, self.block_size, _generator(self.seed, micro_step))
        return self.data.windows(starts[rank::world], self.block_size)

    def loss(self, logits, targets):
        from torch.nn import functional as F

        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def evaluate(self, predict: Predict, split: str = "val", batch_size: int = 16, limit: int | None = None) -> dict:
        starts = self.data.eval_starts(split, self.block_size, limit or self.eval_windows)
        if not starts:
            return {"tokens": 0}
        total, tokens, text_bytes = 0.0, 0, 0
        for i in range(0, len(starts), batch_size):
            x, y = self.data.windows(starts[i:i + batch_size], self.block_size)
            logp = _log_softmax(predict(x.numpy()))
            y = y.numpy()
            total -= np.take_along_axis(logp, y[..., None], axis=-1).sum()
            tokens += y.size
            text_bytes += self.data.byte_count(y) if hasattr(self.data, "byte_count") else y.size
        loss = float(total / tokens)
        # Bits per byte: the whole NLL in bits over the UTF-8 bytes of the text it predicted, so
        # models with different tokenizers compare (byte-level: one byte per token, loss / ln 2).
        if text_bytes == tokens:
            bits_per_byte = loss / math.log(2)
        else:
            bits_per_byte = float(total / math.log(2) / text_bytes) if text_bytes else None
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": bits_per_byte,
                "tokens": int(tokens), "text_bytes": int(text_bytes)}


def make_task(data, batch_size: int, seed: int = 0, block_size: int | None = None, eval_windows: int = 64,
              augment: dict | None = None):
    """``augment``: checked policies (data/augment.py's ``policy_for``), classification only."""
    if data.task == "language-modeling":
        return LanguageModelingTask(data, batch_size, block_size or 128, seed, eval_windows)
    return ClassificationTask(data, batch_size, seed, augment)


def torch_predict(model, device: str = "cpu", precision: str = "fp32") -> Predict:
    """Wrap a torch model as numpy in → numpy logits out (no grad, eval mode)."""
    import torch

    from .hardware import autocast

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(device, precision):
            tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device)
            return model(tensor).float().cpu().numpy()

    return predict
