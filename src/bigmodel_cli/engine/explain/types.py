"""Options and results of ``bigmodel explain``: what to compute (``ExplainOptions``), one input
explained by one model (``Explanation``), one run's result (``ExplainResult``), how byte tokens and
image attributions are shown, and how far two explanations of the same input agree (``agreement``).

The lowest layer of the explain modules: it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...config import threads_problem
from ..core.progress import Progress  # re-exported: explain.command names it among its public types
from ...errors import ConfigErrors
from ..inputs import pixel_max_problem
from . import attribution as attr

BASELINES = ("zeros", "blur", "mean")
THROUGH = ("auto", "torch", "onnx")



@dataclass
class ExplainOptions:
    method: str = "integrated-gradients"
    steps: int | None = None  # trapezoid intervals; None = refine until completeness holds
    baseline: str | None = None  # zeros | blur | mean; None = mean for tabular rows, zeros otherwise
    target: str | None = None  # class name/index, or the next token (one character) for LMs
    through: str = "auto"  # auto | torch | onnx
    top_k: int | None = None  # for --compare; None = attribution.default_top_k
    pixel_max: float | None = None  # image files: value of a white pixel; None = 16 for digits, else 255
    threads: int | None = None

    def check(self) -> None:
        problems = []
        if self.method not in attr.METHODS:
            problems.append(f"unknown --method {self.method!r}; choose {' or '.join(attr.METHODS)}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be at least 1, got {self.steps}")
        if self.method == "saliency" and self.steps is not None:
            problems.append("--steps applies to integrated-gradients only; drop it for --method saliency")
        if self.method == "saliency" and self.baseline is not None:
            problems.append("--baseline applies to integrated-gradients only; drop it for --method saliency")
        if self.baseline is not None and self.baseline not in BASELINES:
            problems.append(f"unknown --baseline {self.baseline!r}; choose one of {', '.join(BASELINES)}")
        if self.through not in THROUGH:
            problems.append(f"unknown --through {self.through!r}; choose one of {', '.join(THROUGH)}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be at least 1, got {self.top_k}")
        if pixel_max_problem(self.pixel_max):
            problems.append(pixel_max_problem(self.pixel_max))
        if threads_problem(self.threads):
            problems.append(threads_problem(self.threads))
        if problems:
            raise ConfigErrors(problems, "explain options")


@dataclass
class Explanation:
    """One input explained by one model."""

    artifact: str
    explained_with: str  # the artifact whose model was differentiated
    via: str  # "pytorch", "pytorch ancestor", "onnx finite differences"
    kind: str  # image | tabular | tokens
    method: str
    baseline: str | None
    intervals: int | None
    target: int
    target_name: str
    prediction: int
    prediction_name: str
    target_probability: float
    score: float  # the target logit at the input
    baseline_score: float | None
    completeness_gap: float | None
    values: np.ndarray  # image: C×H×W (or H×W); tabular: (features,); tokens: (tokens,)
    input: np.ndarray  # raw input (tokens: byte ids)
    feature_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    segments: list[str] | None = None  # tokens with a tokenizer: each token's text (None: byte ids)

    @property
    def attribution_sum(self) -> float:
        return float(self.values.sum())

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "artifact", "explained_with", "via", "kind", "method", "baseline", "intervals", "target",
            "target_name", "prediction", "prediction_name", "target_probability", "score", "baseline_score",
            "completeness_gap")}
        d["attribution_sum"] = self.attribution_sum
        if self.kind == "tokens":
            d["tokens"] = token_segments(self.input, self.values, self.segments)
        else:
            d["input"] = self.input.tolist()
            d["attributions"] = self.values.tolist()
        if self.feature_names:
            d["features"] = self.feature_names
        if self.notes:
            d["notes"] = list(self.notes)
        return d


@dataclass
class ExplainResult:
    explanation: Explanation
    other: Explanation | None = None  # the --compare artifact's explanation of the same input
    agreement: dict | None = None
    out: str | None = None
    read_as: dict | None = None  # an input file: engine.inputs.Inputs.to_dict (the shape the file held)

    def to_dict(self) -> dict:
        d = self.explanation.to_dict()
        if self.read_as is not None:
            d["read_as"], d["input_shape"] = self.read_as["read_as"], self.read_as["input_shape"]
        if self.other is not None:
            d["compare"] = {**self.other.to_dict(), **(self.agreement or {})}
        d["out"] = self.out
        return d


# --------------------------------------------------------------------------- presentation helpers


def token_text(token: int) -> str:
    """How one byte token is shown: the character when printable ASCII, else an escape."""
    if token == 10:
        return "\\n"
    if 32 <= token < 127:
        return chr(token)
    return f"\\x{token:02x}"


def token_segments(ids: np.ndarray, values: np.ndarray, texts: list[str] | None = None) -> list[dict]:
    """Byte tokens grouped into characters (a UTF-8 character is several bytes), each with the sum
    of its bytes' attributions; with ``texts`` (a tokenizer's tokens), one segment per token."""
    if texts is not None:
        return [{"text": text, "start": i, "end": i + 1, "value": float(values[i])} for i, text in enumerate(texts)]
    data = bytes(int(i) & 0xFF for i in ids)
    segments, i = [], 0
    while i < len(data):
        lead = data[i]
        length = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        try:
            text = data[i:i + length].decode("utf-8") if length > 1 else None
        except UnicodeDecodeError:
            text, length = None, 1
        if text is None:
            length = 1
            text = chr(lead) if 32 <= lead < 127 or lead in (9, 10) else f"\\x{lead:02x}"
        segments.append({"text": text, "start": i, "end": i + length, "value": float(values[i:i + length].sum())})
        i += length
    return segments


def heatmap(values: np.ndarray) -> np.ndarray:
    """An image attribution (C×H×W or H×W) → one H×W map: channels summed."""
    return values.sum(axis=0) if values.ndim == 3 else values


def agreement(a: Explanation, b: Explanation, top_k: int | None = None) -> dict:
    """How far explanation ``b`` moved from ``a``: rank correlation and top-k overlap of magnitudes."""
    n = a.values.size
    k = min(top_k or attr.default_top_k(n), n)
    rho = attr.rank_correlation(a.values, b.values)
    return {"rank_correlation": None if np.isnan(rho) else rho, "top_k": k,
            "top_k_overlap": attr.top_k_overlap(a.values, b.values, k), "same_prediction": a.prediction == b.prediction}
