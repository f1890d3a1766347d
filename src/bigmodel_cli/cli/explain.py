"""bigmodel explain: which parts of an input drove a prediction, and (--compare) whether another
artifact, such as a compressed descendant, relies on the same evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, JsonOpt, OverwriteOpt, PixelMaxOpt, ThreadsOpt

_MAX_GRID_WIDTH = 40  # images wider than this are not drawn in the terminal (see --out)


def explain_command(
    artifact: ArtifactArg,
    source: Annotated[Optional[str], typer.Argument(
        metavar="[INPUT]", show_default=False,
        help="A .npy/.npz array, a .csv/.txt of rows or a .png/.jpg/.pgm image (read as by predict); for a language model, the prompt text (or a .txt file).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Language models: the prompt whose next token is explained.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPLIT", help="Explain inputs from the artifact's own train, val or test split.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="With --data: summarise over the first N inputs (with --compare: mean rank correlation).")] = None,
    row: Annotated[Optional[int], typer.Option("--row", help="Which sample of a multi-sample INPUT file, or of --data SPLIT (default 0).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="Class (name or index) to explain, or the next token (one character) for language models. Default: the prediction.")] = None,
    method: Annotated[str, typer.Option("--method", help="integrated-gradients or saliency.")] = "integrated-gradients",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Integrated gradients: trapezoid intervals. Default: from 64, doubled until the attributions add up to f(input) − f(baseline) within 1%.")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="zeros, blur (images) or mean. Default: mean for tabular rows, zeros otherwise.")] = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", metavar="ARTIFACT2", help="Explain the same input with a second artifact and report how far the explanation moved.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="With --compare: how many top features the overlap counts (default 10, or a quarter of the features when fewer than 40).")] = None,
    through: Annotated[str, typer.Option("--through", help="ONNX-only artifacts: auto, torch (their PyTorch ancestor) or onnx (finite differences in ONNX Runtime).")] = "auto",
    pixel_max: PixelMaxOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write a picture (.png: images, tabular rows) or a page (.html: language models).")] = None,
    overwrite: OverwriteOpt = False,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Explain a prediction: input attributions as a heatmap, a ranked feature table or coloured tokens."""
    from ..engine.explain.command import ExplainOptions, explain, explain_split
    from ..errors import UserError
    from .progress import CountProgress

    options = ExplainOptions(method=method, steps=steps, baseline=baseline, target=target, through=through,
                             top_k=top_k, pixel_max=pixel_max, threads=threads)
    if samples is not None:
        if data is None or source is not None or prompt is not None:
            raise UserError("--samples summarises inputs of the artifact's own data: use it with --data SPLIT and no INPUT")
        if row is not None:
            raise UserError("--row picks one input; --samples N takes the first N of --data SPLIT, so drop --row")
        with CountProgress("explain", enabled=not json_out) as progress:
            summary = explain_split(artifact, data, samples, compare=compare, options=options, out=out,
                                    overwrite=overwrite, progress=progress)
        if json_out:
            console.print_json(summary)
        else:
            _print_summary(summary)
        return
    with console.err.status("explaining…", spinner="dots") if not json_out else _nothing():
        result = explain(artifact, source, prompt=prompt, split=data, row=row, compare=compare, options=options,
                         out=out, overwrite=overwrite)
    if json_out:
        console.print_json(result.to_dict())
        return
    _print_result(result)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- rendering


def _cell_style(value: float, scale: float, signed: bool) -> str:
    """White → red for positive (for the target), white → blue for negative; magnitude for saliency."""
    v = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    fade = int(round(255 * (1 - abs(v))))
    if not signed or v >= 0:
        return f"on rgb(255,{fade},{fade})"
    return f"on rgb({fade},{fade},255)"


def _grid(values, signed: bool, title: str):
    """An H×W heatmap as coloured terminal cells (two spaces each, so pixels look square)."""
    from rich.text import Text

    scale = float(abs(values).max())
    text = Text(title + "\n", style="bold")
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            text.append("  ", style=_cell_style(float(values[r, c]), scale, signed))
        text.append("\n")
    return text


def _tokens_text(explanation):
    from rich.text import Text

    from ..engine.explain.command import token_segments
    from ..engine.explain.report import token_colour

    segments = token_segments(explanation.input, explanation.values, explanation.segments)
    scale = max((abs(s["value"]) for s in segments), default=0.0)
    text = Text()
    for s in segments:
        r, g, b, alpha = token_colour(s["value"], scale)
        # blend the colour onto white by its opacity: terminals have no alpha
        bg = tuple(int(round(255 - (255 - ch) * alpha)) for ch in (r, g, b))
        text.append(s["text"].replace("\n", "⏎\n"), style=f"black on rgb({bg[0]},{bg[1]},{bg[2]})")
    return text


def _label(e) -> str:
    return e.artifact if e.explained_with == e.artifact else f"{e.artifact} (via {e.via}: {e.explained_with})"


def _read_as(result) -> list[tuple[str, str]]:
    """How an input file was read: the shape it held → the model's sample shape."""
    from ..engine.inputs import shape_text

    if result.read_as is None:
        return []
    r = result.read_as
    return [("input read as", f"{shape_text(r['read_as'])} → {shape_text(r['input_shape'])}")]


