"""What an export is asked for (``ExportOptions``) and how the model is fed (``IOLayout``).

Both the export command (``export.py``) and the exporters (``exporters.py``) take these, so they
live below both.
"""

from __future__ import annotations

from dataclasses import dataclass

# 18 is the newest opset that both exporters and every ONNX Runtime since 1.14 understand, so the
# file runs in the widest range of clients; newer opsets measured no faster here (docs/export.md).
DEFAULT_OPSET = 18
TRACE_BATCH = 2  # tracing example; verification uses other batch sizes
VERIFY_BATCHES = (1, 7)


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    dynamic: list[str] | None = None  # default: batch (and seq for language models)
    dtype: str = "fp32"
    device: str = "cpu"
    optimize: str = "basic"
    atol: float | None = None  # default: DEFAULT_ATOL[dtype]
    exporter: str = "auto"
    weights: bool = True  # also carry model.safetensors so the torch backend runs the same directory
    decoder: bool = True  # language models: also write decoder.onnx, the graph with past key values


@dataclass
class IOLayout:
    """How the model is fed: element type, per-sample shape, which axes are symbolic."""

    task: str
    sample_shape: tuple[int, ...]  # classification: input_shape; language models: ()
    dtype: str  # "float32" or "int64"
    dynamic: tuple[str, ...]
    context: int | None = None  # language models: the longest sequence the model takes
    window: int | None = None  # language models: the training window (the fixed seq length if seq is static)
    vocab_size: int | None = None

    def shape(self, batch: int, seq: int | None = None) -> tuple[int, ...]:
        if self.task == "language-modeling":
            return (batch, seq if "seq" in self.dynamic else self.window)
        return (batch, *self.sample_shape)

    def trace_shape(self) -> tuple[int, ...]:
        batch = TRACE_BATCH if "batch" in self.dynamic else 1
        if self.task == "language-modeling":
            return self.shape(batch, max(1, min(self.context, max(2, self.context // 2))))
        return self.shape(batch)

    def verify_shapes(self) -> list[tuple[int, ...]]:
        """Shapes that differ from the tracing example along every symbolic axis."""
        batches = VERIFY_BATCHES if "batch" in self.dynamic else (1, 1)
        if self.task == "language-modeling" and "seq" in self.dynamic:
            trace_seq = self.trace_shape()[1]
            seqs = [s for s in dict.fromkeys((self.context, max(1, self.context // 3), 1)) if s != trace_seq][:2]
            return [self.shape(b, s) for b in batches for s in seqs]
        return [self.shape(b) for b in batches]
