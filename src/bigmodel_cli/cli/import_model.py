"""bigmodel import: a local Hugging Face checkpoint → an artifact (engine.pretrained.hf_import).
The module is not called ``import``: that is a Python keyword."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import JsonOpt, OverwriteOpt


def import_command(
    source: Annotated[Path, typer.Argument(help="A local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json). Nothing is downloaded.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output artifact directory (must not exist unless --overwrite).")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp32, fp16 or bf16 (default: keep each tensor's stored dtype).")] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Import a Hugging Face checkpoint (gpt2, llama, mistral, qwen2) as a bigmodel artifact."""
    from ..engine.pretrained.hf_import import import_checkpoint
    from ..models import human_count, parameter_count

    with console.err.status("importing"):
        result = import_checkpoint(source, out, dtype=dtype, overwrite=overwrite)
    for note in result.notes:
        console.warn(note)
    spec, tok = result.spec, result.tokenizer
    summary = {"path": str(result.path), "model_type": result.model_type, "arch": spec["arch"],
               "parameters": parameter_count(spec), "tensors": result.tensors, "dtypes": result.dtypes,
               "context": spec["block_size"], "tokenizer_vocab": tok["vocab_size"] if tok else None,
               "notes": result.notes,
               "files": {name: entry["bytes"] for name, entry in result.manifest["files"].items()}}
    if json_out:
        console.print_json(summary)
        return
    rows = [("artifact", summary["path"]), ("model_type → arch", f"{result.model_type} → {spec['arch']}"),
            ("parameters", human_count(summary["parameters"])), ("tensors", result.tensors),
            ("dtype", ", ".join(result.dtypes)), ("context", spec["block_size"]),
            ("tokenizer", f"{tok['vocab_size']:,} tokens" if tok else "none (bytes)"),
            ("model.safetensors bytes", summary["files"].get("model.safetensors"))]
    console.out.print(console.key_value_table("bigmodel import", rows))
