"""The options and the result of ``bigmodel quantize`` (command.py), shared by its flows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QuantizeOptions:
    mode: str = "auto"  # auto: static for cnn, dynamic for mlp, gpt and user models
    method: str | None = None  # static calibration: minmax (default), entropy, percentile
    calib_samples: int = 256
    calib_data: str | None = None  # the --data forms, or a .npy array of raw inputs
    target: str | None = None  # --calib-data csv:PATH
    per_channel: bool = False
    scheme: str = "auto"  # auto (per CPU), u8s8, s8s8, u8u8
    reduce_range: bool | None = None  # None: as the scheme says
    exclude: list[str] = field(default_factory=list)  # nodes (ONNX) or tensors (weight-only) kept in float
    exclude_sensitive: bool | None = None  # static transformers: LayerNorm, Softmax, GELU, residual Add (default on)
    bits: int = 8  # weight-only: 8 or 4
    group_size: int = 64  # weight-only --bits 4; matmul-nbits: the block size (a power of two, 16+)
    symmetric: bool = True  # matmul-nbits: no zero point (asymmetric adds one per block)
    accuracy_level: int | None = None  # matmul-nbits: the kernel's compute type (4 = int8, fast with VNNI)
    max_metric_drop: float | None = None  # accuracy points, or perplexity increase in percent
    max_retries: int = 3
    export: bool = False  # export a PyTorch artifact to ONNX first
    preprocess: bool = True
    split: str = "val"
    limit: int | None = None
    bench: bool = True
    bench_batch: int | None = None
    seq_len: int | None = None
    iterations: int = 30
    warmup: int = 3
    threads: int | None = None
    qat: bool = False  # quantization-aware training (qat.py), then static QDQ of the trained weights
    finetune_epochs: int = 0  # --qat: the fine-tuning budget, in epochs …
    finetune_steps: int | None = None  # … or in steps
    train: Any = None  # --qat: the TrainConfig of the fine-tuning (batch size, resume, …); None: defaults
    # --qat: the fine-tuning learning rate, which replaces ``train``'s; None: QAT_LR_FRACTION of the
    # rate that trained the source (qat.default_learning_rate)
    finetune_lr: float | None = None
    finetune_dir: str | None = None  # --qat: keep the fine-tuning run here (checkpoints: --resume continues it)
    nproc: int | None = None  # --qat: fine-tune in N data-parallel processes (as train --nproc)


@dataclass
class QuantizeResult:
    path: Path
    mode: str
    report: dict
    quantization: dict
    gate: dict
    manifest: dict



def options_record(options: QuantizeOptions, mode: str) -> dict:
    """The options as the manifest records them, with the mode actually used."""
    record = dataclasses.asdict(options)
    record["mode"] = mode
    return record
