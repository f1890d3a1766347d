"""How fast `bigmodel --help` answers (target: under 0.6 s). torch is imported lazily, only by the
commands that need it; this measures the whole process, interpreter start-up included."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, machine_line, percentile, write_section


def main(runs: int = 20) -> None:
    exe = str(Path(sys.executable).with_name("bigmodel"))
    times = []
    for _ in range(runs + 2):
        start = time.perf_counter()
        subprocess.run([exe, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    times = times[2:]  # the first runs warm the file cache
    p50, p95 = statistics.median(times), percentile(times, 0.95)
    info = machine()
    md = f"""## CLI start-up (`benchmarks/cli_startup.py`)

`bigmodel --help`, {runs} runs after 2 warm-ups, whole process: p50 **{p50:.3f} s**, p95 {p95:.3f} s (target < 0.6 s).
Machine: {machine_line(info)}."""
    write_section("cli_startup", md, {"machine": info, "seconds": times})
    print(md)


if __name__ == "__main__":
    main()
