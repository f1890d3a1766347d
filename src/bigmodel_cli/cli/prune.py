"""bigmodel prune: options → PruneConfig (+ the trainer's flags for fine-tuning) → engine.compress.prune →
a before/after table."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, JsonOpt, OutOpt, OverwriteOpt
from .train import with_train_options

_P = "Pruning"
_F = "Fine-tuning (the trainer's options)"

# The model and its data come from the artifact; --finetune-epochs replaces --epochs.
_NOT_FOR_PRUNE = ("tokenizer", "model", "preset", "model_args", "input_size", "hidden_size", "hidden_sizes", "output_size",
                  "data", "target", "epochs", "block_size", "resume")


@with_train_options(exclude=_NOT_FOR_PRUNE)
def prune(
    artifact: ArtifactArg,
    method: Annotated[str, typer.Option("--method", help="magnitude: zero individual weights; structured: remove whole units, channels and heads.", rich_help_panel=_P)] = "magnitude",
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="Fraction to remove, in [0, 1): of the weights (magnitude) or of each layer's units (structured).", rich_help_panel=_P)] = None,
    pattern: Annotated[Optional[str], typer.Option("--pattern", help="magnitude: N:M semi-structured sparsity, e.g. 2:4.", rich_help_panel=_P)] = None,
    scope: Annotated[Optional[str], typer.Option("--scope", help="magnitude: layer (every layer to --sparsity, default) or global (one threshold for all layers).", rich_help_panel=_P)] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", help="structured: l1, l2 (group magnitude, default) or taylor (gradients on calibration batches).", rich_help_panel=_P)] = None,
    head_sparsity: Annotated[float, typer.Option("--head-sparsity", help="structured gpt: fraction of attention heads to remove per block (llama: of key/value groups, each with its query heads).", rich_help_panel=_P)] = 0.0,
    round_to: Annotated[int, typer.Option("--round-to", help="structured: keep widths that are multiples of this (e.g. 8).", rich_help_panel=_P)] = 1,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Layer-name pattern to leave unpruned, e.g. 'net.0' or 'blocks.*.attn.*' (repeatable).", rich_help_panel=_P)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Prune in K increments along a cubic schedule, fine-tuning after each (default: 1, or a gradual schedule at sparsity ≥ 0.8 with --finetune-epochs; see docs/prune.md).", rich_help_panel=_P, show_default=False)] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Training epochs after each step (0: no fine-tuning; --max-steps also works). With no --steps/--lr, high sparsity gets a gradual schedule and a rate from the original run's.", rich_help_panel=_F)] = 0,
    calibration_batches: Annotated[int, typer.Option("--calibration-batches", help="taylor: training batches whose gradients score the units.", rich_help_panel=_P)] = 8,
    distill: Annotated[bool, typer.Option("--distill", help="Fine-tune against the unpruned model as teacher (bigmodel distill's loss).", rich_help_panel=_F)] = False,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="--distill: softens both distributions; > 0 (default 2).", rich_help_panel=_F)] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="--distill: weight of the teacher's soft targets (default 0.5).", rich_help_panel=_F)] = None,
    kd_loss: Annotated[Optional[str], typer.Option("--kd-loss", help="--distill: forward-kl (default), reverse-kl or mse.", rich_help_panel=_F)] = None,
    split: Annotated[str, typer.Option("--split", help="Split on which the report measures before and after.")] = "test",
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Measure torch latency before and after.")] = True,
    bench_iterations: Annotated[int, typer.Option("--bench-iterations", help="Timed runs of each model (the models take turns).")] = 30,
    bench_onnx: Annotated[bool, typer.Option("--bench-onnx", help="Also export before and after (verified, not kept) and time them with ONNX Runtime.")] = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    train_flags: dict | None = None,
) -> None:
    """Prune a model: zero weights (magnitude, N:M) or remove units (structured), optionally in steps
    with fine-tuning; writes OUT/best and reports before/after."""
    from ..artifact import open_artifact
    from ..config import TrainConfig, build_config
    from ..engine.compress.prune.command import PruneConfig, prune_artifact
    from .progress import PruneProgress

    cfg = PruneConfig(method=method, sparsity=sparsity, scope=scope, pattern=pattern, importance=importance,
                      head_sparsity=head_sparsity, round_to=round_to, ignore=list(ignore or []), steps=steps,
                      finetune_epochs=finetune_epochs, calibration_batches=calibration_batches, distill=distill,
                      temperature=temperature, alpha=alpha, kd_loss=kd_loss, split=split, bench=bench,
                      bench_iterations=bench_iterations, bench_onnx=bench_onnx, out=str(out) if out else None,
                      overwrite=overwrite)
    cfg.validate()
    train_cfg = build_config(TrainConfig, {}, train_flags)
    source = open_artifact(artifact)
    unit = "tokens/s" if source.task == "language-modeling" else "samples/s"
    choose_lr = (train_flags or {}).get("lr") is None  # no --lr: chosen from the original run's
    result = prune_artifact(source, cfg, train_cfg, PruneProgress(unit, not json_out), choose_lr=choose_lr)
    report = result.report
    if json_out:
        console.print_json({"run_dir": str(result.run_dir), "artifact": str(result.artifact),
                            "seconds": result.seconds, **report})
        return
    _print_report(result, report)


def _print_report(result, report: dict) -> None:
    before, after, ratio = report["before"], report["after"], report["ratio"]
    order = ["params", "nonzero_params", "file_bytes", "compressed_bytes", "accuracy", "perplexity", "loss",
             "bits_per_byte", "latency_ms_p50", "latency_ms_p95", "onnx_latency_ms_p50", "onnx_latency_ms_p95"]
    rows = [(k, before[k], after[k], ratio.get(k)) for k in order if k in before and k in after]
    title = f"bigmodel prune · {report['method']} · {result.artifact} · measured on {report['split']}"
    console.out.print(console.rows_table(title, ["", "before", "after", "after/before"], rows))
    layers = report["layers"]
    if layers and "sparsity" in layers[0]:
        console.out.print(console.rows_table("sparsity per layer", ["layer", "shape", "params", "sparsity"], [
            (r["layer"], "×".join(map(str, r["shape"])), r["params"], f"{r['sparsity']:.1%}") for r in layers]))
    elif layers:
        console.out.print(console.rows_table("widths per layer", ["layer", "kind", "original", "after"], [
            (r["layer"], r["kind"], r["original"], r["after"]) for r in layers]))
    if len(report["schedule"]) > 1 or any("finetune" in s for s in report["schedule"]):
        metric = "val_accuracy" if "accuracy" in before else "val_loss"
        console.out.print(console.rows_table("schedule", ["step", "sparsity", "fine-tune steps", f"best {metric}"], [
            (s["step"], f"{s['sparsity']:.1%}", (s.get("finetune") or {}).get("steps"), (s.get("finetune") or {}).get(metric))
            for s in report["schedule"]]))
    if report.get("latency"):
        lat = report["latency"]
        console.note(f"latency: {lat['backend']}, {lat['threads']} threads, input {tuple(lat['input_shape'])}, "
                     "before/after side by side on this machine")
    if report.get("onnx"):
        onnx = report["onnx"]
        console.note(f"onnx latency: {onnx['provider']}, {onnx['threads']} threads, exported with {onnx['exporter']}")
