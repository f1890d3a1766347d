"""Training throughput with 1 and 2 processes on this machine (DDP and FSDP over gloo on CPU).

Each candidate is a real `bigmodel train` run in its own processes; candidates run interleaved
(A B C A B C ...), and a run's throughput is the median of its per-step tokens/s after warm-up, with
no evaluation or checkpoint inside the timed steps. The claim is the ratio of medians over rounds.
On a 2-core CPU expect no speed-up: two ranks get one core each, and they add a gradient
all-reduce per step.

    .venv/bin/python benchmarks/distributed.py [--rounds 3] [--steps 50]   # ~3 minutes on an idle 2-core machine
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

from _common import ROOT, machine, machine_line, percentile, write_section

RESULTS = ROOT / "benchmarks" / "results"

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
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section from benchmarks/results/distributed.json")
    args = parser.parse_args()
    if args.render_only:
        write_section("distributed", render(json.loads((RESULTS / "distributed.json").read_text())))
        return
    results: dict[str, list[dict]] = {name: [] for name in CANDIDATES}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(CANDIDATES) if r % 2 == 0 else list(CANDIDATES)[::-1]
            for name in names:
                results[name].append(run_once(CANDIDATES[name], args.steps, Path(tmp)))
                print(f"round {r + 1}: {name}: {results[name][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    info = machine()
    data = {"machine": info, "model": MODEL, "steps": args.steps, "rounds": args.rounds,
            "load_average": [load_before, os.getloadavg()[0]], "params": results["1 process"][0]["params"],
            "results": {}}
    base = statistics.median(x["tokens_per_s"] for x in results["1 process"])
    for name, runs in results.items():
        rates = [x["tokens_per_s"] for x in runs]
        data["results"][name] = {"tokens_per_s": rates, "p50": statistics.median(rates), "p95": percentile(rates, 0.95),
                                 "ratio_vs_1": statistics.median(rates) / base,
                                 "threads_per_rank": runs[0]["threads_per_rank"]}
    markdown = render(data)
    write_section("distributed", markdown, data)
    print(markdown)


def render(data: dict) -> str:
    """The docs/benchmarks.md section for one run's data (also: --render-only from results JSON)."""
    rows = []
    control = data["results"]["1 process, 1 thread"]["p50"]
    for name, r in data["results"].items():
        rates = r["tokens_per_s"]
        rows.append(f"| {name} | {r['threads_per_rank']} | {r['p50']:,.0f} | {min(rates):,.0f}–{max(rates):,.0f} "
                    f"| {r['ratio_vs_1']:.2f}× | {r['p50'] / control:.2f}× |")
    load = data["load_average"]
    cores = data["machine"]["cores"] or 1
    busy = max(load) > 0.75 * cores
    verdict = (
        f"**These figures were taken on a busy machine** (load average {load[0]:.1f} before and {load[1]:.1f} "
        f"after, on {cores} cores): other work shared the CPU, and a job's share of it grew with its number of "
        "processes and shrank when a 2-thread process waited on a descheduled thread. The ratios therefore "
        "measure the scheduler more than distributed training, and must not be read as a speed-up. Rerun "
        "`make bench` (or this script) on an idle machine for figures that mean something."
        if busy else
        f"The machine was otherwise idle (load average {load[0]:.1f} before, {load[1]:.1f} after)."
    )
    return "\n".join([
        "## Distributed training: 1 vs 2 processes (`benchmarks/distributed.py`)",
        "",
        f"GPT `nano` ({data['params']:,} parameters), byte-level `text:stdlib`, global batch 32 × 64 tokens, "
        f"{data['steps']} steps per run, median tokens/s per run after {WARMUP_STEPS} warm-up steps; "
        f"{data['rounds']} interleaved rounds; gloo on CPU.",
        "",
        "| run | threads per rank | tokens/s (median of runs) | range over runs | vs 1 process | vs 1 process, 1 thread |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Machine: {machine_line(data['machine'])}.",
        "",
        verdict,
        "",
        "What to expect: two processes on two cores should not beat one process that uses both cores for "
        "its matmuls. Each rank gets one core, and every step adds a gradient all-reduce (DDP) or per-block "
        "all-gathers and reduce-scatters (FSDP). The last column compares with a 1-thread process, which "
        "isolates that communication cost. Data parallelism pays when each rank has its own device, or "
        "cores that one process could not use.",
    ])


if __name__ == "__main__":
    main()
