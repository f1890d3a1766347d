"""``bigmodel eval``: the task metric, the model's size, and (``--bench``) its latency.

Metrics come from ``tasks``; the model runs through a ``Backend`` (PyTorch or ONNX Runtime), so
both are measured by identical code.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..artifact import Artifact
from ..data import SPLITS
from ..errors import UserError
from .backends import Backend, open_backend
from .core.datasets import open_data
from .core.tasks import make_task


@dataclass
class BenchConfig:
    batch_size: int | None = None  # default: 1 for language models, 64 for classifiers
    warmup: int = 5
    iterations: int = 50
    seq_len: int | None = None  # language models; default: the artifact's training window


def check_limit(limit: int | None) -> None:
    """--limit N evaluates the first N samples (or windows); 0 or a negative N used to mean
    'everything' or 'all but the last N' without a word."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (samples or windows to evaluate), got {limit}")


def size_stats(artifact: Artifact, backend: str | None = None) -> dict:
    """Parameters, non-zero parameters and file size, from the weights on disk.

    ``backend="onnx"`` measures model.onnx even when the artifact also carries safetensors (an
    export keeps both), so each backend reports the file it actually runs.
    """
    from .info import parameter_counts

    runs_onnx = backend == "onnx" and artifact.has_onnx
    params, zeros = parameter_counts(artifact, onnx=runs_onnx or not artifact.has_weights)
    name = "model.onnx" if runs_onnx or not artifact.has_weights else "model.safetensors"
    return {"params": params, "nonzero_params": params - zeros, "file_bytes": artifact.file_bytes(name)}


def benchmark(predict: Callable, example: np.ndarray, cfg: BenchConfig, progress=None) -> dict:
    """Latency of ``predict(example)`` after warm-up: p50/p95 and throughput in samples/s."""
    for _ in range(cfg.warmup):
        predict(example)
    times = []
    for i in range(cfg.iterations):
        start = time.perf_counter()
        predict(example)
        times.append((time.perf_counter() - start) * 1000.0)
        if progress:
            progress("bench", done=i + 1, total=cfg.iterations)
    times.sort()
    p50 = statistics.median(times)
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    return {
        "latency_ms_p50": p50,
        "latency_ms_p95": p95,
        "throughput": len(example) / (p50 / 1000.0),
        "bench_batch": int(len(example)),
        "bench_iterations": cfg.iterations,
    }


# The timed input is built in memory before the first call; a batch beyond this is a typo (and the
# model's activations would be many times larger still), not a benchmark.
MAX_BENCH_INPUT_BYTES = 1 << 30


def check_bench_size(batch: int, values_per_sample: int, bytes_per_value: int) -> None:
    if batch < 1:
        raise UserError(f"--bench-batch must be at least 1, got {batch}")
    need = batch * values_per_sample * bytes_per_value
    if need > MAX_BENCH_INPUT_BYTES:
        raise UserError(f"--bench-batch {batch} makes a timed input of {need / 2**30:,.1f} GiB "
                        f"(at most {MAX_BENCH_INPUT_BYTES / 2**30:g} GiB); lower --bench-batch (or --seq-len)")


def bench_input(artifact: Artifact, task, cfg: BenchConfig) -> np.ndarray:
    if artifact.task == "language-modeling":
        batch = cfg.batch_size or 1
        seq = cfg.seq_len or artifact.data_spec.get("block_size", 128)
        check_bench_size(batch, seq, 8)
        rng = np.random.default_rng(0)
        return rng.integers(0, artifact.data_spec.get("vocab_size", 256), size=(batch, seq)).astype(np.int64)
    x = task.data.arrays("val")[0]
    if len(x) == 0:
        x = task.data.arrays("train")[0]
    batch = cfg.batch_size or 64
    check_bench_size(batch, int(np.prod(x.shape[1:])), 4)
    return np.resize(x, (batch, *x.shape[1:])).astype(np.float32)


def evaluate_artifact(
    artifact: Artifact,
    *,
    split: str = "val",
    data_arg: str | None = None,
    target: str | None = None,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    bench: BenchConfig | None = None,
    limit: int | None = None,
    progress=None,
    runner: Backend | None = None,
) -> dict:
    """One dict with the metric, the size and (with ``bench``) latency, plus where it ran."""
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose one of {', '.join(SPLITS)}")
    check_limit(limit)
    data = open_data(artifact, data_arg, target)
    runner = runner or open_backend(artifact, backend, device, threads)
    task = make_task(data, batch_size=64, block_size=artifact.data_spec.get("block_size"))
    metrics = task.evaluate(runner.predict, split, limit=limit)
    result = {
        "artifact": str(artifact.path),
        "stage": artifact.stage,
        "task": artifact.task,
        "split": split if not data_arg else f"{data_arg}:{split}",
        **metrics,
        **size_stats(artifact, runner.name),
        "backend": runner.name,
        "device": runner.device,
        "threads": runner.threads,
        **runner.detail,
    }
    if bench is not None:
        result.update(benchmark(runner.predict, bench_input(artifact, task, bench), bench, progress))
    return result


def benchmark_side_by_side(predicts: dict[str, Callable], example: np.ndarray, cfg: BenchConfig, progress=None) -> dict[str, dict]:
    """``benchmark`` for several backends at once, side by side: the backends take turns on the
    same input (``timing.take_turns``: why turns, not alternate calls), after warm-up."""
    from .core.timing import latency_stats, take_turns

    report = (lambda done, total: progress("bench", done=done, total=total)) if progress else None
    times = take_turns(predicts, example, cfg.iterations, cfg.warmup, report)
    out = {}
    for name, values in times.items():
        stats = latency_stats(values)
        out[name] = {
            **stats,
            "throughput": len(example) / (stats["latency_ms_p50"] / 1000.0),
            "bench_batch": int(len(example)),
            "bench_iterations": cfg.iterations,
        }
    return out


def evaluate_backends(
    artifact: Artifact,
    backends: tuple[str, ...] = ("torch", "onnx"),
    *,
    bench: BenchConfig | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress=None,
    **kwargs,
) -> dict:
    """The same report for several backends of one artifact, side by side: each is evaluated on the
    same data, and (with ``bench``) timed side by side on the same input with the same threads."""
    check_limit(kwargs.get("limit"))
    runners = {}
    for name in backends:
        runners[name] = open_backend(artifact, name, device, threads)
        threads = runners[name].threads  # the first backend's count is imposed on the others
    results = {name: evaluate_artifact(artifact, backend=name, device=device, runner=runner, progress=progress, **kwargs)
               for name, runner in runners.items()}
    if bench is not None:
        data = open_data(artifact, kwargs.get("data_arg"), kwargs.get("target"))
        task = make_task(data, batch_size=64, block_size=artifact.data_spec.get("block_size"))
        timings = benchmark_side_by_side({n: r.predict for n, r in runners.items()}, bench_input(artifact, task, bench), bench, progress)
        for name, timing in timings.items():
            results[name].update(timing)
    report = {"artifact": str(artifact.path), "backends": results}
    if bench is not None and len(backends) == 2:
        a, b = backends
        report[f"latency_ratio_{b}_over_{a}"] = results[b]["latency_ms_p50"] / results[a]["latency_ms_p50"]
    return report
