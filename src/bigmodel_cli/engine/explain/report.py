"""Pictures and pages of explanations: a PNG (matplotlib, Agg) for images and tabular rows, an HTML
page of coloured tokens for language models. Called by ``explain`` with a temporary path that is
renamed into place afterwards, so these functions only draw; ``output_file.check_output_file`` (before
any work) and ``output_file.atomic_file`` (the temporary path and the rename) are that path's handling."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ... import __version__
from ..core.plot import pyplot
from .types import ExplainResult, Explanation, heatmap, token_segments

TOP_FEATURES = 20  # tabular bar charts show the strongest features only


def write(path: Path, result: ExplainResult) -> None:
    if result.explanation.kind == "tokens":
        path.write_text(token_html(result), encoding="utf-8")
    elif result.explanation.kind == "image":
        _image_figure(path, result)
    else:
        _tabular_figure(path, result)


def _label(e: Explanation) -> str:
    name = Path(e.artifact).name
    if name in ("best", "last"):
        name = f"{Path(e.artifact).parent.name}/{name}"
    return f"{name} ({e.via})" if e.via != "pytorch" else name


def _metadata(result: ExplainResult) -> dict:
    e = result.explanation
    info = {"artifact": e.artifact, "method": e.method, "baseline": e.baseline, "target": e.target_name}
    if result.other is not None:
        info.update(compare=result.other.artifact, **(result.agreement or {}))
    return {"Software": f"bigmodel {__version__}", "Description": json.dumps(info, default=str)}


def _display_image(raw: np.ndarray):
    """Raw C×H×W / H×W input → something imshow draws (grey for one channel, RGB for three)."""
    img = np.asarray(raw, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] == 3:
        img = img.transpose(1, 2, 0)
        span = img.max() - img.min()
        return (img - img.min()) / (span if span > 0 else 1.0), None
    if img.ndim == 3:
        img = img.mean(axis=0)
    return img, "gray"


def _draw_heatmap(ax, fig, values: np.ndarray, method: str, title: str):
    h = heatmap(values)
    if method == "saliency":
        im = ax.imshow(h, cmap="magma", vmin=0, vmax=max(float(h.max()), 1e-12))
    else:
        lim = max(float(np.abs(h).max()), 1e-12)
        im = ax.imshow(h, cmap="RdBu_r", vmin=-lim, vmax=lim)  # red: for the target, blue: against it
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _headline(e: Explanation) -> str:
    text = f"target {e.target_name} (p={e.target_probability:.2f}), predicted {e.prediction_name}"
    if e.completeness_gap is not None:
        text += f"; Σ attributions {e.attribution_sum:.3g} vs Δf {e.score - e.baseline_score:.3g}"
    return text


def _image_figure(path: Path, result: ExplainResult) -> None:
    plt = pyplot()
    e, o = result.explanation, result.other
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
    img, cmap = _display_image(e.input)
    axes[0].imshow(img, cmap=cmap)
    axes[0].set_title("input", fontsize=9)
    axes[0].axis("off")
    method = e.method + (f", baseline {e.baseline}" if e.baseline else "")
    _draw_heatmap(axes[1], fig, e.values, e.method, f"{_label(e)}\n{method}")
    if o is None:
        h = heatmap(e.values)
        lim = max(float(np.abs(h).max()), 1e-12)
        axes[2].imshow(img, cmap=cmap)
        cm = "magma" if e.method == "saliency" else "RdBu_r"
        axes[2].imshow(h, cmap=cm, vmin=0 if e.method == "saliency" else -lim, vmax=lim, alpha=0.6)
        axes[2].set_title("overlay", fontsize=9)
        axes[2].axis("off")
        fig.suptitle(_headline(e), fontsize=10)
    else:
        _draw_heatmap(axes[2], fig, o.values, o.method, f"{_label(o)}\npredicted {o.prediction_name}")
        a = result.agreement or {}
        rho = a.get("rank_correlation")
        fig.suptitle(f"target {e.target_name}: rank correlation {'n/a' if rho is None else f'{rho:.3f}'}, "
                     f"top-{a.get('top_k')} overlap {a.get('top_k_overlap', 0):.0%}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120, metadata=_metadata(result))
    plt.close(fig)


def _bars(ax, names: list[str], values: np.ndarray, order: np.ndarray, title: str, signed: bool = True):
    shown = order[:TOP_FEATURES][::-1]
    colours = ["#c0392b" if v >= 0 else "#2c7bb6" for v in values[shown]] if signed else "#7b3294"
    ax.barh([names[i] for i in shown], values[shown], color=colours)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=8)


def _tabular_figure(path: Path, result: ExplainResult) -> None:
    plt = pyplot()
    e, o = result.explanation, result.other
    names = e.feature_names or [str(i) for i in range(e.values.size)]
    order = np.argsort(-np.abs(e.values), kind="mergesort")
    rows = min(TOP_FEATURES, len(names))
    fig, axes = plt.subplots(1, 2 if o is not None else 1, figsize=(5.5 * (2 if o is not None else 1), 1.2 + 0.3 * rows),
                             squeeze=False)
    _bars(axes[0][0], names, e.values, order, f"{_label(e)}: {e.method}")
    if o is not None:
        _bars(axes[0][1], names, o.values, order, f"{_label(o)} (same feature order)")
        a = result.agreement or {}
        rho = a.get("rank_correlation")
        fig.suptitle(f"target {e.target_name}: rank correlation {'n/a' if rho is None else f'{rho:.3f}'}, "
                     f"top-{a.get('top_k')} overlap {a.get('top_k_overlap', 0):.0%}", fontsize=10)
    else:
        fig.suptitle(_headline(e), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120, metadata=_metadata(result))
    plt.close(fig)


def write_summary(path: Path, summary: dict, input_shape) -> None:
    """Mean |attribution| over the samples: maps (images) or bars (tabular), both models side by side."""
    plt = pyplot()
    panels = [(Path(summary["artifact"]), np.asarray(summary["mean_abs_attribution"]))]
    cmp = summary.get("compare")
    if cmp is not None:
        panels.append((Path(cmp["artifact"]), np.asarray(cmp["mean_abs_attribution"])))
    title = f"mean |{summary['method']}| over {summary['samples']} {summary['split']} samples"
    if cmp is not None and cmp["mean_rank_correlation"] is not None:
        title += f"; mean rank correlation {cmp['mean_rank_correlation']:.3f}, top-{cmp['top_k']} overlap {cmp['mean_top_k_overlap']:.0%}"
    if summary["kind"] == "image":
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for ax, (p, values) in zip(axes[0], panels):
            h = heatmap(values.reshape(input_shape))
            im = ax.imshow(h, cmap="magma", vmin=0)
            ax.set_title(p.name if p.name not in ("best", "last") else f"{p.parent.name}/{p.name}", fontsize=9)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    else:
        names = summary.get("features") or [str(i) for i in range(panels[0][1].size)]
        order = np.argsort(-panels[0][1], kind="mergesort")
        rows = min(TOP_FEATURES, len(names))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 1.2 + 0.3 * rows), squeeze=False)
        for ax, (p, values) in zip(axes[0], panels):
            _bars(ax, names, values, order, p.name, signed=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120, metadata={"Software": f"bigmodel {__version__}"})
    plt.close(fig)


# --------------------------------------------------------------------------- tokens as HTML


def token_colour(value: float, scale: float) -> tuple[int, int, int, float]:
    """Red for evidence for the target, blue against; opacity grows with |value| / scale."""
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    return ((214, 39, 40) if value >= 0 else (31, 119, 180)) + (round(strength * 0.85, 3),)


def _token_block(e: Explanation) -> str:
    segments = token_segments(e.input, e.values, e.segments)
    scale = max((abs(s["value"]) for s in segments), default=0.0)
    spans = []
    for s in segments:
        r, g, b, alpha = token_colour(s["value"], scale)
        text = html.escape(s["text"]).replace("\n", "⏎\n")
        spans.append(f'<span style="background:rgba({r},{g},{b},{alpha})" title="{s["value"]:.4g}">{text}</span>')
    gap = "" if e.completeness_gap is None else f", completeness gap {e.completeness_gap:.2%} ({e.intervals} intervals)"
    return (f'<h2>{html.escape(_label(e))}</h2>\n<p>predicted next token <code>\'{html.escape(e.prediction_name)}\'</code>; '
            f'explaining <code>\'{html.escape(e.target_name)}\'</code> (p={e.target_probability:.3f}) with {e.method}'
            f'{", baseline " + e.baseline if e.baseline else ""}{gap}</p>\n<div class="tokens">{"".join(spans)}</div>')


def token_html(result: ExplainResult) -> str:
    """A self-contained page: the prompt with each character shaded by its attribution."""
    blocks = [_token_block(result.explanation)]
    summary = ""
    if result.other is not None:
        blocks.append(_token_block(result.other))
        a = result.agreement or {}
        rho = a.get("rank_correlation")
        summary = (f"<p><b>rank correlation {'n/a' if rho is None else f'{rho:.3f}'}</b>, "
                   f"top-{a.get('top_k')} overlap {a.get('top_k_overlap', 0):.0%}</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bigmodel explain</title>
<meta name="generator" content="bigmodel {__version__}">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
.tokens {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; font-size: 15px;
           border: 1px solid #ddd; padding: .8rem; }}
.tokens span {{ border-radius: 2px; }}
</style></head><body>
<h1>Which prompt tokens drove the next-token prediction</h1>
{summary}
{chr(10).join(blocks)}
<p style="color:#666">Red: evidence for the explained token; blue: against it; hover a character for its value.</p>
</body></html>
"""


# --------------------------------------------------------------------------- output files


def output_suffixes(kind: str) -> tuple[str, ...]:
    return (".html",) if kind == "tokens" else (".png",)
