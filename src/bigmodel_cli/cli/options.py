"""Option aliases shared by several commands, so each flag has one name and one help text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ArtifactArg = Annotated[Path, typer.Argument(help="Artifact directory (or a training run directory: its best/ is used).", show_default=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (must not exist unless --overwrite).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch / ONNX Runtime (default: all cores).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="digits | csv:PATH | npz:PATH | text:PATH | text:stdlib | synthetic")]
TargetOpt = Annotated[Optional[str], typer.Option("--target", help="Class column for --data csv:PATH.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (data order, initialisation, dropout).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto (ONNX Runtime when the artifact has model.onnx), torch or onnx.")]
PixelMaxOpt = Annotated[Optional[float], typer.Option("--pixel-max", help="Image files: the raw value of a white pixel; pixels in [0, 1] are multiplied by it (default 16 for the bundled digits, else 255).")]
# Sampling, shared by generate and chat.
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k most likely tokens (0: all).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Sample among the most likely tokens holding this much "
                                        "probability, in (0, 1]; 1 keeps all.")]
RepetitionPenaltyOpt = Annotated[float, typer.Option("--repetition-penalty", help="Above 1 makes tokens already in "
                                                     "the context less likely; 1 is none.")]


def parse_json_object(value: str | None, flag: str) -> dict | None:
    import json

    from ..errors import UserError

    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag}: not valid JSON ({exc.msg}); write it like '{{\"hidden_sizes\": [64]}}'") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{flag}: must be a JSON object like '{{\"hidden_sizes\": [64]}}'")
    return parsed


def parse_int_list(value: str | None, flag: str) -> list[int] | None:
    from ..errors import UserError

    if value is None:
        return None
    try:
        items = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers like 512,512, got {value!r}") from None
    if not items:
        raise UserError(f"{flag}: expected comma-separated integers like 512,512")
    return items
