"""bigmodel quantize: options → QuantizeOptions → engine.compress.quantize (quantize_artifact) → a before/after table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, JsonOpt, OverwriteOpt, ThreadsOpt

_Q = "Quantization"
_C = "Calibration (static) and the accuracy gate"
_W = "Weight-only"
_R = "Report"
_T = "Quantization-aware training"

_STAGES = {"export": "exporting to ONNX (--export)", "preprocess": "ONNX Runtime pre-processing",
           "quantize": "quantizing", "calibrate": "calibrating", "evaluate": "evaluating before and after",
           "rank": "ranking nodes by quantization error", "bench": "timing fp32 and int8 (side by side)",
           "load": "loading weights", "finetune": "fine-tuning with int8 simulated (--qat)", "write": "writing"}


def quantize(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output artifact directory (must not exist unless --overwrite).")],
    mode: Annotated[str, typer.Option("--mode", help="dynamic, static, weight-only (PyTorch int8/int4) or matmul-nbits (ONNX Runtime int4/int8 weights); auto: static for cnn, dynamic otherwise.", rich_help_panel=_Q)] = "auto",
    export: Annotated[bool, typer.Option("--export", help="Export a PyTorch artifact to ONNX first (else: run bigmodel export).", rich_help_panel=_Q)] = False,
    scheme: Annotated[str, typer.Option("--scheme", help="auto (chosen for this CPU), u8s8, s8s8 or u8u8: activation and weight types.", rich_help_panel=_Q)] = "auto",
    reduce_range: Annotated[Optional[bool], typer.Option("--reduce-range/--no-reduce-range", help="7-bit weights (default: on for x86 without VNNI).", show_default=False, rich_help_panel=_Q)] = None,
    per_channel: Annotated[bool, typer.Option("--per-channel/--no-per-channel", help="One weight scale per output channel.", rich_help_panel=_Q)] = False,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Node (ONNX) or tensor (weight-only) to keep in float; repeatable.", rich_help_panel=_Q)] = None,
    exclude_sensitive: Annotated[Optional[bool], typer.Option("--exclude-sensitive/--quantize-sensitive", help="static: keep LayerNorm, Softmax, GELU and residual Add in float (default: on for transformers).", show_default=False, rich_help_panel=_Q)] = None,
    preprocess: Annotated[bool, typer.Option("--preprocess/--no-preprocess", help="ONNX Runtime's pre-processing (shape inference, optimization) first.", rich_help_panel=_Q)] = True,
    method: Annotated[Optional[str], typer.Option("--method", help="static calibration: minmax (default), entropy or percentile.", rich_help_panel=_C)] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration inputs (samples, or windows for language models).", rich_help_panel=_C)] = 256,
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="Calibration inputs instead of the training split: npz:PATH, csv:PATH, text:PATH or a raw .npy array.", rich_help_panel=_C)] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="Class column for --calib-data csv:PATH.", rich_help_panel=_C)] = None,
    max_metric_drop: Annotated[Optional[float], typer.Option("--max-metric-drop", help="Accuracy gate: most accuracy points (or perplexity %) to lose; beyond it the worst nodes are kept in float and retried.", rich_help_panel=_C)] = None,
    max_retries: Annotated[int, typer.Option("--max-retries", help="Accuracy gate: retries (1, 2, 4 … worst nodes in float).", rich_help_panel=_C)] = 3,
    bits: Annotated[int, typer.Option("--bits", help="weight-only: 8 or 4 bits per weight.", rich_help_panel=_W)] = 8,
    group_size: Annotated[int, typer.Option("--group-size", help="weight-only --bits 4: weights per scale; matmul-nbits: the block size (power of two, 16+).", rich_help_panel=_W)] = 64,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="matmul-nbits: no zero point (asymmetric adds one per block).", rich_help_panel=_W)] = True,
    accuracy_level: Annotated[Optional[int], typer.Option("--accuracy-level", help="matmul-nbits: kernel compute type, 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8.", rich_help_panel=_W)] = None,
    split: Annotated[str, typer.Option("--split", help="Split on which the metric is measured before and after.", rich_help_panel=_R)] = "val",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Measure on at most N samples (or windows).", rich_help_panel=_R)] = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Time fp32 and int8 side by side.", rich_help_panel=_R)] = True,
    bench_batch: Annotated[Optional[int], typer.Option("--bench-batch", help="Batch for timing (default 64, or 1 for language models).", rich_help_panel=_R)] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Language models: sequence length for timing and calibration.", rich_help_panel=_R)] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Timed runs of each model.", rich_help_panel=_R)] = 30,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs first.", rich_help_panel=_R)] = 3,
    qat: Annotated[bool, typer.Option("--qat", help="Quantization-aware training: fine-tune with int8 simulated, then static QDQ int8 of the trained weights (see docs/quantize.md).", rich_help_panel=_T)] = False,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="--qat: fine-tuning epochs.", rich_help_panel=_T)] = 0,
    finetune_steps: Annotated[Optional[int], typer.Option("--finetune-steps", help="--qat: fine-tuning steps (instead of epochs).", rich_help_panel=_T)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="--qat: fine-tuning learning rate [default: 10% of the rate that trained the model].", rich_help_panel=_T)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="--qat: fine-tuning batch size.", rich_help_panel=_T)] = 64,
    patience: Annotated[Optional[int], typer.Option("--patience", help="--qat: stop after N evaluations without improvement.", rich_help_panel=_T)] = None,
    seed: Annotated[int, typer.Option("--seed", help="--qat: fine-tuning seed.", rich_help_panel=_T)] = 0,
    finetune_dir: Annotated[Optional[Path], typer.Option("--finetune-dir", help="--qat: keep the fine-tuning run (checkpoints, metrics.jsonl) in this directory.", rich_help_panel=_T)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="--qat: continue the run in --finetune-dir from its last checkpoint.", rich_help_panel=_T)] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="--qat: fine-tune with N processes on this machine (data parallel, as train --nproc; --batch-size stays the global batch).", rich_help_panel=_T)] = None,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Quantize to int8 on ONNX Runtime (dynamic, static QDQ, or --qat: fine-tuned with int8
    simulated), to int4/int8 MatMulNBits weights (matmul-nbits) or int8/int4 weights in PyTorch
    (weight-only); measure before and after, gate on the metric, and write a new artifact."""
    from ..artifact import open_artifact
    from ..config import TrainConfig
    from ..engine.compress.quantize.command import QuantizeOptions, quantize_artifact
    from .progress import StageProgress

    options = QuantizeOptions(
        mode=mode, method=method, calib_samples=calib_samples, calib_data=calib_data, target=target,
        per_channel=per_channel, scheme=scheme, reduce_range=reduce_range, exclude=list(exclude or []),
        exclude_sensitive=exclude_sensitive, bits=bits, group_size=group_size, symmetric=symmetric,
        accuracy_level=accuracy_level, max_metric_drop=max_metric_drop,
        max_retries=max_retries, export=export, preprocess=preprocess, split=split, limit=limit, bench=bench,
        bench_batch=bench_batch, seq_len=seq_len, iterations=iterations, warmup=warmup, threads=threads,
        qat=qat, finetune_epochs=finetune_epochs, finetune_steps=finetune_steps,
        finetune_dir=str(finetune_dir) if finetune_dir else None, nproc=nproc,
        finetune_lr=lr, train=TrainConfig(batch_size=batch_size, patience=patience, seed=seed, threads=threads, resume=resume) if qat else None)
    source = open_artifact(artifact)
    with StageProgress(_STAGES, enabled=not json_out) as progress:
        result = quantize_artifact(source, out, options, overwrite=overwrite, progress=progress)
    for warning in result.report["warnings"]:
        console.err.print(f"[bold red on yellow] WARNING [/] [bold]{warning}[/]", highlight=False)
    if json_out:
        console.print_json({"path": str(result.path), "mode": result.mode, "report": result.report,
                            "quantization": result.quantization, "gate": result.gate})
        return
    _print_report(result)


