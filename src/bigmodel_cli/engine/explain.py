"""``bigmodel explain``: which parts of an input made the model predict what it did, and whether a
compressed descendant still relies on the same evidence.

Three kinds of input, decided by the artifact: images (input shape C×H×W or H×W), tabular rows
(a flat feature vector) and, for language models, a prompt whose byte tokens are attributed to the
next-token prediction. Attributions come from ``attribution`` (integrated gradients or saliency);
this module loads inputs, builds baselines, picks the target, decides *which model* is
differentiated (the artifact's own PyTorch weights, a PyTorch ancestor of an ONNX-only artifact, or
the ONNX model itself by finite differences) and compares two explanations.

``explanation_agreement`` is the one-number summary that ``bigmodel compare`` can call.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifact import MANIFEST_FILE, Artifact, open_artifact, sha256_file
from ..errors import ConfigErrors, UserError
from . import attribution as attr
from .explain_inputs import dataset_inputs, gaussian_blur, read_input, read_prompt, shape_text

BASELINES = ("zeros", "blur", "mean")
THROUGH = ("auto", "torch", "onnx")
# Finite differences cost 2·d + 1 model runs per path point; refine less far than autograd does.
FD_MAX_INTERVALS = 256

Progress = Callable[..., None]


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
        if self.pixel_max is not None and not self.pixel_max > 0:
            problems.append(f"--pixel-max must be positive, got {self.pixel_max}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be at least 1, got {self.threads}")
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
            d["tokens"] = token_segments(self.input, self.values)
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

    def to_dict(self) -> dict:
        d = self.explanation.to_dict()
        if self.other is not None:
            d["compare"] = {**self.other.to_dict(), **(self.agreement or {})}
        d["out"] = self.out
        return d


# --------------------------------------------------------------------------- which model runs


def input_kind(artifact: Artifact) -> str:
    if artifact.task == "language-modeling":
        return "tokens"
    shape = artifact.data_spec.get("input_shape") or []
    return "image" if len(shape) in (2, 3) else "tabular"


def _torch_ancestor(artifact: Artifact) -> tuple[Artifact | None, str]:
    """The nearest artifact up the lineage that has PyTorch weights, checked against the manifest
    hash each child recorded (a parent re-created since would explain a different model)."""
    current, seen = artifact, set()
    while True:
        ref = current.manifest.get("parent") or {}
        path = ref.get("path")
        if not path:
            return None, f"{current.path} names no parent in its manifest"
        if path in seen or not (Path(path) / MANIFEST_FILE).is_file():
            return None, f"its parent {path} is not there any more"
        seen.add(path)
        if sha256_file(Path(path) / MANIFEST_FILE) != ref.get("sha256"):
            return None, f"its parent {path} has changed since (the manifest hash differs)"
        try:
            parent = open_artifact(path)
        except UserError as exc:
            return None, f"its parent cannot be opened ({exc})"
        if parent.has_weights:
            return parent, ""
        current = parent


def _onnx_predict(artifact: Artifact, threads: int | None):
    """ONNX Runtime's predict for the artifact, or None while engine/runtime.py is not installed."""
    from .backends import open_backend

    try:
        return open_backend(artifact, "onnx", threads=threads).predict
    except ImportError:  # the ONNX Runtime backend (engine/runtime.py) is not part of this build
        return None


