"""Which model ``bigmodel explain`` differentiates, and how. ``Explainer`` wraps one artifact: its
preprocessing, its targets, and a differentiable model (the artifact's own PyTorch weights or a
PyTorch ancestor of an ONNX-only artifact) or the ONNX model itself, finite-differenced. Its
``explain`` turns one raw input into an ``Explanation``; attributions come from ``attribution``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...artifact import MANIFEST_FILE, Artifact, open_artifact, sha256_file
from ...errors import UserError
from . import attribution as attr
from ..inputs import shape_text
from .inputs import gaussian_blur
from .types import ExplainOptions, Explanation, token_text

# Finite differences cost 2·d + 1 model runs per path point; refine less far than autograd does.
FD_MAX_INTERVALS = 256


def as_artifact(artifact: Artifact | Path | str) -> Artifact:
    """An artifact given as itself or as its folder, opened."""
    return artifact if isinstance(artifact, Artifact) else open_artifact(artifact)


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
    """ONNX Runtime's predict for the artifact, or None while engine/onnx/runtime.py is not installed."""
    from ..backends import open_backend

    try:
        return open_backend(artifact, "onnx", threads=threads).predict
    except ImportError:  # the ONNX Runtime backend (engine/onnx/runtime.py) is not part of this build
        return None


class Explainer:
    """One artifact, ready to explain inputs: its preprocessing, its targets, and a differentiable
    (or finite-differenced) model."""

    def __init__(self, artifact: Artifact, through: str = "auto", threads: int | None = None):
        from ..core import hardware

        hardware.set_threads(threads)
        self.artifact = artifact
        # A language model's prompts, targets and segments go through its tokenizer (bytes without one).
        self.tokenizer = artifact.tokenizer() if artifact.task == "language-modeling" else None
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
                raise UserError("--through onnx needs the ONNX Runtime backend (engine/onnx/runtime.py), which this "
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
            return token_text(index) if self.tokenizer.is_byte_level else self.tokenizer.segments([index])[0]
        names = self.spec.get("class_names") or []
        return str(names[index]) if index < len(names) else str(index)

    def resolve_target(self, target: str | None) -> int | None:
        """--target as a class name or index (classification) or one character (language models)."""
        if target is None:
            return None
        if self.kind == "tokens" and not self.tokenizer.is_byte_level:
            ids = self.tokenizer.encode_plain(target)
            if len(ids) != 1:
                raise UserError(f"--target {target!r}: is {len(ids)} tokens of this model's tokenizer; a language "
                                "model's target is the next token, text that encodes to exactly one token")
            return ids[0]
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
        if self.kind == "tokens" and self.tokenizer.sha256 != other.tokenizer.sha256:
            raise UserError(f"--compare {b.path}: reads text with a different tokenizer than {a.path}; the same "
                            "prompt would be different ids, so compare models that share a tokenizer")
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
        from ...data.classification import preprocess

        return preprocess(raw[None], self.spec)[0].astype(np.float64)

    def _baseline(self, raw: np.ndarray, name: str) -> np.ndarray:
        if self.kind == "tokens":
            weight = self.embedding.weight.detach().double().numpy()
            if name == "blur":
                raise UserError("--baseline blur is for images; language models take zeros or mean")
            emb = np.zeros((len(raw), weight.shape[1])) if name == "zeros" else np.tile(weight.mean(axis=0), (len(raw), 1))
            return emb
        from ...data.classification import preprocess

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
            from ...data.classification import preprocess

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
            segments=self._segments(raw),
        )

    def _segments(self, raw: np.ndarray) -> list[str] | None:
        """Each token's own text, for a model with a tokenizer (byte-level ones group bytes into
        characters when shown, see token_segments)."""
        if self.kind != "tokens" or self.tokenizer.is_byte_level:
            return None
        return self.tokenizer.segments([int(i) for i in raw])

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
    vocab = artifact.model_spec.get("vocab_size") or artifact.data_spec.get("vocab_size", 256)  # rows, padded or not
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module
    raise UserError(f"{artifact.path}: the language model has no token embedding (an nn.Embedding with "
                    f"{vocab} rows) to attribute through; explain needs one")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()
