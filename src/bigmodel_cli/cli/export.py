"""bigmodel export: a PyTorch artifact → a verified ONNX artifact (engine.onnx.export.export_artifact), or with
--format hf a Hugging Face directory for other tools (engine.pretrained.hf_export.export_hf)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import console
from .options import ArtifactArg, JsonOpt, OverwriteOpt, ThreadsOpt

_STAGES = {"export": "exporting (dynamo, then TorchScript if needed)", "check": "running the ONNX checker",
           "optimize": "optimizing with ONNX Runtime", "verify": "verifying against PyTorch",
           "decoder": "exporting and verifying the cached decoder (decoder.onnx)", "write": "writing"}


def parse_dynamic(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    items = [v for v in value.replace(" ", "").split(",") if v]
    return [] if items == ["none"] else items


FORMATS = ("onnx", "hf")


def export(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output artifact directory (must not exist unless --overwrite).")],
    format_: Annotated[str, typer.Option("--format", help="onnx (a verified ONNX artifact) or hf (a Hugging Face directory that transformers loads; not an artifact).")] = "onnx",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset, 18 (the default) up to the installed onnx's newest.")] = None,
    dynamic: Annotated[Optional[str], typer.Option("--dynamic", help="Symbolic axes: batch,seq (default: batch, and seq for language models), or none.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, or fp16 weights and compute (inputs and outputs stay float32).")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda: where the model is traced and verified.")] = "cpu",
    optimize: Annotated[str, typer.Option("--optimize", help="none (raw graph), basic (exporter's folding; portable) or extended (+ ONNX Runtime fusions; ORT-only).")] = "basic",
    atol: Annotated[Optional[float], typer.Option("--atol", help="Largest allowed |PyTorch − ONNX Runtime| (default 1e-4 fp32, 5e-2 fp16).")] = None,
    exporter: Annotated[str, typer.Option("--exporter", help="auto (dynamo, then TorchScript), dynamo or torchscript.")] = "auto",
    weights: Annotated[bool, typer.Option("--weights/--no-weights", help="Also keep model.safetensors, so the directory runs on both backends.")] = True,
    decoder: Annotated[bool, typer.Option("--decoder/--no-decoder", help="Language models: also write decoder.onnx, the graph with past key values that generate uses.")] = True,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export an artifact to ONNX, verify it against PyTorch, and write it as a new artifact (or, with
    --format hf, write a Hugging Face directory)."""
    from ..artifact import open_artifact

    if format_ not in FORMATS:
        raise UserError(f"--format {format_!r} is not one of {', '.join(FORMATS)}")
    if format_ == "hf":
        onnx_only = {"--opset": opset is not None, "--dynamic": dynamic is not None, "--dtype": dtype != "fp32",
                     "--device": device != "cpu", "--optimize": optimize != "basic", "--atol": atol is not None,
                     "--exporter": exporter != "auto", "--no-weights": not weights, "--no-decoder": not decoder,
                     "--threads": threads is not None}
        given = [flag for flag, used in onnx_only.items() if used]
        if given:
            raise UserError(f"{', '.join(given)} applies to --format onnx only; drop it for --format hf")
        export_hf_dir(open_artifact(artifact), out, overwrite, json_out)
        return
    from ..engine.onnx.export import ExportOptions, export_artifact
    from .progress import status_stages

    options = ExportOptions(dynamic=parse_dynamic(dynamic), dtype=dtype, device=device, optimize=optimize,
                            atol=atol, exporter=exporter, weights=weights, decoder=decoder)
    if opset is not None:  # the engine owns the default
        options.opset = opset
    source = open_artifact(artifact)
    with console.err.status("exporting") as status:
        result = export_artifact(source, out, options, overwrite=overwrite, threads=threads,
                                 progress=status_stages(status, _STAGES))
    v, o = result.verification, result.onnx
    summary = {
        "path": str(result.path), "exporter": result.exporter, "opset": o["opset"], "dtype": o["dtype"],
        "optimize": o["optimize"], "inputs": o["inputs"], "outputs": o["outputs"], "portable": o["portable"],
        "external_data": o["external_data"], "verification": v, "exporter_fallback": result.fallback_reason,
        "files": {name: entry["bytes"] for name, entry in result.manifest["files"].items()},
        "decoder": o.get("decoder"), "decoder_verification": result.manifest.get("decoder_verification"),
    }
    if json_out:
        console.print_json(summary)
        return

    def sig(values):
        return ", ".join(f"{x['name']} {x['dtype']} ({'×'.join(str(d) for d in x['shape'])})" for x in values)

    rows = [
        ("artifact", summary["path"]), ("exporter", result.exporter), ("opset", o["opset"]), ("dtype", o["dtype"]),
        ("optimize", o["optimize"] + ("" if o["portable"] else " (ONNX Runtime only)")),
        ("inputs", sig(o["inputs"])), ("outputs", sig(o["outputs"])),
        ("max |diff|", v["max_abs_diff"]), ("max rel diff", v["max_rel_diff"]),
        ("top-1 agreement", f"{v['top1_agreement']:.2%}"), ("atol", v["atol"]),
        ("verified shapes", "; ".join("×".join(map(str, s)) for s in v["shapes"])), ("provider", v["provider"]),
        ("model.onnx bytes", summary["files"].get("model.onnx")),
    ]
    if summary["decoder"]:  # language models: the graph with past key values
        d = summary["decoder_verification"]
        rows.append(("cached decoder", f"decoder.onnx, {summary['files'].get('decoder.onnx')} bytes; prefill + "
                                       f"{d['decode_steps']} decode steps verified "
                                       f"({', '.join(map(str, d.get('batches', [])))}), max |diff| {d['max_abs_diff']:.3g}"))
    for data in ("model.onnx.data", "decoder.onnx.data"):  # the weights of a model over 2 GB
        if data in summary["files"]:
            rows.append((f"{data} bytes", summary["files"][data]))
    if result.fallback_reason:
        console.warn(f"the dynamo exporter failed, TorchScript was used ({result.fallback_reason})")
    console.out.print(console.key_value_table("bigmodel export · verified", rows))


def export_hf_dir(source, out: Path, overwrite: bool, json_out: bool) -> None:
    from ..engine.pretrained.hf_export import export_hf

    with console.err.status("writing the Hugging Face directory"):
        result = export_hf(source, out, overwrite=overwrite)
    summary = {"path": str(result.path), "format": "hf", "model_type": result.model_type, "tensors": result.tensors,
               "dtypes": result.dtypes, "tokenizer": result.tokenizer,
               "files": {name: entry["bytes"] for name, entry in result.files.items()}}
    if json_out:
        console.print_json(summary)
        return
    rows = [("directory", summary["path"]), ("model_type", result.model_type), ("tensors", result.tensors),
            ("dtypes", ", ".join(result.dtypes)), ("tokenizer", result.tokenizer),
            ("model.safetensors bytes", summary["files"].get("model.safetensors"))]
    console.out.print(console.key_value_table("bigmodel export · Hugging Face", rows))
