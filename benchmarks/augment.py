"""What `--augment` buys and costs (issue 17), three seeds each:

- digits CNN (the default `cnn`), `--augment default` (shift 1 px, rotate 10°, scale 0.1) against
  plain training with the same budget: test accuracy, and robustness — accuracy on the test images
  shifted by 1 and by 2 pixels (a random direction per image, edge pixels repeated).
  Cost target: augmented training at most 1.3× the time of plain training. The claim is a side-by-
  side measurement of one training step (draw the batch, augment it or not, forward, backward,
  optimizer step) of the digits CNN, plain and augmented taking turns, ratio of medians; the whole
  runs' times are listed too, but on a shared machine they swing by 2× from run to run.
- a breast-cancer-like table (569 rows, 30 features, 2 classes, generated deterministically here:
  the UCI table's shape, not its values, so nothing is redistributed), MLP with `--augment default`
  (noise 0.1 standardized units, mixup 0.2) against plain: test accuracy.

    python benchmarks/augment.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time

import numpy as np

from _common import contention, contention_line, cpu_snapshot, interleaved, machine, machine_line, ratio, write_section


def breast_cancer_like(path: str, seed: int = 569) -> None:
    """569 rows like the Wisconsin diagnostic table: 10 measurements × (mean, error, worst), 212
    malignant and 357 benign, correlated features and overlapping classes (not separable)."""
    rng = np.random.default_rng(seed)
    labels = np.array([1] * 212 + [0] * 357)
    rng.shuffle(labels)
    size = rng.normal(0, 1, 569) + 3.0 * labels  # tumour size drives radius, perimeter, area
    shape = 0.5 * size + rng.normal(0, 1, 569) + 2.0 * labels  # concavity, compactness
    base = []
    for j in range(10):
        driver = size if j in (0, 2, 3) else shape if j in (5, 6, 7) else rng.normal(0, 1, 569) + 0.3 * labels
        base.append(driver + rng.normal(0, 0.5 + 0.1 * j, 569))
    cols = []
    for kind, noise in (("mean", 0.2), ("error", 1.0), ("worst", 0.4)):
        for j, b in enumerate(base):
            cols.append((f"f{j}_{kind}", 10 + 3 * b + rng.normal(0, noise * 3, 569)))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in cols] + ["diagnosis"])
        for i in range(569):
            writer.writerow([f"{values[i]:.4f}" for _, values in cols] + ["M" if labels[i] else "B"])


def shifted_accuracy(run: str, pixels: int, seed: int = 0) -> float:
    """Test accuracy on every test image moved by ``pixels`` in a random direction."""
    import torch

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.evaluate import open_data

    artifact = open_artifact(run)
    x, y = open_data(artifact).arrays("test")
    rng = np.random.default_rng(seed)
    moved = np.empty_like(x)
    for i in range(len(x)):
        dy, dx = rng.choice([-pixels, 0, pixels], 2)
        if dy == 0 and dx == 0:
            dx = pixels
        padded = np.pad(x[i], [(0, 0), (pixels, pixels), (pixels, pixels)], mode="edge")
        h, w = x.shape[-2:]
        moved[i] = padded[:, pixels - dy:pixels - dy + h, pixels - dx:pixels - dx + w]
    model = artifact.build_model().eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(moved)).argmax(-1).numpy()
    return float((predicted == y).mean())


def train(**kwargs) -> tuple[str, float, dict]:
    from bigmodel_cli import TrainConfig, train as run

    started = time.perf_counter()
    result = run(TrainConfig(**kwargs))
    return str(result.best_dir), time.perf_counter() - started, result.best_metrics


def digits(work: str, seeds: list[int], threads: int) -> list[dict]:
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        order = ("plain", "augmented") if seed % 2 == 0 else ("augmented", "plain")
        for name in order:
            best, seconds, _ = train(model="cnn", augment="default" if name == "augmented" else None, seed=seed,
                                     threads=threads, out=f"{work}/cnn-{name}-{seed}")
            row[name] = {"test": _test_accuracy(best), "shift1": shifted_accuracy(best, 1), "shift2": shifted_accuracy(best, 2),
                         "seconds": seconds}
        rows.append(row)
        print("digits", row, flush=True)
    return rows


def _test_accuracy(run: str) -> float:
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.core.tasks import make_task, torch_predict
    from bigmodel_cli.engine.evaluate import open_data

    artifact = open_artifact(run)
    task = make_task(open_data(artifact), 64)
    return task.evaluate(torch_predict(artifact.build_model().eval()), "test")["accuracy"]


def step_cost(threads: int, rounds: int = 300) -> dict:
    """One training step of the default digits CNN, plain vs `--augment default`, taking turns."""
    import torch

    from bigmodel_cli.data import load_dataset, parse_data_arg
    from bigmodel_cli.data.augment import DEFAULTS
    from bigmodel_cli.engine.core.tasks import make_task
    from bigmodel_cli.models import build_model, resolve_spec

    torch.set_num_threads(threads)
    data = load_dataset(parse_data_arg("digits"))
    tasks = {"plain": make_task(data, 64), "augmented": make_task(data, 64, augment=DEFAULTS["image"])}
    models = {name: build_model(resolve_spec("cnn", None, {}, data.model_fit())) for name in tasks}
    optimizers = {name: torch.optim.AdamW(models[name].parameters(), lr=1e-3) for name in tasks}
    counter = {name: 0 for name in tasks}

    def step(name: str):
        def run():
            counter[name] += 1
            x, y = tasks[name].batch(counter[name])
            optimizers[name].zero_grad()
            tasks[name].loss(models[name](x), y).backward()
            optimizers[name].step()
        return run

    timing = interleaved({name: step(name) for name in tasks}, rounds=rounds, warmup=10)
    return {"timing": timing, "ratio": ratio(timing, "augmented", "plain")}


def tabular(work: str, seeds: list[int], threads: int) -> list[dict]:
    table = f"{work}/breast-cancer-like.csv"
    breast_cancer_like(table)
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        for name in ("plain", "augmented"):
            best, seconds, _ = train(model="mlp", data=f"csv:{table}", target="diagnosis", seed=seed, threads=threads,
                                     augment="default" if name == "augmented" else None,
                                     out=f"{work}/tab-{name}-{seed}")
            row[name] = {"test": _test_accuracy(best), "seconds": seconds}
        rows.append(row)
        print("tabular", row, flush=True)
    return rows


def render(data: dict) -> str:
    d, t = data["digits"], data["tabular"]
    mean = lambda rows, name, key: statistics.mean(r[name][key] for r in rows)  # noqa: E731
    runs_cost = statistics.median(r["augmented"]["seconds"] for r in d) / statistics.median(r["plain"]["seconds"] for r in d)
    step = data["step_cost"]
    cost = step["ratio"]
    lines = [
        "## Data augmentation (`benchmarks/augment.py`)", "",
        f"Machine: {machine_line(data['machine'])}. {data['threads']} thread per run. "
        f"{contention_line(data['contention'])} Whole script: {data['seconds']:.0f} s.", "",
        "### digits CNN (default `cnn`, 30 epochs), `--augment default` vs plain", "",
        "| seed | run | test acc. | shifted 1 px | shifted 2 px | training s |", "|---|---|---|---|---|---|",
    ]
    for r in d:
        for name in ("plain", "augmented"):
            m = r[name]
            lines.append(f"| {r['seed']} | {name} | {m['test']:.3f} | {m['shift1']:.3f} | {m['shift2']:.3f} | "
                         f"{m['seconds']:.1f} |")
    lines += [
        "",
        f"Means: test {mean(d, 'plain', 'test'):.3f} → {mean(d, 'augmented', 'test'):.3f}; shifted 1 px "
        f"{mean(d, 'plain', 'shift1'):.3f} → {mean(d, 'augmented', 'shift1'):.3f}; shifted 2 px "
        f"{mean(d, 'plain', 'shift2'):.3f} → {mean(d, 'augmented', 'shift2'):.3f}.",
        f"Cost: one training step (batch of 64, forward, backward, AdamW), plain and augmented taking turns, "
        f"{step['timing']['plain']['n']} each: p50 {step['timing']['plain']['p50']:.3f} ms plain vs "
        f"{step['timing']['augmented']['p50']:.3f} ms augmented, ratio of medians **{cost:.2f}×** (target ≤ 1.3×: "
        f"**{'met' if cost <= 1.3 else 'not met'}**). The whole runs above: ratio of median times {runs_cost:.2f}×, "
        "which on this shared machine is mostly noise (the same plain run took from 7 to 30 s).", "",
        "### breast-cancer-like table (569 × 30, generated), MLP, `--augment default` vs plain", "",
        "| seed | plain test acc. | augmented test acc. |", "|---|---|---|",
        *[f"| {r['seed']} | {r['plain']['test']:.3f} | {r['augmented']['test']:.3f} |" for r in t], "",
        f"Means: {mean(t, 'plain', 'test'):.3f} → {mean(t, 'augmented', 'test'):.3f} (test split: 57 rows, one row "
        "is 1.75 points).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    started, snap = time.perf_counter(), cpu_snapshot()
    with tempfile.TemporaryDirectory() as work:
        data = {"machine": machine(), "threads": args.threads, "digits": digits(work, seeds, args.threads),
                "tabular": tabular(work, seeds, args.threads), "step_cost": step_cost(args.threads)}
    data["contention"] = contention(snap, cpu_snapshot(), os.cpu_count())
    data["seconds"] = time.perf_counter() - started
    md = render(data)
    print(md)
    write_section("augment", md, data)


if __name__ == "__main__":
    main()
