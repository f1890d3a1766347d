"""What this CPU's kernels allow: the best ratio each speed target of issues 3 and 4 could reach here.

A latency target is a claim about a whole graph, but a graph cannot run faster than its compute
kernels. This script profiles the models exactly as `bigmodel export` / `bigmodel quantize` write
them (ONNX Runtime's own per-node profiler; each session run as it runs in `bigmodel eval`, thread
spinning on, in short blocks that alternate between the models, the first call of each block
discarded so no model pays for another's threads; medians per node) and bounds each target by generous assumptions:

- export, gpt `mini` at 8 × 128 (target ONNX Runtime ≤ 0.6 × torch eager): even if every
  operation except the weight GEMMs (attention, softmax, norms, GELU, residual adds) took no time,
  ONNX Runtime would need Σ(its weight-GEMM kernels). Ceiling = that sum / torch's whole forward.
- quantize, gpt `mini` dynamic (target int8 ≤ 0.45 × fp32): dynamic quantization changes only the
  weight GEMMs; everything else runs the same fp32 kernels in both models, which can only pull the
  ratio towards 1. Ceiling = Σ(int8 GEMM kernels) / Σ(fp32 GEMM kernels).
- quantize, digits CNN static at batch 256 (target ≥ 1.5× faster): even if the int8 model picked,
  layer by layer, whichever of the int8 and fp32 kernels is faster, and paid nothing for quantize,
  dequantize, transposes or pooling, its time would be Σ min(int8, fp32) over the compute layers.
  Ceiling speed-up = the fp32 model's whole kernel time / that sum.

A ceiling worse than the target means no graph rewrite can meet the target on this CPU: the
kernels themselves are the limit. On a CPU with VNNI (int8) or AVX-512 (fp32 GEMMs and convs) the
kernels differ and so do the ceilings; rerun this there.

Budget: about 5 minutes on 2 cores (three repeats).

    python benchmarks/kernel_ceiling.py [--threads 1,2] [--rounds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import contention, contention_line, cpu_snapshot, machine, machine_line, write_section

TARGETS = {"export_gpt": 0.6, "quantize_gpt": 0.45, "quantize_cnn_speedup": 1.5}
# Ops that multiply by a weight matrix (fp32 and int8, before and after ONNX Runtime's fusions).
GEMM_OPS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "DynamicQuantizeMatMul", "MatMulInteger",
            "MatMulIntegerToFloat", "QGemm", "QLinearMatMul"}
CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "NhwcFusedConv"}


# --- profiling ---------------------------------------------------------------------------------


class Profiled:
    """An ONNX Runtime session with its per-node profiler on, and the graph it actually runs."""

    def __init__(self, path: Path, threads: int, work: Path):
        import onnx
        import onnxruntime as ort

        optimized = work / f"optimized-{path.parent.name}-{threads}.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(work / "profile")
        options.optimized_model_filepath = str(optimized)  # to see which nodes ORT fused into what
        # Spinning stays on, as `bigmodel eval` runs: the ceiling must use the kernels at their best.
        # (Timing in blocks, run_blocks, keeps one session's spinning threads out of another's calls.)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        graph = onnx.load(str(optimized), load_external_data=False).graph
        constants = {t.name for t in graph.initializer}
        # Nodes in execution (topological) order; a weight GEMM reads an initializer as its matrix.
        self.nodes = [(n.name, n.op_type, any(i in constants for i in n.input[1:2])) for n in graph.node]

    def __call__(self, x) -> None:
        self.session.run(None, {self.input: x})

    def kernel_medians(self, keep: list[int]) -> dict[str, float]:
        """Median kernel time per node in ms, over the calls numbered in ``keep`` (0 = the first)."""
        path = Path(self.session.end_profiling())
        events = json.loads(path.read_text())
        path.unlink()
        times: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                times.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1000.0)
        return {name: statistics.median([t[i] for i in keep if i < len(t)] or t) for name, t in times.items()}

    def compute_nodes(self, medians: dict[str, float], ops: set[str], weights_only: bool) -> list[tuple[str, str, float]]:
        return [(name, op, medians[name]) for name, op, has_weight in self.nodes
                if op in ops and name in medians and (has_weight or not weights_only)]


def run_blocks(calls: dict, x_for: dict, rounds: int, block: int = 4) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Each callable ``block`` + 1 times in a row, the models taking turns (order reversed every
    round); the first call of each block is discarded, as it may wait for threads the previous
    model left spinning. Returns the kept wall times (ms) and the kept call numbers per model."""
    names = list(calls)
    wall: dict[str, list[float]] = {n: [] for n in names}
    kept: dict[str, list[int]] = {n: [] for n in names}
    count = dict.fromkeys(names, 0)
    for r in range(rounds + 1):  # round 0 warms every model up and is discarded whole
        for n in (names if r % 2 == 0 else names[::-1]):
            for i in range(block + 1):
                start = time.perf_counter()
                calls[n](x_for[n])
                elapsed = (time.perf_counter() - start) * 1000.0
                if r > 0 and i > 0:
                    wall[n].append(elapsed)
                    kept[n].append(count[n])
                count[n] += 1
    return wall, kept


