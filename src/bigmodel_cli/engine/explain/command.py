"""``bigmodel explain``: which parts of an input made the model predict what it did, and whether a
compressed descendant still relies on the same evidence.

Three kinds of input, decided by the artifact: images (input shape C×H×W or H×W), tabular rows
(a flat feature vector) and, for language models, a prompt whose byte tokens are attributed to the
next-token prediction. Attributions come from ``attribution`` (integrated gradients or saliency);
this module loads inputs, builds baselines, picks the target, decides *which model* is
differentiated (the artifact's own PyTorch weights, a PyTorch ancestor of an ONNX-only artifact, or
the ONNX model itself by finite differences) and compares two explanations.

``explanation_agreement`` is the one-number summary that ``bigmodel compare`` can call.

This module holds the single-input entry point ``explain`` and re-exports the rest, so everything
is importable from here: options and result types live in ``explain_types``, the model side
(``Explainer``) in ``model``, prompts and dataset rows in ``inputs`` (files are read by
``engine.inputs``, the reader ``bigmodel predict`` uses too), pictures, pages and output files in
``report``, and the summary over a split (``explain_split``, ``explanation_agreement``) in
``summary``.
"""

from __future__ import annotations

from pathlib import Path

from ...artifact import Artifact
from ...errors import UserError
from ...output_file import atomic_file, check_output_file
from . import report as explain_report
from ..inputs import read_inputs
from .inputs import dataset_inputs, read_prompt
from .model import FD_MAX_INTERVALS, Explainer, as_artifact, input_kind
from .report import output_suffixes
from .summary import explain_split, explanation_agreement
from .types import (
    BASELINES,
    THROUGH,
    ExplainOptions,
    ExplainResult,
    Explanation,
    Progress,
    agreement,
    heatmap,
    token_segments,
    token_text,
)

__all__ = [
    "BASELINES", "FD_MAX_INTERVALS", "THROUGH", "ExplainOptions", "ExplainResult", "Explainer", "Explanation",
    "Progress", "agreement", "atomic_file", "check_output_file", "explain", "explain_split",
    "explanation_agreement", "heatmap", "input_kind", "output_suffixes", "token_segments", "token_text",
]


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
    a = as_artifact(artifact)
    kind = input_kind(a)
    if row is not None and kind == "tokens" and split is None:
        raise UserError("--row picks a sample of --data SPLIT; a prompt is one input, so drop --row")
    if prompt is not None and kind != "tokens":
        raise UserError("--prompt is for language models; this model takes " + kind + " inputs (give a file as INPUT)")
    out_path = check_output_file(out, overwrite, output_suffixes(kind), what="this explanation") if out is not None else None
    b = as_artifact(compare) if compare is not None else None
    if opts.top_k is not None and b is None:
        raise UserError("--top-k is used with --compare ARTIFACT2; add it or drop --top-k")
    explainer = Explainer(a, opts.through, opts.threads)
    other = Explainer(b, opts.through, opts.threads) if b is not None else None
    if other is not None:
        explainer.check_compatible(other)
    target = explainer.resolve_target(opts.target)
    read_as = None
    if split is not None:
        raw = dataset_inputs(a, split, 1, row or 0)[0]
    elif kind == "tokens":
        text = prompt if prompt is not None else source
        file = Path(text)
        if prompt is None and file.suffix == ".txt" and file.is_file():
            text = file.read_text(encoding="utf-8", errors="replace")
        raw = read_prompt(text, explainer.context, explainer.tokenizer)
        if other is not None:
            read_prompt(text, other.context, other.tokenizer)
    else:
        inputs = read_inputs(source, a.data_spec, opts.pixel_max)
        raw, read_as = inputs.row(row), inputs.to_dict()
    first = explainer.explain(raw, target, opts)
    second = agree = None
    if other is not None:
        second = other.explain(raw, first.target, opts)  # the same question: the same target
        agree = agreement(first, second, opts.top_k)
    result = ExplainResult(first, second, agree, str(out_path) if out_path else None, read_as)
    if out_path is not None:
        with atomic_file(out_path) as tmp:
            explain_report.write(tmp, result)
    return result
