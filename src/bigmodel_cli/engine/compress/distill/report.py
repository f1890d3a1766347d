"""The ``bigmodel distill`` report: teacher, baseline and distilled student measured side by side.
Split out of ``command.py``, which re-exports ``compare_models``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from bigmodel_cli import artifact as art
from .options import DistillPlan


def compare_models(plan: DistillPlan, run, baseline, progress: Callable[..., None] | None = None) -> dict:
    """Teacher, baseline and distilled student on the same data, split and window: metric,
    parameters, size and latency (torch, this machine's threads)."""
    from ...evaluate import BenchConfig, evaluate_artifact
    from ...core.hardware import resolve_device

    cfg = plan.cfg
    student_art = art.open_artifact(run.best_dir)
    # The teacher is measured on the student's data spec, so a language model sees the same windows.
    teacher_view = replace(plan.teacher, config={**plan.teacher.config, "data": student_art.data_spec})
    entries = [("teacher", teacher_view)]
    if baseline is not None:
        entries.append(("baseline", art.open_artifact(baseline.best_dir)))
    entries.append(("distilled", student_art))
    bench = BenchConfig(warmup=min(5, cfg.bench_iterations), iterations=cfg.bench_iterations) if cfg.bench_iterations else None
    device = resolve_device(cfg.train.device)
    models = {}
    for name, artifact in entries:
        if progress is not None:
            progress("measure", name=name)
        result = evaluate_artifact(artifact, split=cfg.report_split, backend="torch", device=device,
                                   threads=cfg.train.threads, bench=bench)
        models[name] = {k: result[k] for k in ("artifact", "accuracy", "loss", "perplexity", "params", "file_bytes",
                                                "latency_ms_p50", "latency_ms_p95", "samples", "tokens") if k in result}
    metric = "accuracy" if plan.teacher.task == "classification" else "loss"
    report = {"split": cfg.report_split, "metric": metric, "models": models,
              "param_ratio": models["distilled"]["params"] / models["teacher"]["params"]}
    teacher_value, student_value = models["teacher"].get(metric), models["distilled"].get(metric)
    if student_value is None:  # an empty split (a tiny dataset): sizes and latency only
        report["note"] = f"the {cfg.report_split} split is empty; choose another --report-split for the metric"
    elif metric == "accuracy" and teacher_value:
        report["retention"] = student_value / teacher_value  # share of the teacher's accuracy kept
    base_value = models.get("baseline", {}).get(metric)
    if student_value is not None and base_value is not None:
        # Positive = distillation helped (higher accuracy, or lower loss).
        report["margin_vs_baseline"] = (student_value - base_value) if metric == "accuracy" else (base_value - student_value)
    if "latency_ms_p50" in models["teacher"]:
        report["speedup_vs_teacher"] = models["teacher"]["latency_ms_p50"] / models["distilled"]["latency_ms_p50"]
    return report
