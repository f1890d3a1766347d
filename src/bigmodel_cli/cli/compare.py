"""bigmodel compare / plot: what each step bought, measured side by side; training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import BackendOpt, JsonOpt, ThreadsOpt


def print_comparison(result) -> None:
    from ..engine.compare import columns_for, table_cell

    columns = columns_for(result)
    title = (f"bigmodel compare · {result.metric} on {result.split} · latency on {result.backend}, batch "
             f"{result.bench_batch}, {result.threads} threads, {result.rounds} timed calls each · (×) = ratio to the first row")
    table = console.rows_table(title, [t for _, t in columns], [])
    for row in result.rows:
        table.add_row(*(table_cell(row, key) for key, _ in columns))
    console.out.print(table)
    for note in result.notes:
        console.note(note)


def check_reports(plot: Path | None, markdown: Path | None, html_file: Path | None, overwrite: bool) -> None:
    """Before the measurement: each report file named (and the plot a Markdown report writes beside
    itself) has the right suffix and may be written — a refusal after minutes of timing helps no one."""
    from ..output_file import check_output_file

    if plot:
        check_output_file(plot, overwrite, (".png",), "--plot", "the trade-off plot")
    if markdown:
        check_output_file(markdown, overwrite, (".md", ".markdown"), "--markdown", "the report")
        if not plot:
            check_output_file(markdown.with_suffix(".png"), overwrite, (".png",), f"--markdown {markdown} writes its plot to")
    if html_file:
        check_output_file(html_file, overwrite, (".html", ".htm"), "--html", "the report")


def write_reports(result, plot: Path | None, markdown: Path | None, html_file: Path | None) -> list[Path]:
    """The PNG, Markdown and HTML reports asked for, each written atomically; a report gets a plot
    even if none was named."""
    from ..engine.compare import html_report, markdown_report, tradeoff_png
    from ..output_file import atomic_write_bytes

    if not (plot or markdown or html_file):
        return []
    png = tradeoff_png(result)
    written = []
    if plot:
        written.append(atomic_write_bytes(plot, png, "--plot"))
    if markdown:
        picture = plot or markdown.with_suffix(".png")
        if not plot:
            written.append(atomic_write_bytes(picture, png, "--markdown"))
        rel = picture.name if picture.parent.resolve() == markdown.parent.resolve() else str(picture.resolve())
        written.append(atomic_write_bytes(markdown, markdown_report(result, rel).encode("utf-8"), "--markdown"))
    if html_file:
        written.append(atomic_write_bytes(html_file, html_report(result, png).encode("utf-8"), "--html"))
    return written


def compare(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories, or one `bigmodel run` directory.", show_default=False)],
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split the metric is measured on.")] = "val",
    bench_batch: Annotated[Optional[int], typer.Option("--bench-batch", help="Batch for latency (default 64, or 1 sequence for language models).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Timed latency calls per artifact (the artifacts take turns, 4 calls at a time).")] = 30,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate at most N samples (or windows).")] = None,
    explain: Annotated[int, typer.Option("--explain", help="Also explain N inputs with every artifact and report how far the explanations moved (mean rank correlation with the first row).")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the trade-off plot (PNG).")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write a Markdown report (with the plot).")] = None,
    html_file: Annotated[Optional[Path], typer.Option("--html", help="Write an HTML report with the plot embedded.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --plot, --markdown and --html files if they exist.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Measure artifacts side by side: size, metric, latency p50/p95 and ratios to the first row."""
    from ..engine.compare import compare_artifacts

    check_reports(plot, markdown, html_file, overwrite)
    result = compare_artifacts(artifacts, backend=backend, threads=threads, split=split, bench_batch=bench_batch,
                               rounds=rounds, limit=limit, explain_samples=explain)
    written = write_reports(result, plot, markdown, html_file)
    if json_out:
        console.print_json({"rows": result.rows, "backend": result.backend, "threads": result.threads,
                            "split": result.split, "metric": result.metric, "bench_batch": result.bench_batch,
                            "rounds": result.rounds, "notes": result.notes, "written": [str(p) for p in written]})
        return
    print_comparison(result)
    for path in written:
        console.note(f"wrote {path}")


def plot(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory (with metrics.jsonl).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG to write (default: RUN_DIR/curves.png).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the PNG if it exists.")] = False,
) -> None:
    """Draw the training curves (loss, validation metric, learning rate) to a PNG."""
    from ..engine.compare import plot_training

    path = plot_training(run_dir, out or Path(run_dir) / "curves.png", overwrite)
    console.out.print(f"wrote {path}")
