"""The before/after report: file size, the task metric, and latency on the same threads.

Both models are evaluated by the same code (``tasks``) on the same split, and timed side by side
(taking turns, ``evaluate.benchmark_side_by_side``) on the same input with the same intra-op threads,
with thread-pool spinning off for both: two sessions timed in turn in one process would otherwise
fight over the cores with their idle spinning threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from bigmodel_cli.artifact import Artifact
from ...core.datasets import open_data
from ...evaluate import BenchConfig, benchmark_side_by_side, bench_input
from ...core.tasks import make_task

METRIC_KEYS = ("accuracy", "perplexity", "loss", "bits_per_byte", "samples", "tokens")


def model_bytes(path: Path) -> int:
    """A model file with its external data, if any."""
    from ...onnx.files import data_path

    data = data_path(path)  # model.onnx.data: the layout every ONNX file here ends in (onnx_files.place)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class Evaluator:
    """The task metric of any ``predict`` on one split of the artifact's data (loaded once)."""

    def __init__(self, artifact: Artifact, split: str, limit: int | None):
        data = open_data(artifact)
        self.task = make_task(data, batch_size=64, block_size=artifact.data_spec.get("block_size"))
        self.split, self.limit = split, limit

    def __call__(self, predict: Callable[[np.ndarray], np.ndarray]) -> dict:
        metrics = self.task.evaluate(predict, self.split, limit=self.limit)
        return {k: metrics[k] for k in METRIC_KEYS if k in metrics}


def onnx_predict(path: Path, threads: int | None):
    from ...onnx.runtime import open_session, session_predict

    session, _ = open_session(path, threads=threads)
    return session_predict(session)


def latency(paths: dict[str, Path], artifact: Artifact, evaluator: Evaluator, cfg: BenchConfig,
            threads: int | None, progress: Callable | None = None) -> dict:
    """p50/p95 of each model on the same input, side by side, same threads, spinning off."""
    from ...onnx.runtime import open_session, session_predict

    predicts, used = {}, None
    for name, path in paths.items():
        session, used = open_session(path, threads=threads, spin=False)
        predicts[name] = session_predict(session)
    example = bench_input(artifact, evaluator.task, cfg)
    timings = benchmark_side_by_side(predicts, example, cfg, progress)
    return {"threads": used, "input_shape": list(example.shape), "spinning": False, "iterations": cfg.iterations,
            **{name: {k: t[k] for k in ("latency_ms_p50", "latency_ms_p95", "throughput")} for name, t in timings.items()}}


def build_report(task: str, before: dict, after: dict, timing: dict | None) -> dict:
    """Side by side, with ratios, the metric delta and warnings (int8 slower than fp32 above all)."""
    from .gate import drop_unit, metric_drop

    metric = "perplexity" if task == "language-modeling" else "accuracy"
    report = {
        "metric": metric,
        "before": {**before},
        "after": {**after},
        "size_ratio": before["file_bytes"] / after["file_bytes"],
        "metric_delta": after[metric] - before[metric],
        "metric_drop": metric_drop(task, before, after),
        "metric_drop_unit": drop_unit(task).strip(),
        "warnings": [],
    }
    if timing:
        for side in ("before", "after"):
            report[side].update(timing[side])
        report["latency_ratio"] = timing["after"]["latency_ms_p50"] / timing["before"]["latency_ms_p50"]
        report["latency"] = {k: timing[k] for k in ("threads", "input_shape", "spinning", "iterations")}
        if report["latency_ratio"] > 1.0:
            report["warnings"].append(
                f"int8 is SLOWER than fp32 here: p50 {timing['after']['latency_ms_p50']:.3g} ms vs "
                f"{timing['before']['latency_ms_p50']:.3g} ms ({report['latency_ratio']:.2f}×) at input "
                f"{'×'.join(map(str, timing['input_shape']))} with {timing['threads']} threads on this CPU; "
                "int8 pays off for larger matrices and on CPUs with VNNI — keep the fp32 model for speed")
    if report["size_ratio"] < 1.0:
        report["warnings"].append("the quantized file is LARGER than the fp32 one (the model has few weights to quantize)")
    return report


def manifest_metrics(report: dict) -> dict:
    """The manifest's metrics: the quantized model's figures, plus what quantization changed."""
    after = report["after"]
    metrics = {k: after[k] for k in ("accuracy", "perplexity", "loss", "bits_per_byte", "file_bytes",
                                     "latency_ms_p50", "latency_ms_p95") if k in after}
    metrics.update(size_ratio=report["size_ratio"], metric_drop=report["metric_drop"])
    if "latency_ratio" in report:
        metrics["latency_ratio"] = report["latency_ratio"]
    return metrics
