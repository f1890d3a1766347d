"""``bigmodel compare`` and ``bigmodel plot``: what each step bought, measured side by side.

Every artifact is measured now, in one run, on the same backend, threads and input: the metric on
the same split, and latency with the artifacts taking turns on one input (``timing.take_turns``)
so that a noisy machine slows all of them alike. Figures are reported with their ratio to the first row; the ratio is the claim.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifact import Artifact, open_artifact
from ..errors import UserError
from ..output_file import atomic_write_bytes, check_output_file
from .core.plot import pyplot
from .core.progress import no_progress
from .core.timing import latency_stats, take_turns

METRIC_FOR_TASK = {"classification": "accuracy", "language-modeling": "perplexity"}


@dataclass
class CompareResult:
    rows: list[dict]
    backend: str
    threads: int
    split: str
    metric: str
    bench_batch: int
    rounds: int
    notes: list[str] = field(default_factory=list)


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """A `bigmodel run` directory stands for its artifact steps, in recipe order."""
    from .core.recipe_state import STATE_FILE

    expanded: list[Path] = []
    for path in map(Path, paths):
        state_file = path / STATE_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text(encoding="utf-8"))
            steps = [path / name for name, entry in state.items() if "--out" in entry.get("argv", [])]
            expanded += [p for p in steps if p.exists()]
        else:
            expanded.append(path)
    return expanded


def _open_all(paths: list[Path]) -> list[tuple[str, Artifact]]:
    if not paths:
        raise UserError("give at least one artifact (or a run directory of `bigmodel run`) to compare")
    opened = []
    for p in paths:
        artifact = open_artifact(p)
        name = Path(p).name if Path(p).name not in ("best", "last") else f"{Path(p).parent.name}/{Path(p).name}"
        opened.append((name, artifact))
    tasks = {a.task for _, a in opened}
    if len(tasks) > 1:
        raise UserError("these artifacts do different tasks (classification and language modelling); compare like with like")
    return opened


def _choose_backend(backend: str, artifacts: list[Artifact]) -> str:
    if backend not in ("auto", "torch", "onnx"):
        raise UserError(f"unknown --backend {backend!r}; choose auto, torch or onnx")
    if backend != "auto":
        return backend
    # One runtime for every row. Once anything has been exported, ONNX Runtime is the runtime the
    # model will be deployed on, so every row is measured there (PyTorch-only rows are exported
    # to a scratch directory first).
    return "onnx" if any(a.has_onnx for a in artifacts) else "torch"


def _runner(artifact: Artifact, backend: str, threads: int | None, workdir: Path, notes: list[str]):
    from .backends import open_backend

    if backend == "onnx" and not artifact.has_onnx:
        # Measure a PyTorch-only artifact on the same runtime: export it to a scratch directory.
        from .onnx.export import export_artifact

        out = workdir / f"export-{len(list(workdir.iterdir()))}"
        export_artifact(artifact, out, threads=threads)
        notes.append(f"{artifact.path}: exported to ONNX for this comparison (fp32)")
        return open_backend(open_artifact(out), "onnx", "cpu", threads)
    if backend == "torch" and not artifact.has_weights:
        raise UserError(f"{artifact.path}: is ONNX-only; compare with --backend onnx (or auto)")
    return open_backend(artifact, backend, "cpu", threads)


def compare_artifacts(paths: list[Path], *, backend: str = "auto", threads: int | None = None, split: str = "val",
                      bench_batch: int | None = None, rounds: int = 30, warmup: int = 3, limit: int | None = None,
                      explain_samples: int = 0, progress: Callable | None = None) -> CompareResult:
    from .core.datasets import open_data
    from .evaluate import BenchConfig, bench_input, check_limit, size_stats
    from .core.tasks import make_task

    if rounds < 1 or warmup < 0:
        raise UserError("--rounds must be at least 1 and --warmup not negative")
    if bench_batch is not None and bench_batch < 1:
        raise UserError(f"--bench-batch must be at least 1, got {bench_batch}")
    check_limit(limit)
    say = progress or no_progress
    opened = _open_all(expand_run_dirs(paths))
    backend = _choose_backend(backend, [a for _, a in opened])
    first = opened[0][1]
    metric = METRIC_FOR_TASK[first.task]
    notes: list[str] = []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bigmodel-compare-") as tmp:
        runners = []
        for name, artifact in opened:
            say("open", name=name)
            runner = _runner(artifact, backend, threads, Path(tmp), notes)
            data = open_data(artifact)
            task = make_task(data, batch_size=64, block_size=artifact.data_spec.get("block_size"))
            say("evaluate", name=name)
            metrics = task.evaluate(runner.predict, split, limit=limit)
            rows.append({"name": name, "path": str(artifact.path), "stage": artifact.stage,
                         # the file this artifact ships: model.onnx where it has one and ONNX is the runtime
                         **size_stats(artifact, backend=backend), "metric": metric, "value": metrics.get(metric),
                         "loss": metrics.get("loss"), "bits_per_byte": metrics.get("bits_per_byte"),
                         "backend": runner.name, "provider": runner.detail.get("provider")})
            runners.append((runner, task, artifact))
        example = bench_input(first, runners[0][1], BenchConfig(batch_size=bench_batch))
        # keyed by position: two rows may carry the same name
        times = take_turns({i: r.predict for i, (r, _, _) in enumerate(runners)}, example, rounds, warmup,
                           lambda done, total: say("bench", done=done, total=total))
    for i, row in enumerate(rows):
        row.update(latency_stats(times[i]))
    if explain_samples:
        _add_explanation_agreement(opened, rows, split, explain_samples)
    base = rows[0]
    for row in rows:
        for key in ("params", "nonzero_params", "file_bytes", "value", "latency_ms_p50", "latency_ms_p95"):
            row[f"{key}_ratio"] = (row[key] / base[key]) if base.get(key) and row.get(key) is not None else None
    return CompareResult(rows=rows, backend=backend, threads=runners[0][0].threads, split=split, metric=metric,
                         bench_batch=int(len(example)), rounds=rounds, notes=notes)


def _add_explanation_agreement(opened: list, rows: list[dict], split: str, samples: int) -> None:
    """Does each artifact still look at the same evidence as the first? Mean Spearman correlation
    of integrated-gradients attributions over ``samples`` inputs (bigmodel explain --samples)."""
    from .explain.command import explanation_agreement

    first = opened[0][1]
    rows[0]["explain_rank_correlation"] = 1.0
    for (_, artifact), row in zip(opened[1:], rows[1:]):
        agreement = explanation_agreement(first, artifact, split=split, samples=samples)
        row["explain_rank_correlation"] = agreement["mean_rank_correlation"]
        row["explain_top_k_overlap"] = agreement["mean_top_k_overlap"]


# ------------------------------------------------------------------ pictures and reports


def figure_png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (and closed): rendered in memory, so that the file
    is written in one atomic step (``output_file.atomic_write_bytes``)."""
    import io

    plt = pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def tradeoff_png(result: CompareResult) -> bytes:
    """Metric against latency; marker area by file size; every point labelled."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = [r["file_bytes"] for r in result.rows]
    biggest = max(sizes) or 1
    for row in result.rows:
        area = 60 + 1400 * row["file_bytes"] / biggest
        ax.scatter(row["latency_ms_p50"], row["value"], s=area, alpha=0.55, edgecolors="black")
        ax.annotate(f"{row['name']}\n{row['file_bytes'] / 1024:,.0f} KiB", (row["latency_ms_p50"], row["value"]),
                    textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xlabel(f"latency p50, ms ({result.backend}, batch {result.bench_batch}, {result.threads} threads)")
    ax.set_ylabel(f"{result.metric} ({result.split})" + (" — lower is better" if result.metric == "perplexity" else ""))
    ax.set_title("What each step bought (marker area ∝ file size)", fontsize=11)
    ax.margins(x=0.18, y=0.15)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def plot_tradeoff(result: CompareResult, path: Path | str, flag: str = "--plot") -> Path:
    """The trade-off plot written to ``path`` atomically; ``flag`` names the path in an error."""
    return atomic_write_bytes(path, tradeoff_png(result), flag)


COLUMNS = [("name", "artifact"), ("stage", "stage"), ("params", "params"), ("nonzero_params", "non-zero"),
           ("file_bytes", "file bytes"), ("value", "metric"), ("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms")]


def columns_for(result: CompareResult) -> list[tuple[str, str]]:
    extra = [("explain_rank_correlation", "explain ρ")] if "explain_rank_correlation" in result.rows[0] else []
    # Perplexity is per token, so it compares only models with one tokenizer; bits per byte
    # compares any two language models.
    if result.metric == "perplexity":
        at = COLUMNS.index(("value", "metric")) + 1
        return COLUMNS[:at] + [("bits_per_byte", "bits/byte")] + COLUMNS[at:] + extra
    return COLUMNS + extra


def table_cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    text = f"{value:,}" if isinstance(value, int) else (f"{value:.4g}" if isinstance(value, float) else str(value))
    ratio = row.get(f"{key}_ratio")
    if ratio is not None and key not in ("name", "stage"):
        text += f" ({ratio:.2f}×)"
    return text


def markdown_report(result: CompareResult, plot_name: str | None = None) -> str:
    from .core.hardware import machine_info

    m = machine_info()
    lines = [f"# Comparison ({result.metric} on {result.split}; latency on {result.backend}, "
             f"batch {result.bench_batch}, {result.threads} threads, {result.rounds} timed calls each, taking turns)", ""]
    columns = columns_for(result)
    lines.append("| " + " | ".join(title for _, title in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in result.rows:
        lines.append("| " + " | ".join(table_cell(row, key) for key, _ in columns) + " |")
    lines += ["", "Ratios in parentheses are to the first row.",
              f"Machine: {m['cpu']} ({m['cores']} cores; {' '.join(m['isa'])})."]
    lines += [f"Note: {n}" for n in result.notes]
    if plot_name:
        lines += ["", f"![trade-off]({plot_name})"]
    return "\n".join(lines) + "\n"


def html_report(result: CompareResult, plot_png: bytes | None) -> str:
    columns = columns_for(result)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(table_cell(r, k))}</td>" for k, _ in columns) + "</tr>" for r in result.rows)
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in columns)
    image = ""
    if plot_png is not None:
        data = base64.b64encode(plot_png).decode()
        image = f'<p><img alt="trade-off" src="data:image/png;base64,{data}"></p>'
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>bigmodel compare</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style>"
            f"</head><body><h1>What each step bought</h1><p>{html.escape(result.metric)} on {html.escape(result.split)}; "
            f"latency on {html.escape(result.backend)}, batch {result.bench_batch}, {result.threads} threads, "
            f"{result.rounds} timed calls each, taking turns. Ratios are to the first row.</p>"
            f"<table><tr>{head}</tr>{rows}</table>{image}<ul>{notes}</ul></body></html>\n")


# ------------------------------------------------------------------ training curves


def read_metrics(run_dir: Path | str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; give a training run directory (bigmodel train --out DIR)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
    return records


def plot_training(run_dir: Path | str, out: Path | str, overwrite: bool = False) -> Path:
    """Loss, validation metric and learning rate against the step, one panel each."""
    check_output_file(out, overwrite, (".png",), what="the training curves")
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    if not steps:
        raise UserError(f"{run_dir}: metrics.jsonl has no training steps yet")
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    if evals and "val_loss" in evals[0]:
        axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val loss")
    axes[0].set_title("loss")
    axes[0].legend()
    metric = next((k for k in ("val_accuracy", "val_perplexity", "val_bits_per_byte") if evals and k in evals[0]), None)
    if metric:
        axes[1].plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", ms=3)
        axes[1].set_title(metric.replace("val_", "validation "))
    axes[2].plot([r["step"] for r in steps], [r["lr"] for r in steps])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    return atomic_write_bytes(out, figure_png(fig))