# --- the models, made the way the CLI makes them -------------------------------------------------


def gpt_models(work: Path) -> tuple[Path, Path, Path]:
    """(torch artifact, fp32 export, dynamic int8) of an untrained `mini` gpt: speed does not
    depend on the weights' values."""
    from export import export, gpt_artifact
    from quantize import quantize

    torch_dir = gpt_artifact(work)
    fp32, _, _ = export(torch_dir, work / "gpt-onnx")
    quantize(fp32, work / "gpt-int8", mode="dynamic", bench=False, threads=1)
    return torch_dir, fp32, work / "gpt-int8"


def cnn_models(work: Path) -> tuple[Path, Path]:
    """(fp32 export, static int8) of the digits CNN, trained as benchmarks/quantize.py trains it
    (static calibration needs realistic activations)."""
    from quantize import exported, quantize, trained

    fp32 = exported(work, trained(work, "cnn", 2, 0), "cnn")
    quantize(fp32, work / "cnn-int8", mode="static", bench=False, threads=1)
    return fp32, work / "cnn-int8"


# --- the three ceilings --------------------------------------------------------------------------


def gpt_ceilings(torch_dir: Path, fp32: Path, int8: Path, threads: int, rounds: int, work: Path) -> dict:
    import numpy as np
    import torch

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.backends import open_backend

    tokens = np.random.default_rng(0).integers(0, 256, size=(8, 128)).astype(np.int64)
    eager = open_backend(open_artifact(torch_dir), "torch", "cpu", threads)  # as `eval --bench` runs torch
    sessions = {"fp32": Profiled(fp32 / "model.onnx", threads, work), "int8": Profiled(int8 / "model.onnx", threads, work)}
    torch.set_num_threads(threads)
    wall, kept = run_blocks({"torch": eager.predict, **sessions}, {k: tokens for k in ("torch", "fp32", "int8")}, rounds)
    p50 = {k: statistics.median(v) for k, v in wall.items()}
    gemm = {}
    for name, s in sessions.items():
        nodes = s.compute_nodes(s.kernel_medians(kept[name]), GEMM_OPS, weights_only=True)
        gemm[name] = {"ms": sum(t for _, _, t in nodes), "nodes": len(nodes), "ops": sorted({op for _, op, _ in nodes})}
    return {
        "threads": threads, "wall_p50_ms": p50, "weight_gemm": gemm,
        "export": {"measured": p50["fp32"] / p50["torch"], "ceiling": gemm["fp32"]["ms"] / p50["torch"],
                   "gemm_share_of_ort": gemm["fp32"]["ms"] / p50["fp32"]},
        "quantize": {"measured": p50["int8"] / p50["fp32"], "ceiling": gemm["int8"]["ms"] / gemm["fp32"]["ms"]},
    }


