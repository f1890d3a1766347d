"""Pruning: what sparsity and structure cost in accuracy and buy in size and latency.

Every figure comes from `bigmodel prune`'s own report (engine/compress/prune: prune_artifact): the dense and
the pruned model measured on the same split, and their latencies timed interleaved (A B B A …) on
the same input with the same fixed thread count, for PyTorch and — after a verified export with
engine/onnx/export.py — ONNX Runtime. The claims are ratios of medians; absolute times are "on this
machine" only.

Experiments and the issue's targets:

1. digits MLP (the default `bigmodel train`, hidden 128), 90 % magnitude sparsity in 4 cubic steps
   with 10 fine-tuning epochs each, per-layer and global scope, over several fine-tuning seeds.
   Target: test accuracy within 1 point of the dense model. Also shown: the same without
   fine-tuning, and 2:4 N:M sparsity fine-tuned.
2. structured, 50 % of hidden units / channels removed, fine-tuned 5 epochs: the default MLP, the
   `base` MLP (512, 512) and the `base` CNN. Targets: parameters ≤ 0.55×, ONNX Runtime latency
   ≤ 0.7×, test accuracy within 1.5 points.
3. gpt (2 layers; width 128 with 4 heads, and 192 with 6; trained briefly on text:stdlib): half of
   the MLP hidden units removed, fine-tuned briefly. Targets: validation perplexity within +10 %, latency ≤ 0.8×.
   Control: the dense model fine-tuned for the same steps (`--sparsity 0`, the same code path), so
   the extra training is not mistaken for something pruning did.

Budget: a few minutes on 2 shared cores (threads fixed at 1 so the runs do not fight each other's
OpenMP threads on a busy machine).

    python benchmarks/prune.py [--threads 1] [--seeds 3] [--quick] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from _common import ROOT, machine, machine_line, write_section

RESULTS = ROOT / "benchmarks" / "results" / "prune.json"

GPT_SIZES = ({"n_layer": 2, "n_embd": 128, "n_head": 4, "block_size": 128},
             {"n_layer": 2, "n_embd": 192, "n_head": 6, "block_size": 128})


def _prune(artifact, work: str, name: str, threads: int, iterations: int, onnx: bool, train_opts: dict, **prune_opts):
    from bigmodel_cli import TrainConfig
    from bigmodel_cli.engine.compress.prune.command import PruneConfig, prune_artifact

    cfg = PruneConfig(out=f"{work}/{name}", bench=iterations > 0, bench_onnx=onnx, bench_iterations=max(iterations, 1),
                      **prune_opts)
    started = time.perf_counter()
    result = prune_artifact(artifact, cfg, TrainConfig(threads=threads, **train_opts))
    report = result.report
    print(f"  {name}: {time.perf_counter() - started:.0f} s; ratio {_short(report['ratio'])}", flush=True)
    return report


def _short(values: dict) -> dict:
    return {k: round(v, 3) for k, v in values.items() if isinstance(v, float)}


def unstructured(work: str, threads: int, seeds: list[int], quick: bool) -> dict:
    from bigmodel_cli import TrainConfig, open_artifact, train

    dense = open_artifact(train(TrainConfig(threads=threads, out=f"{work}/mlp")).best_dir)
    epochs = 4 if quick else 10
    runs: dict[str, list] = {"layer": [], "global": []}
    for scope, reports in runs.items():
        for seed in seeds:
            timed = scope == "layer" and seed == seeds[0]  # latency once: zeros do not change it
            reports.append(_prune(dense, work, f"m90-{scope}-{seed}", threads, 100 if timed else 0, timed,
                                  {"lr": 3e-3, "seed": seed}, sparsity=0.9, scope=scope, steps=4, finetune_epochs=epochs))
    one_shot = _prune(dense, work, "m90-oneshot", threads, 0, False, {}, sparsity=0.9, scope="layer")
    nm = _prune(dense, work, "m24", threads, 0, False, {"lr": 3e-3}, pattern="2:4", finetune_epochs=epochs)
    return {"runs": runs, "one_shot": one_shot, "nm": nm, "finetune_epochs": epochs}


def structured(work: str, threads: int, quick: bool) -> dict:
    from bigmodel_cli import TrainConfig, open_artifact, train

    out = {}
    for name, arch, preset in (("mlp (default, 128)", "mlp", None), ("mlp base (512, 512)", "mlp", "base"),
                               ("cnn base (32, 64, 128 ch)", "cnn", "base")):
        dense = open_artifact(train(TrainConfig(model=arch, preset=preset, epochs=10 if quick else 20, threads=threads,
                                                out=f"{work}/{arch}-{preset}")).best_dir)
        out[name] = _prune(dense, work, f"s50-{arch}-{preset}", threads, 100, True, {"lr": 1e-3},
                           method="structured", sparsity=0.5, finetune_epochs=2 if quick else 5)
    return out


def gpt(work: str, threads: int, quick: bool) -> dict:
    from bigmodel_cli import TrainConfig, open_artifact, train

    train_steps, tune_steps = (80, 20) if quick else (150, 50)
    common = {"batch_size": 16, "eval_windows": 32}
    sizes = []
    for args in GPT_SIZES:
        name = f"gpt-{args['n_embd']}"
        dense = open_artifact(train(TrainConfig(model="gpt", data="text:stdlib", model_args=args, block_size=128,
                                                max_steps=train_steps, lr=3e-3, warmup_steps=20, threads=threads,
                                                out=f"{work}/{name}", **common)).best_dir)
        tune = {"max_steps": tune_steps, "lr": 1e-3, **common}
        pruned = _prune(dense, work, f"{name}-mlp50", threads, 50, True, tune, method="structured", sparsity=0.5, split="val")
        control = _prune(dense, work, f"{name}-control", threads, 0, False, tune, method="structured", sparsity=0.0,
                         split="val")
        sizes.append({"args": args, "pruned": pruned, "control": control})
    return {"sizes": sizes, "train_steps": train_steps, "tune_steps": tune_steps}


def _pts(before: float, after: float) -> str:
    return f"{(after - before) * 100:+.1f}"


def _unstructured_rows(label: str, r: dict, timed: bool) -> str:
    b, a, q = r["before"], r["after"], r["ratio"]
    lat = (f"{q['latency_ms_p50']:.2f}× | {q['onnx_latency_ms_p50']:.2f}×" if timed else "- | -")
    return (f"| {label} | {b['accuracy']:.3f} | {a['accuracy']:.3f} | {_pts(b['accuracy'], a['accuracy'])} | "
            f"{q['nonzero_params']:.3f}× | {q['compressed_bytes']:.2f}× | {lat} |")


def render(info: dict, u: dict, s: dict, g: dict, threads: int, seconds: float) -> str:
    lines = [
        "## Pruning (`benchmarks/prune.py`)",
        "",
        f"Machine: {machine_line(info)}. Threads fixed at {threads} (torch and ONNX Runtime). "
        f"Whole script: {seconds / 60:.1f} min on a machine shared with other work, so absolute times are noisy; "
        "the ratios come from interleaved runs on the same input.",
        "",
        "### 1. Unstructured: digits MLP (default, hidden 128) at 90 % sparsity",
        "",
        f"L1 magnitude over both weight matrices; 4 cubic steps, {u['finetune_epochs']} fine-tuning epochs after each "
        "(`--lr 3e-3`), each scope with several fine-tuning seeds. Test split (179 samples: one sample is 0.56 points).",
        "",
        "| run | dense acc. | pruned acc. | Δ points | non-zero params | zlib size | torch p50 ratio | ORT p50 ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    deltas = {}
    for scope, reports in u["runs"].items():
        deltas[scope] = [(r["after"]["accuracy"] - r["before"]["accuracy"]) * 100 for r in reports]
        for i, r in enumerate(reports):
            lines.append(_unstructured_rows(f"`--scope {scope}`, seed {i}", r, "latency_ms_p50" in r["ratio"]))
    lines.append(_unstructured_rows("`--scope layer`, one shot, no fine-tuning", u["one_shot"], False))
    lines.append(_unstructured_rows("`--pattern 2:4`, fine-tuned", u["nm"], False))
    summary = "; ".join(f"`--scope {k}` mean Δ {statistics.mean(v):+.1f}, worst {min(v):+.1f} points" for k, v in deltas.items())
    met = min(deltas["layer"]) >= -1.0
    lines += [
        "",
        f"Target (accuracy within 1 point, every seed): {summary} → **{'met' if met else 'not met'}** with "
        f"`--scope layer` (the default){'' if min(deltas['global']) >= -1.0 else ', not with `--scope global`'}. "
        "Global scope leaves the small output layer denser and cuts the input layer deeper (see the per-layer "
        "table of any run); on this model that costs accuracy. Latency does not change: the zeros are stored and "
        "multiplied densely (neither PyTorch's CPU kernels nor ONNX Runtime's skip them, and 2:4 needs sparse "
        "tensor cores); the file is the same size and only compresses better.",
        "",
        "### 2. Structured: 50 % of hidden units / channels removed, fine-tuned",
        "",
        "Group L2 importance; 5 fine-tuning epochs at `--lr 1e-3`; latency on a batch of 64, interleaved.",
        "",
        "| model | params | dense acc. | pruned acc. | Δ points | torch p50 ratio | ORT p50 ratio | ORT p50 dense → pruned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, r in s.items():
        b, a, q = r["before"], r["after"], r["ratio"]
        ok = q["params"] <= 0.55 and q["onnx_latency_ms_p50"] <= 0.7 and (a["accuracy"] - b["accuracy"]) * 100 >= -1.5
        verdicts.append(ok)
        lines.append(
            f"| {name} | {b['params']:,} → {a['params']:,} ({q['params']:.2f}×) | {b['accuracy']:.3f} | {a['accuracy']:.3f} | "
            f"{_pts(b['accuracy'], a['accuracy'])} | {q['latency_ms_p50']:.2f}× | {q['onnx_latency_ms_p50']:.2f}× | "
            f"{b['onnx_latency_ms_p50']:.3f} → {a['onnx_latency_ms_p50']:.3f} ms |")
    lines += [
        "",
        f"Targets (params ≤ 0.55×, ONNX Runtime latency ≤ 0.7×, accuracy within 1.5 points): "
        f"**{sum(verdicts)} of {len(verdicts)} models meet all three**. A one-hidden-layer MLP's parameters fall to "
        "about 0.5× (input and output widths stay) and its 64-sample batch takes tens of microseconds, so fixed "
        "per-call costs keep its latency ratio above the FLOP ratio; deeper and wider models fall further, because "
        "both sides of every inner matrix shrink.",
        "",
        "### 3. gpt: half of the MLP hidden units removed",
        "",
        f"Two layers, trained {g['train_steps']} steps on text:stdlib (batch 16 × 128 bytes); mlp_hidden 4·width → "
        f"2·width, then {g['tune_steps']} fine-tuning steps. Validation split, 32 windows; latency on one sequence "
        "of 128 tokens. Control: the dense model given the same fine-tuning steps (`--sparsity 0`, the same code path).",
        "",
        "| width | params | dense ppl | pruned ppl | control ppl | torch p50 | ORT p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    ppl_ok, ort_ok, torch_ok = [], [], []
    for size in g["sizes"]:
        p, c = size["pruned"], size["control"]
        b, a, q = p["before"], p["after"], p["ratio"]
        ppl = a["perplexity"] / b["perplexity"]
        ppl_ok.append(ppl <= 1.10)
        ort_ok.append(q["onnx_latency_ms_p50"] <= 0.8)
        torch_ok.append(q["latency_ms_p50"] <= 0.8)
        lines.append(
            f"| {size['args']['n_embd']} ({size['args']['n_head']} heads) | {b['params']:,} → {a['params']:,} "
            f"({q['params']:.2f}×) | {b['perplexity']:.3f} | {a['perplexity']:.3f} ({ppl:.3f}×) | "
            f"{c['after']['perplexity']:.3f} | {b['latency_ms_p50']:.2f} → {a['latency_ms_p50']:.2f} ms "
            f"({q['latency_ms_p50']:.2f}×) | {b['onnx_latency_ms_p50']:.2f} → {a['onnx_latency_ms_p50']:.2f} ms "
            f"({q['onnx_latency_ms_p50']:.2f}×) |")
    lines += [
        "",
        f"Targets: perplexity within +10 % (**{sum(ppl_ok)} of {len(ppl_ok)} met**); latency ≤ 0.8× on ONNX Runtime, "
        f"the deployment runtime (**{sum(ort_ok)} of {len(ort_ok)} met**), and on PyTorch eager "
        f"(**{sum(torch_ok)} of {len(torch_ok)} met**). The briefly trained dense models were still improving, "
        "so the pruned models' perplexity is best read against the control; the latency ratio approaches the FLOP "
        "ratio (about 0.7×) as the width grows and fixed per-operator costs matter less.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds for the 90%% experiment")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and steps (a smoke run; figures not written)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section from benchmarks/results/prune.json")
    args = parser.parse_args()
    if args.render_only:
        d = json.loads(RESULTS.read_text())
        write_section("prune", render(d["machine"], d["unstructured"], d["structured"], d["gpt"], d["threads"], d["seconds"]))
        return
    started = time.perf_counter()
    info = machine()
    print(machine_line(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as work:
        print("1. unstructured", flush=True)
        u = unstructured(work, args.threads, list(range(args.seeds)), args.quick)
        print("2. structured", flush=True)
        s = structured(work, args.threads, args.quick)
        print("3. gpt", flush=True)
        g = gpt(work, args.threads, args.quick)
    seconds = time.perf_counter() - started
    markdown = render(info, u, s, g, args.threads, seconds)
    print(markdown)
    if args.quick:
        print("(--quick: docs/benchmarks.md not updated)")
        return
    write_section("prune", markdown, {"machine": info, "threads": args.threads, "seconds": seconds,
                                      "unstructured": u, "structured": s, "gpt": g})


if __name__ == "__main__":
    main()
