"""bigmodel predict: class, probabilities and top-k for a file of inputs (engine.predict)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import console
from .options import ArtifactArg, BackendOpt, JsonOpt, ThreadsOpt


def predict(
    artifact: ArtifactArg,
    input_file: Annotated[Path, typer.Argument(metavar="INPUT", help="A .npy array, a .csv of rows, or a .png/.pgm image of the model's size.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", help="How many of the most likely classes to list.")] = 3,
    image_scale: Annotated[float, typer.Option("--image-scale", help="Images: multiply pixel values in [0, 1] by this (16 for the bundled digits).")] = 1.0,
    backend: BackendOpt = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Classify the samples in INPUT with a classifier artifact (PyTorch or ONNX)."""
    from ..artifact import open_artifact
    from ..engine.predict import PredictOptions, predict_file

    result = predict_file(open_artifact(artifact), input_file, PredictOptions(
        top_k=top_k, image_scale=image_scale, backend=backend, device=device, threads=threads))
    if json_out:
        console.print_json(result)
        return
    where = result["backend"] + (f" · {result['provider']}" if "provider" in result else "")
    rows = [(p["index"], p["class"], f"{p['probability']:.4f}",
             ", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top_k"])) for p in result["predictions"]]
    console.out.print(console.rows_table(f"bigmodel predict · {result['input']} · {where}",
                                         ["sample", "class", "probability", f"top-{top_k}"], rows))