def cnn_ceiling(fp32: Path, int8: Path, threads: int, rounds: int, work: Path) -> dict:
    import numpy as np

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.evaluate import BenchConfig, bench_input
    from bigmodel_cli.engine.compress.quantize.measure import Evaluator

    artifact = open_artifact(fp32)
    pixels = np.ascontiguousarray(bench_input(artifact, Evaluator(artifact, "val", None).task, BenchConfig(batch_size=256)))
    sessions = {"fp32": Profiled(fp32 / "model.onnx", threads, work), "int8": Profiled(int8 / "model.onnx", threads, work)}
    wall, kept = run_blocks(sessions, {k: pixels for k in sessions}, rounds * 2, block=20)
    medians = {k: s.kernel_medians(kept[k]) for k, s in sessions.items()}
    # The compute layers in order (conv, conv, dense, dense); matched by position across the graphs.
    layers = {k: s.compute_nodes(medians[k], GEMM_OPS | CONV_OPS, weights_only=False) for k, s in sessions.items()}
    if len(layers["fp32"]) != len(layers["int8"]):
        raise SystemExit(f"compute layers do not match: {layers}")
    rows = [{"fp32_op": a[1], "int8_op": b[1], "fp32_ms": a[2], "int8_ms": b[2], "int8_speedup": a[2] / b[2]}
            for a, b in zip(layers["fp32"], layers["int8"])]
    best = sum(min(r["fp32_ms"], r["int8_ms"]) for r in rows)
    total32 = sum(medians["fp32"].values())
    p50 = {k: statistics.median(v) for k, v in wall.items()}
    return {"threads": threads, "wall_p50_ms": p50, "layers": rows, "fp32_kernels_ms": total32,
            "int8_kernels_ms": sum(medians["int8"].values()), "best_mix_compute_ms": best,
            "measured_speedup": p50["fp32"] / p50["int8"], "ceiling_speedup": total32 / best}


# --- report ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 4-call blocks for the gpt (the CNN: 2× the rounds of 20-call blocks)")
    parser.add_argument("--repeats", type=int, default=3, help="independent repeats of every measurement (the docs give their range)")
    args = parser.parse_args()
    started = time.perf_counter()
    info = machine()
    results: dict = {"machine": info, "targets": TARGETS, "gpt": [], "cnn": [], "cpu_start": cpu_snapshot()}
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as tmp:
        work = Path(tmp)
        gpt = gpt_models(work)
        cnn = cnn_models(work)
        for repeat in range(args.repeats):
            for t in (int(v) for v in args.threads.split(",")):
                g = gpt_ceilings(*gpt, threads=t, rounds=args.rounds, work=work)
                c = cnn_ceiling(*cnn, threads=t, rounds=args.rounds, work=work)
                results["gpt"].append({**g, "repeat": repeat})
                results["cnn"].append({**c, "repeat": repeat})
                print(f"repeat {repeat}, threads {t}: export ceiling {g['export']['ceiling']:.2f}× (measured "
                      f"{g['export']['measured']:.2f}×), int8 gpt ceiling {g['quantize']['ceiling']:.2f}× (measured "
                      f"{g['quantize']['measured']:.2f}×), int8 cnn ceiling {c['ceiling_speedup']:.2f}× faster "
                      f"(measured {c['measured_speedup']:.2f}×)", flush=True)
    results["seconds"] = time.perf_counter() - started
    results["contention"] = contention(results.pop("cpu_start"), cpu_snapshot(), info.get("cores"))
    write_section("kernel_ceiling", render(results, info), results)
    print(f"done in {results['seconds']:.0f} s; docs/benchmarks.md updated")


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}×" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}×"


def _verdict(ceilings: list[float], target: float, lower_is_better: bool = True) -> str:
    """Out of reach only if even the most favourable repeat's ceiling misses the target."""
    best = min(ceilings) if lower_is_better else max(ceilings)
    ok = best <= target if lower_is_better else best >= target
    return "reachable in principle" if ok else "**out of reach on this CPU**"


def _by_threads(rows: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["threads"], []).append(row)
    return grouped