def _facts(e) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [("artifact", _label(e)), ("method", e.method)]
    if e.baseline:
        rows += [("baseline", e.baseline), ("intervals", e.intervals)]
    quote = (lambda t: f"'{t}'") if e.kind == "tokens" else str  # a token may be a space
    rows += [("prediction", quote(e.prediction_name)), ("target", f"{quote(e.target_name)} (p={e.target_probability:.3f})"),
             ("f(input)", e.score)]
    if e.baseline_score is not None:
        rows += [("f(baseline)", e.baseline_score), ("Σ attributions", e.attribution_sum),
                 ("completeness gap", f"{e.completeness_gap:.3%}")]
    return rows


def _print_result(result) -> None:
    import numpy as np

    from ..engine.explain.command import heatmap

    e, o = result.explanation, result.other
    title = "bigmodel explain" + (f" · {e.kind}" if o is None else " · compare")
    read = _read_as(result)
    if o is None:
        console.out.print(console.key_value_table(title, read + _facts(e)))
    else:
        table = console.rows_table(title, ["", "A", "B"], [])
        for key, value in read:  # both explain the same input
            table.add_row(key, value, value)
        for (key, a), (_, b) in zip(_facts(e), _facts(o)):
            table.add_row(key, console.fmt(a), console.fmt(b))
        console.out.print(table)
    explanations = [e] + ([o] if o is not None else [])
    signed = e.method == "integrated-gradients"
    if e.kind == "image" and e.values.shape[-1] <= _MAX_GRID_WIDTH:
        from rich.columns import Columns

        console.out.print(Columns([_grid(heatmap(x.values), signed, name)
                                   for x, name in zip(explanations, ("A", "B") if o is not None else ("attribution",))],
                                  padding=(0, 4)))
        console.note("red: evidence for the target, blue: against it" if signed else "brighter red: more sensitive")
    elif e.kind == "tabular":
        order = np.argsort(-np.abs(e.values), kind="mergesort")
        total = float(np.abs(e.values).sum()) or 1.0
        columns = ["feature", "value", "attribution", "share"] + (["B attribution", "B rank"] if o is not None else [])
        rank_b = {int(i): r + 1 for r, i in enumerate(np.argsort(-np.abs(o.values), kind="mergesort"))} if o is not None else {}
        rows = []
        for i in order:
            row = [e.feature_names[i], float(e.input[i]), float(e.values[i]), f"{abs(e.values[i]) / total:.1%}"]
            if o is not None:
                row += [float(o.values[i]), rank_b[int(i)]]
            rows.append(row)
        console.out.print(console.rows_table("feature attributions (strongest first)", columns, rows))
    elif e.kind == "tokens":
        for x, name in zip(explanations, ("A", "B")):
            console.out.print(f"[bold]{name if o is not None else 'prompt'}[/] (predicted next token '{x.prediction_name}'):", highlight=False)
            console.out.print(_tokens_text(x))
        console.note("red: evidence for the target token, blue: against it")
    if result.agreement is not None:
        a = result.agreement
        console.out.print(console.key_value_table("how far the explanation moved (B vs A)", [
            ("rank correlation", a["rank_correlation"]), (f"top-{a['top_k']} overlap", f"{a['top_k_overlap']:.0%}"),
            ("same prediction", a["same_prediction"]),
        ]))
    for x in explanations:
        for note in x.notes:
            console.warn(note)
    if result.out:
        console.note(f"wrote {result.out}")


def _print_summary(s: dict) -> None:
    import numpy as np

    gap = s.get("completeness_gap") or {}
    rows = [("artifact", s["artifact"] + ("" if s["via"] == "pytorch" else f" (via {s['via']}: {s['explained_with']})")),
            ("inputs", f"{s['samples']} from {s['split']}"), ("method", s["method"])]
    if s.get("baseline"):
        rows.append(("baseline", s["baseline"]))
    if gap.get("max") is not None:
        rows.append(("completeness gap (mean / max)", f"{gap['mean']:.3%} / {gap['max']:.3%}"))
    cmp = s.get("compare")
    if cmp is not None:
        rows += [("compared with", cmp["artifact"] + ("" if cmp["via"] == "pytorch" else f" (via {cmp['via']})")),
                 ("mean rank correlation", cmp["mean_rank_correlation"]),
                 ("median / min rank correlation", f"{console.fmt(cmp['median_rank_correlation'])} / {console.fmt(cmp['min_rank_correlation'])}"),
                 (f"mean top-{cmp['top_k']} overlap", f"{cmp['mean_top_k_overlap']:.0%}"),
                 ("same prediction", f"{cmp['prediction_agreement']:.0%}")]
    console.out.print(console.key_value_table("bigmodel explain · summary", rows))
    if s["kind"] == "image":
        from rich.columns import Columns

        from ..engine.explain.command import heatmap

        maps = [("A" if cmp else "mean |attribution|", s["mean_abs_attribution"])]
        if cmp is not None and cmp.get("mean_abs_attribution") is not None:
            maps.append(("B", cmp["mean_abs_attribution"]))
        if np.asarray(maps[0][1]).shape[-1] <= _MAX_GRID_WIDTH:
            console.out.print(Columns([_grid(heatmap(np.asarray(v)), False, name) for name, v in maps], padding=(0, 4)))
    if s["kind"] == "tabular":
        values = np.asarray(s["mean_abs_attribution"])
        order = np.argsort(-values, kind="mergesort")
        total = float(values.sum()) or 1.0
        console.out.print(console.rows_table("mean |attribution| (global importance)", ["feature", "mean |attribution|", "share"],
                                             [(s["features"][i], float(values[i]), f"{values[i] / total:.1%}") for i in order]))
    for note in s.get("notes", []) + ((cmp or {}).get("notes") or []):
        console.warn(note)
    if s.get("out"):
        console.note(f"wrote {s['out']}")
