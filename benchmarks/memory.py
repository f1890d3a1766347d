"""Peak resident memory while training on a 1 GB text corpus (target: under 2 GB).

The corpus is memory-mapped and read one window at a time, so resident memory should track the
model, not the corpus. The corpus here is real text (the Python standard library's source, repeated
to 1 GiB); training runs in a child process whose peak RSS (ru_maxrss) is recorded.

    python benchmarks/memory.py [--gib 1] [--steps 200]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, machine_line, write_section


def build_corpus(path: Path, size: int) -> None:
    from bigmodel_cli.data.text import stdlib_files

    chunk = b"".join(f.read_bytes() for f in stdlib_files())
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            piece = chunk[: size - written]
            handle.write(piece)
            written += len(piece)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    size = int(args.gib * 1024**3)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        build_corpus(corpus, size)
        cmd = [sys.executable, "-m", "bigmodel_cli", "train", "--model", "gpt", "--preset", "micro",
               "--data", f"text:{corpus}", "--max-steps", str(args.steps), "--batch-size", "16", "--block-size", "128",
               "--eval-every", str(max(1, args.steps // 4)), "--out", f"{tmp}/run", "--json"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        del before
    info = machine()
    md = f"""## Memory with a large corpus (`benchmarks/memory.py`)

`bigmodel train --model gpt --preset micro --data text:CORPUS`, a {args.gib:g} GiB corpus of real text,
{args.steps} steps of 16 × 128 tokens with validation: peak resident memory **{peak_mib:,.0f} MiB**
(target < 2048 MiB; the corpus is memory-mapped and read window by window).
Machine: {machine_line(info)}."""
    write_section("memory", md, {"machine": info, "corpus_bytes": size, "peak_rss_mib": peak_mib})
    print(md)


if __name__ == "__main__":
    main()