def render(r: dict, info: dict) -> str:
    repeats = 1 + max(row.get("repeat", 0) for row in r["gpt"])
    lines = [
        "## What this CPU's kernels allow (`benchmarks/kernel_ceiling.py`)",
        "",
        f"Machine: {machine_line(info)}. {contention_line(r.get('contention'))} "
        f"Run time {r['seconds']:.0f} s; {repeats} independent repeats, their range shown.",
        "",
        "Each ceiling is the best ratio a model could reach here if everything but its compute kernels were free; "
        "kernel times come from ONNX Runtime's per-node profiler on the models `bigmodel export` / `quantize` write "
        "(medians per node; spinning on, the models taking turns in short blocks whose first call is discarded). "
        "A target is called out of reach only when even the most favourable repeat's ceiling misses it: then no graph "
        "change can meet it on this CPU. Method and assumptions: the script's docstring.",
        "",
        "| target | threads | measured | ceiling | target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    gpt, cnn = _by_threads(r["gpt"]), _by_threads(r["cnn"])
    for t, rows in gpt.items():
        ceilings = [g["export"]["ceiling"] for g in rows]
        lines.append(f"| export: gpt `mini` ONNX Runtime / torch eager, 8 × 128 | {t} | {_span([g['export']['measured'] for g in rows])} | "
                     f"{_span(ceilings)} | ≤ {TARGETS['export_gpt']}× | {_verdict(ceilings, TARGETS['export_gpt'])} |")
    for t, rows in gpt.items():
        ceilings = [g["quantize"]["ceiling"] for g in rows]
        lines.append(f"| quantize: gpt `mini` dynamic int8 / fp32, 8 × 128 | {t} | {_span([g['quantize']['measured'] for g in rows])} | "
                     f"{_span(ceilings)} | ≤ {TARGETS['quantize_gpt']}× | {_verdict(ceilings, TARGETS['quantize_gpt'])} |")
    for t, rows in cnn.items():
        ceilings = [c["ceiling_speedup"] for c in rows]
        lines.append(f"| quantize: digits CNN static speed-up, batch 256 | {t} | {_span([c['measured_speedup'] for c in rows])} | "
                     f"{_span(ceilings)} | ≥ {TARGETS['quantize_cnn_speedup']}× | "
                     f"{_verdict(ceilings, TARGETS['quantize_cnn_speedup'], lower_is_better=False)} |")
    lines += ["", "Where the time goes (ms, medians; every repeat):", "",
              "| threads | repeat | torch forward | ORT fp32 forward | its weight GEMMs | ORT int8 forward | its weight GEMMs |",
              "|---|---|---|---|---|---|---|"]
    for g in r["gpt"]:
        w, k = g["wall_p50_ms"], g["weight_gemm"]
        lines.append(f"| {g['threads']} | {g.get('repeat', 0) + 1} | {w['torch']:.1f} | {w['fp32']:.1f} | {k['fp32']['ms']:.1f} "
                     f"({k['fp32']['nodes']} × {'/'.join(k['fp32']['ops'])}) | {w['int8']:.1f} | {k['int8']['ms']:.1f} "
                     f"({k['int8']['nodes']} × {'/'.join(k['int8']['ops'])}) |")
    layers = len(r["cnn"][0]["layers"])
    lines += ["", "digits CNN, per compute layer (kernel ms, fp32 → int8; every repeat):", "",
              "| threads | repeat | " + " | ".join(f"layer {i + 1}" for i in range(layers)) + " | all fp32 kernels | best mix of compute kernels |",
              "|---|---|" + "---|" * (layers + 2)]
    for c in r["cnn"]:
        cells = [f"{x['fp32_op']} {x['fp32_ms']:.3f} → {x['int8_op']} {x['int8_ms']:.3f} ({x['int8_speedup']:.2f}×)" for x in c["layers"]]
        lines.append(f"| {c['threads']} | {c.get('repeat', 0) + 1} | " + " | ".join(cells)
                     + f" | {c['fp32_kernels_ms']:.3f} | {c['best_mix_compute_ms']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
