"""bigmodel predict: class, probabilities and top-k for a file of inputs (engine.predict)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, BackendOpt, JsonOpt, PixelMaxOpt, ThreadsOpt


def predict(
    artifact: ArtifactArg,
    input_file: Annotated[Path, typer.Argument(metavar="INPUT", help="A .npy/.npz array, a .csv/.txt of rows, or a .png/.jpg/.pgm image of the model's size.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", help="How many of the most likely classes to list.")] = 3,
    pixel_max: PixelMaxOpt = None,
    image_scale: Annotated[Optional[float], typer.Option("--image-scale", help="Deprecated, removed in the next release: the old name of --pixel-max.")] = None,
    backend: BackendOpt = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Classify the samples in INPUT with a classifier artifact (PyTorch or ONNX)."""
    from ..artifact import open_artifact
    from ..engine.inputs import shape_text
    from ..engine.predict import PredictOptions, predict_file

    pixel_max = _pixel_max(pixel_max, image_scale)
    result = predict_file(open_artifact(artifact), input_file, PredictOptions(
        top_k=top_k, pixel_max=pixel_max, backend=backend, device=device, threads=threads))
    if json_out:
        console.print_json(result)
        return
    where = result["backend"] + (f" · {result['provider']}" if "provider" in result else "")
    count = result["samples"]
    read = f"read {shape_text(result['read_as'])} as {count} sample{'s' if count != 1 else ''} of {shape_text(result['input_shape'])}"
    rows = [(p["index"], p["class"], f"{p['probability']:.4f}",
             ", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top_k"])) for p in result["predictions"]]
    console.out.print(console.rows_table(f"bigmodel predict · {result['input']} ({read}) · {where}",
                                         ["sample", "class", "probability", f"top-{top_k}"], rows))


def _pixel_max(pixel_max: float | None, image_scale: float | None) -> float | None:
    """--pixel-max, or the value of its deprecated old name --image-scale (with one warning line)."""
    from ..engine.inputs import pixel_max_problem
    from ..errors import UserError

    if image_scale is None:
        return pixel_max
    if pixel_max is not None:
        raise UserError("--image-scale is the deprecated name of --pixel-max; give only --pixel-max")
    problem = pixel_max_problem(image_scale, "--image-scale")
    if problem:
        raise UserError(problem)
    console.warn("--image-scale is deprecated and will be removed in the next release; use --pixel-max (same meaning)")
    return image_scale