def _print_qat(title: str, report: dict) -> None:
    """fp32, post-training static int8 and QAT int8 side by side, and how the simulation matched."""
    columns = [report["before"], report["ptq"], report["after"]]
    rows = [(key.replace("_ms_", " ms "), *[c.get(key) for c in columns])
            for key in ("accuracy", "perplexity", "loss", "file_bytes", "latency_ms_p50", "latency_ms_p95")
            if all(key in c for c in columns)]
    agreement = report["qat"]["simulated_vs_onnx"]
    rows.append(("simulated vs ONNX top-1 agreement", "", "", f"{agreement['top1_agreement']:.2%}"))
    console.out.print(console.rows_table(title + " · QAT", ["", "fp32", "int8 post-training", "int8 QAT"], rows))


def _print_report(result) -> None:
    report, q = result.report, result.quantization
    before, after = report["before"], report["after"]
    rows = [("file bytes", before["file_bytes"], after["file_bytes"], f"{1 / report['size_ratio']:.3f}× ({report['size_ratio']:.2f}× smaller)")]
    changes = {"accuracy": lambda b, a: f"{(a - b) * 100 + 0.0:+.2f} points",
               "perplexity": lambda b, a: f"{(a / b - 1) * 100 + 0.0:+.2f}%",
               "loss": lambda b, a: f"{a - b + 0.0:+.4g}"}
    for key, change in changes.items():
        if key in before and key in after:
            rows.append((key, before[key], after[key], change(before[key], after[key])))
    for key in ("latency_ms_p50", "latency_ms_p95"):
        if key in before and key in after:
            rows.append((key.replace("_ms_", " ms "), before[key], after[key], f"{after[key] / before[key]:.3f}×"))
    kind = "int8" if result.mode not in ("weight-only", "matmul-nbits") else f"int{q['bits']} weights"
    title = f"bigmodel quantize · {result.mode} · {result.path}"
    if "ptq" in report:
        _print_qat(title, report)
    else:
        console.out.print(console.rows_table(title, ["", "fp32", kind, "change"], rows))

    info = [("metric drop", f"{report['metric_drop']:.3g} {report['metric_drop_unit']}")]
    if result.mode == "matmul-nbits":
        info += [("bits", q["bits"]), ("block size", q["block_size"]), ("symmetric", q["symmetric"]),
                 ("accuracy level", q["accuracy_level"]), ("MatMulNBits", q["quantized_matmuls"]),
                 ("output max |diff|", q["output_error"]["max_abs_diff"])]
        for when in ("before", "after"):
            if f"decode_{when}" in report:
                d = report[f"decode_{when}"]
                info.append((f"tokens/s {when}", f"prefill {d['prefill_tokens_per_s']:.0f}, decode {d['decode_tokens_per_s']:.0f}"))
    elif result.mode == "weight-only":
        info += [("bits", q["bits"]), ("group size", q["group_size"]), ("quantized tensors", len(q["tensors"])),
                 ("output max |diff|", q["output_error"]["max_abs_diff"]),
                 ("output top-1 agreement", f"{q['output_error']['top1_agreement']:.2%}")]
    else:
        s = q["scheme"]
        info += [("scheme", f"{s['name']} ({s['activation_type']} activations, {s['weight_type']} weights"
                            f"{', reduce_range' if s['reduce_range'] else ''})"), ("why", s["reason"]),
                 ("per channel", q["per_channel"]), ("quantized nodes", len(q["quantized_nodes"])),
                 ("kept in float", len(q["excluded_nodes"]))]
        if q["calibration"]:
            c = q["calibration"]
            info.append(("calibration", f"{c['method']} on {c['samples']} samples ({c['source']})"))
        if "decoder" in report:
            d = report["decoder"]
            if d["kept"]:
                speed = (f"; decode {d['decode_before']['decode_tokens_per_s']:.0f} → "
                         f"{d['decode_after']['decode_tokens_per_s']:.0f} tok/s" if "decode_after" in d else "")
                info.append(("decoder.onnx", f"int8 too, {d['metric_drop']:.3g} {report['metric_drop_unit']}{speed}"))
            else:
                info.append(("decoder.onnx", f"not kept: {d['why']}"))
        if "qat" in report:
            info.append(("fine-tuning", report["qat"]["selection"]))
    if "latency" in report:
        lat = report["latency"]
        info.append(("timed", f"input {'×'.join(map(str, lat['input_shape']))}, {lat['threads']} threads, side by side, this machine"))
    gate = result.gate
    if gate["max_metric_drop"] is not None:
        tries = len(gate["attempts"]) - 1
        info.append(("accuracy gate", f"passed (≤ {gate['max_metric_drop']:g} {gate['unit']})"
                     + (f" after {tries} retr{'y' if tries == 1 else 'ies'}; in float: {', '.join(gate['excluded'])}" if tries else "")))
    console.out.print(console.key_value_table("quantization", info))


def qat_worker(spec: Annotated[Path, typer.Argument(help="The worker spec quantize --qat --nproc wrote.")]) -> None:
    """One worker of `quantize --qat --nproc`: started by that command, not by hand (hidden)."""
    from ..engine.compress.quantize.qat import run_worker
    from ..engine.core.progress import no_progress

    # The launching command shows its own stages; a second live display from rank 0 would garble them.
    run_worker(spec, no_progress)
