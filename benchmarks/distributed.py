"""Training throughput with 1 and 2 processes on this machine (DDP and FSDP over gloo on CPU).

Each candidate is a real `bigmodel train` run in its own processes; candidates run interleaved
(A B C A B C ...), and a run's throughput is the median of its per-step tokens/s after warm-up, with
no evaluation or checkpoint inside the timed steps. The claim is the ratio of medians over rounds.
On a 2-core CPU expect no speed-up: two ranks get one core each, and they add a gradient
all-reduce per step.

    .venv/bin/python benchmarks/distributed.py [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, machine_line, percentile, write_section

MODEL = ["--model", "gpt", "--preset", "nano", "--data", "text:stdlib", "--block-size", "64", "--batch-size", "32"]
CANDIDATES = {
    "1 process": [],  # all cores for its matmuls: what a user gets by default
    "1 process, 1 thread": ["--threads", "1"],  # the control: what each of two ranks gets
    "2 processes, DDP": ["--nproc", "2", "--strategy", "ddp"],
    "2 processes, FSDP": ["--nproc", "2", "--strategy", "fsdp"],
}
WARMUP_STEPS = 10


def run_once(extra: list[str], steps: int, workdir: Path) -> dict:
    out = workdir / "run"
    command = [sys.executable, "-m", "bigmodel_cli", "train", *MODEL, "--max-steps", str(steps),
               "--eval-every", str(steps), "--checkpoint-every", str(steps), "--eval-windows", "4",
               "--out", str(out), "--overwrite", "--json", *extra]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the launcher splits the cores
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(extra) or '1 process'}):\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["items_per_s"] for r in records if "event" not in r and r["step"] > WARMUP_STEPS and r["step"] < steps]
    return {"tokens_per_s": statistics.median(rates), "threads_per_rank": summary["threads"],
            "params": summary["params"], "final_loss": records[-1].get("val_loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in CANDIDATES}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(CANDIDATES) if r % 2 == 0 else list(CANDIDATES)[::-1]
            for name in names:
                results[name].append(run_once(CANDIDATES[name], args.steps, Path(tmp)))
                print(f"round {r + 1}: {name}: {results[name][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    info = machine()
    load = (load_before, os.getloadavg()[0])
    base = statistics.median(x["tokens_per_s"] for x in results["1 process"])
    rows, data = [], {"machine": info, "model": MODEL, "steps": args.steps, "rounds": args.rounds,
                      "load_average": load, "results": {}}
    for name, runs in results.items():
        rates = [x["tokens_per_s"] for x in runs]
        p50, p95 = statistics.median(rates), percentile(rates, 0.95)
        rows.append(f"| {name} | {runs[0]['threads_per_rank']} | {p50:,.0f} | {min(rates):,.0f}–{max(rates):,.0f} | {p50 / base:.2f}× |")
        data["results"][name] = {"tokens_per_s": rates, "p50": p50, "p95": p95, "ratio_vs_1": p50 / base,
                                 "threads_per_rank": runs[0]["threads_per_rank"]}
    params = results["1 process"][0]["params"]
    markdown = "\n".join([
        "## Distributed training: 1 vs 2 processes (`benchmarks/distributed.py`)",
        "",
        f"GPT `nano` ({params:,} parameters), byte-level `text:stdlib`, global batch 32 × 64 tokens, "
        f"{args.steps} steps per run, median tokens/s per run after {WARMUP_STEPS} warm-up steps; "
        f"{args.rounds} interleaved rounds; gloo on CPU.",
        "",
        "| run | threads per rank | tokens/s (median of runs) | range over runs | vs 1 process |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Machine: {machine_line(info)}. Load average {load[0]:.1f} before and {load[1]:.1f} after: "
        f"{'other work shared the CPU, so absolute figures are low and noisy' if max(load) > 1.5 else 'the machine was otherwise idle'}.",
        "",
        "Two processes on two cores should not beat one process using both cores for its matmuls: each "
        "rank gets one core and adds a gradient all-reduce (DDP) or per-block all-gather and "
        "reduce-scatter (FSDP) every step. Compare each 2-process row with `1 process, 1 thread` for the "
        "cost of the communication itself. On a busy machine a 2-thread process can lose far more to "
        "thread contention than two 1-thread ranks do, which flatters the 2-process rows; the load "
        "average above says whether that happened. Data parallelism pays when each rank has its own "
        "device, or cores that one process could not use.",
    ])
    write_section("distributed", markdown, data)
    print(markdown)


if __name__ == "__main__":
    main()
