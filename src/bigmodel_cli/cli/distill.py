"""bigmodel distill: options → DistillConfig → engine.compress.distill → teacher vs baseline vs distilled."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import JsonOpt, parse_json_object
from .train import with_train_options

_S = "Student"
_L = "Losses"
_P = "Report"
# The student is defined by --student-*, and the teacher's data is the default, so the trainer's
# model-shaping flags make no sense here.
_NOT_FOR_DISTILL = ("tokenizer", "model", "preset", "model_args", "input_size", "hidden_size", "hidden_sizes", "output_size")


@with_train_options(exclude=_NOT_FOR_DISTILL)
def distill(
    teacher: Annotated[Optional[Path], typer.Option("--teacher", "-t", help="Teacher artifact (or training run directory).", show_default=False)] = None,
    student_preset: Annotated[Optional[str], typer.Option("--student-preset", help="A preset of the teacher's architecture, e.g. tiny or nano.", rich_help_panel=_S)] = None,
    student_config: Annotated[Optional[str], typer.Option("--student-config", help="JSON like config.json's model section, e.g. '{\"arch\": \"mlp\", \"hidden_sizes\": [32]}'.", rich_help_panel=_S)] = None,
    student: Annotated[Optional[Path], typer.Option("--student", help="Start from an existing artifact (its architecture and weights).", rich_help_panel=_S)] = None,
    init_from_teacher: Annotated[bool, typer.Option("--init-from-teacher", help="Copy every k-th teacher layer into the student (same widths, fewer layers).", rich_help_panel=_S)] = False,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Softens both distributions; > 0. Default: 2 for classifiers, 1 for language models.", rich_help_panel=_L, show_default=False)] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the teacher's soft targets; 1 − alpha weighs the labels.", rich_help_panel=_L)] = 0.5,
    kd_loss: Annotated[str, typer.Option("--kd-loss", help="forward-kl, reverse-kl or mse (logits).", rich_help_panel=_L)] = "forward-kl",
    hidden_loss: Annotated[Optional[str], typer.Option("--hidden-loss", help="Also match hidden states: mse or cosine.", rich_help_panel=_L)] = None,
    hidden_weight: Annotated[float, typer.Option("--hidden-weight", help="Weight of the hidden-state term.", rich_help_panel=_L)] = 1.0,
    layer_map: Annotated[Optional[str], typer.Option("--layer-map", help="STUDENT:TEACHER hidden layers, e.g. 0:1,1:3 (default: spread evenly).", rich_help_panel=_L)] = None,
    cache_teacher: Annotated[bool, typer.Option("--cache-teacher", help="Compute the teacher's outputs once (classification data that fits in memory).", rich_help_panel=_L)] = False,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also train the same student without the teacher (same budget and seed).", rich_help_panel=_P)] = False,
    report_split: Annotated[str, typer.Option("--report-split", help="Split the final comparison is measured on.", rich_help_panel=_P)] = "test",
    bench_iterations: Annotated[int, typer.Option("--bench-iterations", help="Latency runs per model in the comparison (0 skips latency).", rich_help_panel=_P)] = 30,
    json_out: JsonOpt = False,
    train_flags: dict | None = None,
) -> None:
    """Distil a teacher artifact into a smaller student; ends with teacher vs (baseline vs) distilled."""
    from ..config import TrainConfig, build_config
    from ..engine.compress.distill.command import DistillConfig, prepare_distill, run_distill
    from .progress import PhaseProgress

    flags = dict(train_flags or {})
    flags["out"] = flags.get("out") or "runs/distill"
    cfg = DistillConfig(
        teacher=str(teacher) if teacher else None, student_preset=student_preset,
        student_config=parse_json_object(student_config, "--student-config"), student=str(student) if student else None,
        temperature=temperature, alpha=alpha, kd_loss=kd_loss, hidden_loss=hidden_loss, hidden_weight=hidden_weight,
        layer_map=layer_map, init_from_teacher=init_from_teacher, cache_teacher=cache_teacher, baseline=baseline,
        report_split=report_split, bench_iterations=bench_iterations,
        train=build_config(TrainConfig, {}, flags, source="options"), choose_lr=flags.get("lr") is None,
    )
    plan = prepare_distill(cfg)
    if not json_out:
        console.note(f"student budget: {plan.record['budget']['why']}")
    unit = "tokens/s" if plan.job.task.name == "language-modeling" else "samples/s"
    result = run_distill(plan, PhaseProgress(unit, not json_out))
    summary = result.summary()
    if json_out:
        console.print_json(summary)
        return
    _print_report(summary)


def _print_report(summary: dict) -> None:
    report = summary["report"]
    metric = report["metric"]
    rows = []
    for name, m in report["models"].items():
        row = [name, m.get(metric)]
        if metric == "loss":
            row.append(m.get("perplexity"))
        row += [m["params"], m["file_bytes"], m.get("latency_ms_p50"), m.get("latency_ms_p95")]
        rows.append(row)
    columns = ["model", f"{report['split']} {metric}"] + (["perplexity"] if metric == "loss" else [])
    columns += ["parameters", "bytes", "latency p50 ms", "latency p95 ms"]
    console.out.print(console.rows_table(f"bigmodel distill · {summary['run_dir']}", columns, rows))
    facts = [("distilled artifact", summary["best"]), ("steps", summary["steps"]),
             ("student / teacher parameters", f"{report['param_ratio']:.2%}")]
    if "retention" in report:
        facts.append(("accuracy kept", f"{report['retention']:.2%}"))
    if "margin_vs_baseline" in report:
        better = "better" if report["margin_vs_baseline"] > 0 else "not better"
        facts.append((f"{metric} vs baseline", f"{report['margin_vs_baseline']:+.4f} ({better})"))
    if "note" in report:
        facts.append(("note", report["note"]))
    if "speedup_vs_teacher" in report:
        facts.append(("speed-up vs teacher (p50)", f"{report['speedup_vs_teacher']:.2f}×"))
    console.out.print(console.key_value_table("summary", facts))
