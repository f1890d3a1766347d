"""bigmodel optimize on digits: the issue-19 target, and the chosen model against the single commands
of the other benchmarks.

Teacher: mlp `base` (hidden 512, 512), 30 epochs, seed 0 (as benchmarks/distill.py and prune.py).
Search: `bigmodel optimize TEACHER --max-drop 1.0 --objective latency --time-budget 10m` (full space),
through the engine. Targets: the chosen model at least 5× faster than the teacher on ONNX Runtime
and within one accuracy point; a Pareto front of at least 5 points; the whole search within its
10-minute budget on 2 cores.

Then the single commands whose figures docs/benchmarks.md records for this teacher — structured
pruning at 50 % with 5 fine-tuning epochs at lr 1e-3 (Pruning §2), distillation into hidden 32 for
60 epochs at lr 3e-3 (Distillation), dynamic int8 (quantize) — are run again here and measured side
by side with the teacher and the chosen model, on the same split, runtime and threads (compare's
own measurement, the rows taking turns). The chosen model must not be slower than the fastest of
them that stays within the same one-point limit.

    python benchmarks/optimize.py [--budget 10m] [--quick] [--render]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import ROOT, contention, contention_line, cpu_snapshot, machine, machine_line, write_section

RESULTS = ROOT / "benchmarks" / "results" / "optimize.json"


def run(budget: str, quick: bool) -> dict:
    import shutil

    work = Path(tempfile.mkdtemp(prefix="bench-optimize-"))
    try:
        return _run(work, budget, quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, budget: str, quick: bool) -> dict:
    from bigmodel_cli import TrainConfig, train
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.compare import compare_artifacts
    from bigmodel_cli.engine.optimize.command import OptimizeRequest, optimize
    from bigmodel_cli.engine.optimize.space import Goal, parse_duration

    info = machine()
    before = cpu_snapshot()
    started = time.perf_counter()
    teacher = train(TrainConfig(model="mlp", preset="base", epochs=5 if quick else 30, seed=0,
                                out=str(work / "teacher"))).best_dir
    teacher_seconds = time.perf_counter() - started
    print(f"teacher trained in {teacher_seconds:.0f} s", flush=True)

    def progress(event: str, **info) -> None:
        if event in ("measured", "failed", "plan", "final") or (event == "step" and info["status"] not in ("ran",)):
            print(event, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()}, flush=True)

    goal = Goal(objective="latency", max_drop=1.0, time_budget_s=parse_duration(budget))
    t0 = time.perf_counter()
    outcome = optimize(OptimizeRequest(open_artifact(teacher), work / "search", goal, space="full"), progress)
    search_seconds = time.perf_counter() - t0
    during_search = contention(before, cpu_snapshot(), info["cores"])
    print(f"search took {search_seconds:.0f} s; chosen {outcome.chosen and outcome.chosen['name']}", flush=True)

    singles = _single_commands(teacher, work, quick)
    chosen = work / "search" / "chosen" if outcome.chosen else None
    fp32 = work / "search" / "candidates" / "fp32"
    paths = {"teacher (fp32 ONNX)": fp32, **({"optimize: chosen": chosen} if chosen else {}), **singles}
    rows = {}
    for split in ("val", "test"):
        result = compare_artifacts(list(paths.values()), backend="onnx", split=split, rounds=100 if split == "val" else 1)
        for name, row in zip(paths, result.rows):
            entry = rows.setdefault(name, {})
            entry[f"{split}_accuracy"] = row["value"]
            if split == "val":
                entry.update(latency_ms_p50=row["latency_ms_p50"], latency_ms_p95=row["latency_ms_p95"],
                             file_bytes=row["file_bytes"], params=row["params"], threads=result.threads,
                             bench_batch=result.bench_batch)
    return {"machine": info, "budget_s": goal.time_budget_s, "search_seconds": search_seconds,
            "teacher_seconds": teacher_seconds, "contention": during_search, "quick": quick,
            "chosen": outcome.chosen, "front": [r["name"] for r in outcome.front],
            "search_rows": outcome.rows, "steps": outcome.summary["steps"], "side_by_side": rows,
            "notes": outcome.summary["notes"]}


def _single_commands(teacher: Path, work: Path, quick: bool) -> dict[str, Path]:
    """The single commands of docs/benchmarks.md for this teacher, with their recorded options."""
    from bigmodel_cli import TrainConfig
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.compress.distill.command import DistillConfig, distill
    from bigmodel_cli.engine.compress.prune.command import PruneConfig, prune_artifact

    source = open_artifact(teacher)
    pruned = prune_artifact(source, PruneConfig(method="structured", sparsity=0.5, finetune_epochs=2 if quick else 5,
                                                bench=False, out=str(work / "prune-50")), TrainConfig(lr=1e-3, seed=0))
    student = distill(DistillConfig(teacher=str(teacher), student_config={"arch": "mlp", "hidden_sizes": [32]},
                                    bench_iterations=0, train=TrainConfig(epochs=20 if quick else 60, lr=3e-3, seed=0,
                                                                          out=str(work / "distill-32"))))
    out = {"prune structured 50 %": Path(pruned.artifact), "distill hidden 32": Path(student.run.best_dir)}
    dynamic = work / "search" / "candidates" / "q-dynamic"
    if dynamic.exists():  # the search ran exactly `quantize --mode dynamic` on the teacher's export
        out["quantize dynamic"] = dynamic
    return out


def render(data: dict) -> str:
    rows = data["side_by_side"]
    teacher = rows["teacher (fp32 ONNX)"]
    lines = ["## optimize: the best digits model under one point (`benchmarks/optimize.py`)", "",
             f"Machine: {machine_line(data['machine'])}. {contention_line(data['contention'])}",
             f"Teacher: mlp `base` (hidden 512, 512), 30 epochs, seed 0, trained in {data['teacher_seconds']:.0f} s "
             "(not part of the search). Search: `bigmodel optimize TEACHER --max-drop 1.0 --objective latency "
             f"--time-budget {data['budget_s'] / 60:g}m` (full space), which took **{data['search_seconds']:.0f} s** "
             "including its final comparison." + (" (--quick run: not the recorded configuration.)" if data["quick"] else ""),
             "", "Side by side afterwards, on ONNX Runtime (the rows taking turns, 100 timed calls each, batch "
             f"{teacher['bench_batch']}, {teacher['threads']} threads); accuracy on val (what the search chose on) and on "
             "test (179 images each; one image is 0.56 points):", "",
             "| model | val acc. | Δ val pts | test acc. | Δ test pts | p50 ms | speed-up vs teacher | file bytes | within 1 pt (val) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        dv = (r["val_accuracy"] - teacher["val_accuracy"]) * 100
        dt = (r["test_accuracy"] - teacher["test_accuracy"]) * 100
        lines.append(f"| {name} | {r['val_accuracy']:.4f} | {dv:+.1f} | {r['test_accuracy']:.4f} | {dt:+.1f} | "
                     f"{r['latency_ms_p50']:.4f} | {teacher['latency_ms_p50'] / r['latency_ms_p50']:.2f}× | "
                     f"{r['file_bytes']:,} | {'yes' if dv >= -1.0 - 1e-9 else 'no'} |")
    chosen = rows.get("optimize: chosen")
    lines.append("")
    if chosen is None:
        lines.append("**Nothing met the limit**: every target below is not met.")
        return "\n".join(lines)
    speed = teacher["latency_ms_p50"] / chosen["latency_ms_p50"]
    drop = (teacher["val_accuracy"] - chosen["val_accuracy"]) * 100
    singles = {n: r for n, r in rows.items() if n not in ("teacher (fp32 ONNX)", "optimize: chosen")
               and (teacher["val_accuracy"] - r["val_accuracy"]) * 100 <= 1.0 + 1e-9}
    best_single = min(singles.items(), key=lambda kv: kv[1]["latency_ms_p50"]) if singles else None
    front = data["front"]
    chain = " → ".join(s["name"] for s in data["steps"] if s["name"] in _lineage(data))
    lines += [f"Chosen: `{data['chosen']['name']}` ({chain}).", "",
              "| target | result | |", "|---|---|---|",
              f"| chosen ≥ 5× faster than the teacher on ONNX Runtime | {speed:.2f}× | {_met(speed >= 5)} |",
              f"| chosen within one point (val) | {-drop:+.1f} pts | {_met(drop <= 1.0 + 1e-9)} |",
              f"| Pareto front ≥ 5 points | {len(front)} ({', '.join(front)}) | {_met(len(front) >= 5)} |",
              f"| search within its {data['budget_s'] / 60:g}-minute budget on 2 cores | {data['search_seconds']:.0f} s | "
              f"{_met(data['search_seconds'] <= data['budget_s'])} |"]
    if best_single:
        name, r = best_single
        ok = chosen["latency_ms_p50"] <= r["latency_ms_p50"]
        lines.append(f"| never worse than the best single command within the limit (latency) | "
                     f"chosen {chosen['latency_ms_p50']:.4f} ms vs {name} {r['latency_ms_p50']:.4f} ms | {_met(ok)} |")
    else:
        lines.append("| never worse than the best single command within the limit (latency) | no single command "
                     "stays within one point here; the chosen model does | met |")
    if len(front) < 5 and chosen["val_accuracy"] >= teacher["val_accuracy"]:
        lines += ["", "Why the front is small: the chosen student scores the teacher's own validation accuracy "
                  "(179 images: accuracy moves in 0.56-point steps), so it beats every slower model on all four "
                  "axes; what remains on the front are the faster, smaller models that give accuracy up — the "
                  "levels past each branch's first miss, charted with the time left. A finer metric (the loss) "
                  "or a larger validation split would separate the models that tie here."]
    steps = data["steps"]
    counts: dict[str, int] = {}
    for s in steps:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    lines += ["", f"The search ran {len(steps)} steps ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); "
              "the full list, with each step's time and estimate, is in the search's report.md and in "
              "`benchmarks/results/optimize.json`."]
    return "\n".join(lines)


def _lineage(data: dict) -> set[str]:
    by_name = {s["name"]: s for s in data["steps"]}
    name, chain = data["chosen"]["name"], set()
    while name in by_name:
        chain.add(name)
        name = by_name[name]["parent"]
    return chain


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--quick", action="store_true", help="A short smoke run (5-epoch teacher); not for the docs.")
    parser.add_argument("--render", action="store_true", help="Rewrite the docs section from the saved results only.")
    args = parser.parse_args()
    if args.render:
        data = json.loads(RESULTS.read_text(encoding="utf-8"))
    else:
        data = run(args.budget, args.quick)
    markdown = render(data)
    print(markdown)
    if not args.quick:
        write_section("optimize", markdown, data)


if __name__ == "__main__":
    main()
