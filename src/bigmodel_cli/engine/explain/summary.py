"""``bigmodel explain --samples``: the first inputs of a split explained and summarised, as a global
importance (mean attribution magnitudes) for one model or, with a second model, as how far its
explanations moved from the first's.

``explanation_agreement`` is the one-number summary that ``bigmodel compare`` can call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...artifact import Artifact
from ...errors import UserError
from ...output_file import atomic_file, check_output_file
from ..core.progress import Progress, no_progress
from . import report as explain_report
from .inputs import dataset_inputs
from .model import Explainer, as_artifact, input_kind
from .types import ExplainOptions, agreement


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
    a = as_artifact(artifact)
    b = as_artifact(compare) if compare is not None else None
    kind = input_kind(a)
    if opts.top_k is not None and b is None:
        raise UserError("--top-k is used with --compare ARTIFACT2; add it or drop --top-k")
    out_path = None
    if out is not None:
        if kind == "tokens":
            raise UserError("--out with --samples writes mean attribution maps, which language models do not have; "
                            "drop --out (or explain one prompt to get HTML)")
        out_path = check_output_file(out, overwrite, (".png",), what="this summary")
    explainer = Explainer(a, opts.through, opts.threads)
    other = Explainer(b, opts.through, opts.threads) if b is not None else None
    if other is not None:
        explainer.check_compatible(other)
    target = explainer.resolve_target(opts.target)
    inputs = dataset_inputs(a, split, samples)
    progress = progress or no_progress
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
