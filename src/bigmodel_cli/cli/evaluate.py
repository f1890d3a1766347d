"""bigmodel eval: the task metric, size and (--bench) latency of an artifact, on torch or ONNX Runtime."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, BackendOpt, DataOpt, JsonOpt, TargetOpt, ThreadsOpt

_ORDER = ["accuracy", "perplexity", "bits_per_byte", "loss", "samples", "tokens", "text_bytes", "params", "nonzero_params",
          "file_bytes", "latency_ms_p50", "latency_ms_p95", "throughput", "bench_batch", "backend", "provider",
          "device", "threads"]


def eval_command(
    artifact: ArtifactArg,
    split: Annotated[str, typer.Option("--split", help="train, val or test split of the artifact's data.")] = "val",
    data: DataOpt = None,
    target: TargetOpt = None,
    backend: BackendOpt = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: ThreadsOpt = None,
    bench: Annotated[bool, typer.Option("--bench", help="Also measure latency p50/p95 and throughput.")] = False,
    bench_batch: Annotated[Optional[int], typer.Option("--bench-batch", help="Batch size for --bench (default 64, or 1 for language models).")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Language models: sequence length for --bench.")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Timed runs for --bench.")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs before --bench measures.")] = 5,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate at most N samples (or windows).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate an artifact: accuracy or perplexity, parameters, size; --bench adds latency."""
    from ..artifact import open_artifact
    from ..engine.evaluate import BenchConfig, evaluate_artifact
    from ..errors import UserError

    if iterations < 1 or warmup < 0 or (bench_batch is not None and bench_batch < 1):
        raise UserError("--iterations and --bench-batch must be at least 1 and --warmup not negative")
    cfg = BenchConfig(batch_size=bench_batch, warmup=warmup, iterations=iterations, seq_len=seq_len) if bench else None
    source = open_artifact(artifact)
    if bench and backend == "auto" and source.has_weights and source.has_onnx:
        _side_by_side(source, cfg, split=split, data_arg=data, target=target, device=device, threads=threads,
                      limit=limit, json_out=json_out)
        return
    result = evaluate_artifact(source, split=split, data_arg=data, target=target, backend=backend,
                               device=device, threads=threads, bench=cfg, limit=limit)
    if json_out:
        console.print_json(result)
        return
    keys = [k for k in _ORDER if k in result]
    title = f"bigmodel eval · {result['artifact']} · {result['split']}"
    console.out.print(console.key_value_table(title, [(k, result[k]) for k in keys]))


def _side_by_side(source, cfg, *, json_out: bool, **kwargs) -> None:
    """--bench on an artifact with both model.safetensors and model.onnx: one report per backend,
    timed side by side (taking turns) with the same threads, in adjacent columns."""
    from ..engine.evaluate import evaluate_backends

    report = evaluate_backends(source, ("torch", "onnx"), bench=cfg, **kwargs)
    if json_out:
        console.print_json(report)
        return
    results = report["backends"]
    keys = [k for k in _ORDER if any(k in r for r in results.values()) and k != "backend"]
    rows = [(k, *(results[name].get(k) for name in results)) for k in keys]
    ratio = report.get("latency_ratio_onnx_over_torch")
    title = f"bigmodel eval --bench · {report['artifact']} · torch vs onnx" + (f" · onnx/torch p50 {ratio:.3g}×" if ratio else "")
    console.out.print(console.rows_table(title, ["", *results], rows))
