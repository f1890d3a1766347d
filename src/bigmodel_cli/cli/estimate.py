"""bigmodel estimate: parameters, memory and FLOPs without allocating the model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import console
from .options import JsonOpt, parse_json_object


def estimate(
    model: Annotated[str, typer.Option("--model", "-m", help="mlp, cnn, gpt or llama.")] = "gpt",
    preset: Annotated[Optional[str], typer.Option("--preset", help="Named size, e.g. 7b.")] = None,
    model_args: Annotated[Optional[str], typer.Option("--model-args", help="JSON overrides of model arguments.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16, fp16 or int8 weights/activations.")] = "bf16",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences (or samples) per step.")] = 1,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence (default: the model's context).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Estimate parameters, weight and training memory, and FLOPs per token (built on the meta device)."""
    from ..engine.estimate import estimate as run
    from ..models import human_bytes, human_count

    r = run(model, preset, parse_json_object(model_args, "--model-args"), precision, batch_size, seq_len)
    if json_out:
        console.print_json(r)
        return
    t = r["train"]
    console.out.print(console.key_value_table(
        f"bigmodel estimate · {r['model']['arch']} {r['model'].get('preset', '')} · {precision} · batch {batch_size}"
        + (f" × seq {r['seq_len']}" if r["seq_len"] else ""),
        [("parameters", f"{human_count(r['params'])} ({r['params']:,})"), ("weights (inference)", human_bytes(r["weight_bytes"])),
         ("train: weights" + (" + fp32 master" if precision != "fp32" else ""), human_bytes(t["weights"])),
         ("train: gradients", human_bytes(t["gradients"])), ("train: AdamW state", human_bytes(t["optimizer_state"])),
         ("train: activations (est.)", human_bytes(t["activations"])), ("train: total", human_bytes(t["total"])),
         ("FLOPs / token, forward", f"{r['flops_per_token_forward']:.3e}"), ("FLOPs / token, training", f"{r['flops_per_token_train']:.3e}")],
    ))