class Explainer:
    """One artifact, ready to explain inputs: its preprocessing, its targets, and a differentiable
    (or finite-differenced) model."""

    def __init__(self, artifact: Artifact, through: str = "auto", threads: int | None = None):
        from . import hardware

        hardware.set_threads(threads)
        self.artifact = artifact
        self.kind = input_kind(artifact)
        self.spec = artifact.data_spec
        self.notes: list[str] = []
        self.model = None
        self.predict = None  # numpy batch → numpy logits (finite differences)
        self.source = artifact
        onnx_only = not artifact.has_weights
        # auto: differentiate the model the stage produced. A quantized artifact's model.onnx is the
        # int8 model (any safetensors beside it are not), so it is finite-differenced like ONNX-only ones.
        quantized = artifact.stage == "quantize" and artifact.has_onnx
        if through == "onnx" or (through == "auto" and (onnx_only or quantized) and self.kind != "tokens"):
            if self.kind == "tokens":
                raise UserError(f"{artifact.path}: --through onnx cannot explain a language model (token ids are "
                                "discrete, so there is nothing to take finite differences of); use --through torch")
            if not artifact.has_onnx:
                raise UserError(f"{artifact.path}: has no model.onnx for --through onnx; drop --through or export it first")
            self.predict = _onnx_predict(artifact, threads)
            if self.predict is not None:
                self.via = "onnx finite differences"
                return
            if through == "onnx":
                raise UserError("--through onnx needs the ONNX Runtime backend (engine/runtime.py), which this "
                                "build lacks; use --through torch")
            self.notes.append("ONNX Runtime backend not available in this build; explained through the PyTorch ancestor")
        if onnx_only:
            ancestor, why = _torch_ancestor(artifact)
            if ancestor is None:
                raise UserError(f"{artifact.path}: is ONNX-only and has no PyTorch parent to explain through ({why}); "
                                "explain the artifact it was exported from instead")
            self.source = ancestor
            self.via = "pytorch ancestor"
            self.notes.append(f"{artifact.stage} artifact explained through its PyTorch ancestor {ancestor.path} "
                              f"({ancestor.stage}); effects of {artifact.stage} itself are not seen this way")
        else:
            self.via = "pytorch"
            if quantized:
                self.notes.append("explained through the PyTorch weights in this quantize artifact, not its int8 "
                                  "model.onnx; --through onnx explains the int8 model itself")
        self.model = self.source.build_model()
        for param in self.model.parameters():  # only input gradients are needed
            param.requires_grad_(False)
        if self.kind == "tokens":
            self.embedding = _token_embedding(self.model, self.source)

    # -- facts about the model ------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        if self.kind == "tokens":
            return int(self.spec.get("vocab_size", 256))
        return int(self.spec["num_classes"])

    @property
    def context(self) -> int | None:
        """The longest prompt the model takes (language models)."""
        return self.source.model_spec.get("block_size") or self.spec.get("block_size")

    def class_name(self, index: int) -> str:
        if self.kind == "tokens":
            return token_text(index)
        names = self.spec.get("class_names") or []
        return str(names[index]) if index < len(names) else str(index)

    def resolve_target(self, target: str | None) -> int | None:
        """--target as a class name or index (classification) or one character (language models)."""
        if target is None:
            return None
        if self.kind == "tokens":
            data = target.encode("utf-8")
            if len(data) != 1:
                raise UserError(f"--target {target!r}: a language model's target is the next token, one byte "
                                "(a single ASCII character) such as --target e")
            return data[0]
        names = [str(n) for n in self.spec.get("class_names") or []]
        if target in names:
            return names.index(target)
        try:
            index = int(target)
        except ValueError:
            known = f"; classes: {', '.join(names)}" if names else ""
            raise UserError(f"--target {target!r} is not a class of this model{known}") from None
        if not 0 <= index < self.num_classes:
            raise UserError(f"--target {index} is out of range: the model has {self.num_classes} classes "
                            f"(0–{self.num_classes - 1}); pick one of them")
        return index

    def check_compatible(self, other: Explainer) -> None:
        a, b = self.artifact, other.artifact
        if self.kind != other.kind:
            raise UserError(f"--compare {b.path}: is a {b.task} model with {other.kind} inputs but {a.path} "
                            f"takes {self.kind} inputs; compare models of the same task and input")
        if self.kind != "tokens" and list(a.data_spec.get("input_shape", [])) != list(b.data_spec.get("input_shape", [])):
            raise UserError(f"--compare {b.path}: takes inputs of shape {shape_text(b.data_spec['input_shape'])} but "
                            f"{a.path} takes {shape_text(a.data_spec['input_shape'])}; compare models of the same data")

    # -- the model as functions of its (model-space) input ---------------------------------

    def _prepare(self, raw: np.ndarray):
        """Raw input → the point in model space that the attribution path ends at."""
        if self.kind == "tokens":
            import torch

            with torch.no_grad():
                return self.embedding(torch.from_numpy(raw.astype(np.int64))).double().numpy()
        from ..data.classification import preprocess

        return preprocess(raw[None], self.spec)[0].astype(np.float64)

    def _baseline(self, raw: np.ndarray, name: str) -> np.ndarray:
        if self.kind == "tokens":
            weight = self.embedding.weight.detach().double().numpy()
            if name == "blur":
                raise UserError("--baseline blur is for images; language models take zeros or mean")
            emb = np.zeros((len(raw), weight.shape[1])) if name == "zeros" else np.tile(weight.mean(axis=0), (len(raw), 1))
            return emb
        from ..data.classification import preprocess

        if name == "zeros":
            base = np.zeros_like(raw)
        elif name == "mean":
            norm = self.spec.get("normalization") or {}
            mean = np.asarray(norm.get("mean", 0.0), dtype=np.float64)
            base = np.broadcast_to(mean, raw.shape).copy()
        else:
            if self.kind != "image":
                raise UserError("--baseline blur is for images; tabular rows take zeros or mean")
            base = gaussian_blur(raw)
        return preprocess(base[None], self.spec)[0].astype(np.float64)

    def _score_functions(self, raw: np.ndarray, target: int):
        """(torch score fn on model-space points, numpy score fn) for the target."""
        if self.predict is not None:
            predict = self.predict
            return None, (lambda batch: predict(batch.astype(np.float32))[:, target])
        model = self.model
        if self.kind == "tokens":
            import torch

            ids = torch.from_numpy(raw.astype(np.int64))[None]

            def score(points):
                # Replace the token embedding's output by the path point; positions are untouched.
                handle = self.embedding.register_forward_hook(lambda _m, _i, out: points.to(out.dtype))
                try:
                    logits = model(ids.expand(len(points), -1))
                finally:
                    handle.remove()
                return logits[:, -1, target]

            return score, None
        return (lambda points: model(points)[:, target]), None

    def logits(self, raw: np.ndarray) -> np.ndarray:
        """The model's output for one raw input: class logits, or the next-token logits."""
        if self.predict is not None:
            from ..data.classification import preprocess

            return np.asarray(self.predict(preprocess(raw[None], self.spec)))[0].astype(np.float64)
        import torch

        with torch.no_grad():
            if self.kind == "tokens":
                return self.model(torch.from_numpy(raw.astype(np.int64))[None])[0, -1].double().numpy()
            return self.model(torch.from_numpy(self._prepare(raw).astype(np.float32))[None])[0].double().numpy()

    # -- explaining ---------------------------------------------------------------------------

    def explain(self, raw: np.ndarray, target: int | None, opts: ExplainOptions) -> Explanation:
        logits = self.logits(raw)
        if logits.ndim != 1:
            raise UserError(f"{self.source.path}: the model returns shape {logits.shape} per input; "
                            "explain needs one score per class")
        prediction = int(logits.argmax())
        target = prediction if target is None else target
        if not 0 <= target < len(logits):
            raise UserError(f"--target {target} is out of range: the model has {len(logits)} outputs; pick one of them")
        x = self._prepare(raw)
        torch_score, numpy_score = self._score_functions(raw, target)
        if torch_score is not None:
            grad_fn = attr.torch_gradients(torch_score)
            per_point = x.size * (x.shape[0] if self.kind == "tokens" else 1)
            chunk = max(1, min(256, 2_000_000 // max(1, per_point)))
            max_intervals = attr.MAX_INTERVALS
        else:
            grad_fn = attr.finite_difference_gradients(numpy_score)
            chunk = max(1, 4096 // (2 * x.size + 1))
            max_intervals = FD_MAX_INTERVALS
        baseline_name = None
        if opts.method == "saliency":
            result = attr.saliency(grad_fn, x)
        else:
            baseline_name = opts.baseline or ("mean" if self.kind == "tabular" else "zeros")
            result = attr.integrated_gradients(grad_fn, x, self._baseline(raw, baseline_name), opts.steps,
                                               max_intervals=max_intervals, chunk=chunk)
        values = result.values
        if self.kind == "tokens":
            # one number per token: IG adds up over the embedding; saliency takes the gradient's norm
            values = values.sum(axis=1) if opts.method == "integrated-gradients" else np.sqrt((values ** 2).sum(axis=1))
        notes = list(self.notes)
        gap = result.completeness_gap
        if gap is not None and gap > attr.TOLERANCE:
            how = f"at --steps {opts.steps}" if opts.steps else f"after refining to {result.intervals} intervals"
            if self.predict is not None:
                notes.append(f"completeness gap {gap:.1%} {how}: finite differences of an ONNX model are approximate "
                             "(an int8 model's output moves in steps); treat the values as approximate")
            else:
                notes.append(f"completeness gap {gap:.1%} {how}; raise --steps for a closer sum")
        probs = _softmax(logits)
        return Explanation(
            artifact=str(self.artifact.path), explained_with=str(self.source.path), via=self.via, kind=self.kind,
            method=opts.method, baseline=baseline_name, intervals=result.intervals, target=target,
            target_name=self.class_name(target), prediction=prediction, prediction_name=self.class_name(prediction),
            target_probability=float(probs[target]), score=result.score, baseline_score=result.baseline_score,
            completeness_gap=gap, values=values, input=raw, feature_names=self._feature_names(), notes=notes,
        )

    def _feature_names(self) -> list[str] | None:
        if self.kind != "tabular":
            return None
        n = int(np.prod(self.spec["input_shape"]))
        names = self.spec.get("feature_names")
        return list(names) if names and len(names) == n else [f"x{i}" for i in range(n)]


def _token_embedding(model, artifact: Artifact):
    """The module whose output integrated gradients moves along: the token embedding."""
    from torch import nn

    emb = getattr(model, "tok_emb", None)
    if isinstance(emb, nn.Embedding):
        return emb
    vocab = artifact.data_spec.get("vocab_size", 256)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module
    raise UserError(f"{artifact.path}: the language model has no token embedding (an nn.Embedding with "
                    f"{vocab} rows) to attribute through; explain needs one")


# --------------------------------------------------------------------------- presentation helpers


def token_text(token: int) -> str:
    """How one byte token is shown: the character when printable ASCII, else an escape."""
    if token == 10:
        return "\\n"
    if 32 <= token < 127:
        return chr(token)
    return f"\\x{token:02x}"


def token_segments(ids: np.ndarray, values: np.ndarray) -> list[dict]:
    """Byte tokens grouped into characters (a UTF-8 character is several bytes), each with the sum
    of its bytes' attributions."""
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


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def agreement(a: Explanation, b: Explanation, top_k: int | None = None) -> dict:
    """How far explanation ``b`` moved from ``a``: rank correlation and top-k overlap of magnitudes."""
    n = a.values.size
    k = min(top_k or attr.default_top_k(n), n)
    rho = attr.rank_correlation(a.values, b.values)
    return {"rank_correlation": None if np.isnan(rho) else rho, "top_k": k,
            "top_k_overlap": attr.top_k_overlap(a.values, b.values, k), "same_prediction": a.prediction == b.prediction}


# --------------------------------------------------------------------------- output files


def check_output_file(out: Path | str, overwrite: bool, allowed: tuple[str, ...]) -> Path:
    """Fail before any work if ``out`` has the wrong type, exists without --overwrite, or cannot be written."""
    out = Path(out)
    if out.suffix.lower() not in allowed:
        raise UserError(f"--out {out}: this explanation is written as {' or '.join(allowed)}; name the file accordingly")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: already exists; choose another name or pass --overwrite to replace it")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UserError(f"--out {out}: {probe} is not writable; choose another place")
    return out


@contextlib.contextmanager
def atomic_file(out: Path):
    """Yield a hidden temporary path beside ``out`` that is renamed onto it only if the block succeeds."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create its folder ({exc.strerror})") from None
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}{out.suffix}"
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write ({exc.strerror}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)


def output_suffixes(kind: str) -> tuple[str, ...]:
    return (".html",) if kind == "tokens" else (".png",)


# --------------------------------------------------------------------------- entry points


def _open(artifact: Artifact | Path | str) -> Artifact:
    return artifact if isinstance(artifact, Artifact) else open_artifact(artifact)


def explain(
    artifact: Artifact | Path | str,
    source: str | None = None,
    *,
    prompt: str | None = None,
    split: str | None = None,
    row: int | None = None,
    compare: Artifact | Path | str | None = None,
    options: ExplainOptions | None = None,
    out: Path | str | None = None,
    overwrite: bool = False,
) -> ExplainResult:
    """Explain one input (a file, a prompt, or row ``row`` of the artifact's ``split``), optionally
    also with a second artifact, and write the picture (PNG) or page (HTML) to ``out``."""
    opts = options or ExplainOptions()
    opts.check()
    given = [name for name, value in (("INPUT", source), ("--prompt", prompt), ("--data", split)) if value is not None]
    if len(given) != 1:
        raise UserError("give exactly one input: a file or prompt as INPUT, --prompt TEXT, or --data SPLIT"
                        + (f" (got {' and '.join(given)})" if given else ""))
    a = _open(artifact)
    kind = input_kind(a)
    if row is not None and kind == "tokens" and split is None:
        raise UserError("--row picks a sample of --data SPLIT; a prompt is one input, so drop --row")
    if prompt is not None and kind != "tokens":
        raise UserError("--prompt is for language models; this model takes " + kind + " inputs (give a file as INPUT)")
    out_path = check_output_file(out, overwrite, output_suffixes(kind)) if out is not None else None
    b = _open(compare) if compare is not None else None
    if opts.top_k is not None and b is None:
        raise UserError("--top-k is used with --compare ARTIFACT2; add it or drop --top-k")
    explainer = Explainer(a, opts.through, opts.threads)
    other = Explainer(b, opts.through, opts.threads) if b is not None else None
    if other is not None:
        explainer.check_compatible(other)
    target = explainer.resolve_target(opts.target)
    if split is not None:
        raw = dataset_inputs(a, split, 1, row or 0)[0]
    elif kind == "tokens":
        text = prompt if prompt is not None else source
        file = Path(text)
        if prompt is None and file.suffix == ".txt" and file.is_file():
            text = file.read_text(encoding="utf-8", errors="replace")
        raw = read_prompt(text, explainer.context)
        if other is not None:
            read_prompt(text, other.context)
    else:
        raw = read_input(a.data_spec, kind, source, row, opts.pixel_max)
    first = explainer.explain(raw, target, opts)
    second = agree = None
    if other is not None:
        second = other.explain(raw, first.target, opts)  # the same question: the same target
        agree = agreement(first, second, opts.top_k)
    result = ExplainResult(first, second, agree, str(out_path) if out_path else None)
    if out_path is not None:
        from . import explain_report

        with atomic_file(out_path) as tmp:
            explain_report.write(tmp, result)
    return result


def _summary(values: list[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=np.float64)
    if not len(arr):
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


def explain_split(
    artifact: Artifact | Path | str,
    split: str,
    samples: int,
    *,
    compare: Artifact | Path | str | None = None,
    options: ExplainOptions | None = None,
    out: Path | str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Explain the first ``samples`` inputs of ``split``. With ``compare``: how far the second model's
    explanations moved (mean rank correlation, top-k overlap). Without: the mean magnitude of each
    feature's attribution (a global importance). ``out`` (PNG, classification only) gets the mean maps."""
    opts = options or ExplainOptions()
    opts.check()
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    a = _open(artifact)
    b = _open(compare) if compare is not None else None
    kind = input_kind(a)
    if opts.top_k is not None and b is None:
        raise UserError("--top-k is used with --compare ARTIFACT2; add it or drop --top-k")
    out_path = None
    if out is not None:
        if kind == "tokens":
            raise UserError("--out with --samples writes mean attribution maps, which language models do not have; "
                            "drop --out (or explain one prompt to get HTML)")
        out_path = check_output_file(out, overwrite, (".png",))
    explainer = Explainer(a, opts.through, opts.threads)
    other = Explainer(b, opts.through, opts.threads) if b is not None else None
    if other is not None:
        explainer.check_compatible(other)
    target = explainer.resolve_target(opts.target)
    inputs = dataset_inputs(a, split, samples)
    progress = progress or (lambda *_a, **_k: None)
    progress("start", total=len(inputs))
    rhos, overlaps, gaps_a, gaps_b, same = [], [], [], [], []
    mean_a = mean_b = None
    k = None
    for i, raw in enumerate(inputs):
        ea = explainer.explain(raw, target, opts)
        gaps_a.append(ea.completeness_gap)
        mean_a = np.abs(ea.values) if mean_a is None else mean_a + np.abs(ea.values)
        if other is not None:
            eb = other.explain(raw, ea.target, opts)
            agree = agreement(ea, eb, opts.top_k)
            k = agree["top_k"]
            rhos.append(agree["rank_correlation"])
            overlaps.append(agree["top_k_overlap"])
            same.append(agree["same_prediction"])
            gaps_b.append(eb.completeness_gap)
            if kind != "tokens":
                mean_b = np.abs(eb.values) if mean_b is None else mean_b + np.abs(eb.values)
        progress("advance", done=i + 1, total=len(inputs))
    progress("done")
    n = len(inputs)
    result: dict[str, Any] = {
        "artifact": str(a.path), "via": explainer.via, "explained_with": str(explainer.source.path),
        "kind": kind, "split": split, "samples": n, "method": opts.method,
        "baseline": None if opts.method == "saliency" else (opts.baseline or ("mean" if kind == "tabular" else "zeros")),
        "target": None if target is None else explainer.class_name(target),
        "completeness_gap": _summary(gaps_a) if opts.method != "saliency" else None,
        "notes": explainer.notes,
    }
    if kind == "tokens":
        result["mean_abs_attribution_by_position"] = (mean_a / n).tolist()
    else:
        result["mean_abs_attribution"] = (mean_a / n).tolist()
        if kind == "tabular":
            result["features"] = explainer._feature_names()
    if other is not None:
        rho, overlap = _summary(rhos), _summary(overlaps)
        result["compare"] = {
            "artifact": str(b.path), "via": other.via, "explained_with": str(other.source.path), "notes": other.notes,
            "mean_rank_correlation": rho["mean"], "median_rank_correlation": rho["median"],
            "min_rank_correlation": rho["min"], "top_k": k, "mean_top_k_overlap": overlap["mean"],
            "prediction_agreement": float(np.mean(same)), "rank_correlations": rhos,
            "completeness_gap": _summary(gaps_b) if opts.method != "saliency" else None,
        }
        if mean_b is not None:
            result["compare"]["mean_abs_attribution"] = (mean_b / n).tolist()
    if out_path is not None:
        from . import explain_report

        with atomic_file(out_path) as tmp:
            explain_report.write_summary(tmp, result, input_shape=a.data_spec.get("input_shape"))
        result["out"] = str(out_path)
    return result


def explanation_agreement(
    artifact: Artifact | Path | str,
    other: Artifact | Path | str,
    *,
    split: str = "val",
    samples: int = 32,
    method: str = "integrated-gradients",
    baseline: str | None = None,
    steps: int | None = None,
    top_k: int | None = None,
    through: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """How much a second artifact (e.g. a compressed descendant) still relies on the same evidence,
    over the first ``samples`` inputs of ``split``, as a few numbers for ``bigmodel compare``:
    ``mean_rank_correlation`` (Spearman's rho of attribution magnitudes, averaged over inputs; 1 = the
    same ranking of evidence), ``mean_top_k_overlap``, ``top_k``, ``prediction_agreement``, ``samples``."""
    opts = ExplainOptions(method=method, baseline=baseline, steps=steps, top_k=top_k, through=through)
    full = explain_split(artifact, split, samples, compare=other, options=opts, progress=progress)
    cmp = full["compare"]
    return {
        "samples": full["samples"], "split": split, "method": method,
        "mean_rank_correlation": cmp["mean_rank_correlation"], "min_rank_correlation": cmp["min_rank_correlation"],
        "mean_top_k_overlap": cmp["mean_top_k_overlap"], "top_k": cmp["top_k"],
        "prediction_agreement": cmp["prediction_agreement"], "via": cmp["via"],
    }
