"""bigmodel info: architecture, parameters per layer group, sparsity, lineage and metrics."""

from __future__ import annotations

from typing import Annotated

import typer

from . import console
from .options import ArtifactArg, JsonOpt


def info(
    artifact: ArtifactArg,
    layers: Annotated[bool, typer.Option("--layers", help="Also list every weight matrix with its sparsity.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Describe an artifact without running it (safe for artifacts with user model code)."""
    from ..artifact import open_artifact
    from ..engine.info import describe

    d = describe(open_artifact(artifact))
    if json_out:
        console.print_json(d)
        return
    model = ", ".join(f"{k}={v}" for k, v in d["model"].items() if k != "arch")
    console.out.print(console.key_value_table(f"bigmodel info · {d['path']}", [
        ("stage", d["stage"]), ("task", d["task"]), ("architecture", f"{d['model']['arch']} ({model})"),
        ("data", d["data"].get("name")), ("parameters", d["params"]), ("non-zero", d["nonzero_params"]),
        ("sparsity", f"{d['sparsity']:.1%}"), ("dtypes", ", ".join(d["dtypes"])),
        ("files", ", ".join(f"{n} ({b:,} B)" for n, b in d["files"].items())), ("created", d["created"]),
    ]))
    console.out.print(console.rows_table("parameters by layer group", ["group", "params", "sparsity", "dtype"],
                                         [(g["group"], g["params"], f"{g['sparsity']:.1%}", g["dtype"]) for g in d["groups"]]))
    if layers:
        console.out.print(console.rows_table("weights", ["tensor", "shape", "params", "sparsity"],
                                             [(r["name"], "×".join(map(str, r["shape"])), r["params"], f"{r['sparsity']:.1%}") for r in d["layers"]]))
    if d["metrics"]:
        console.out.print(console.key_value_table("metrics (from the manifest)", list(d["metrics"].items())))
    console.out.print(console.rows_table("lineage (newest first)", ["stage", "path"],
                                         [(e.get("stage") or "?", e.get("path")) for e in d["lineage"]]))
