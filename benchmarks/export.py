"""ONNX Runtime vs torch eager, side by side in one run, on artifacts made by `bigmodel export`.

Targets (issue 3): ONNX Runtime fp32 latency at most 0.6× torch eager for the `mini` gpt preset
(10.8M parameters) at batch 8 × sequence 128, and at most 1.0× for the digits MLP at batch 256.

Both backends are opened the way `bigmodel eval --bench` opens them (engine.backends.open_backend),
with the same thread count, and timed as `eval --bench` times them (taking turns of one untimed and
four timed calls, order reversed every turn; engine/core/timing.py says why) after warm-up; the claim is
the ratio of medians of wall time. Each configuration is measured at every thread count in --threads,
and each row is compared with the target. Next to it, the ratio of this process's CPU time per
call: with one thread that is the work itself, unaffected by whatever else a shared machine runs.
Also measured, to back the defaults in docs/export.md: opset 18 (the default) against opset 23
(native Attention) for the gpt, call-by-call alternation against turns (repeated),
and an fp16 against the fp32 export of the MLP in ONNX Runtime's
CPU provider.

Budget: about 4 minutes on 2 shared cores.

    python benchmarks/export.py [--threads 1,2] [--rounds 12] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import contention, contention_line, cpu_snapshot, machine, machine_line, percentile, ratio, write_section

GPT_TARGET, MLP_TARGET = 0.6, 1.0


def gpt_artifact(work: Path) -> Path:
    """An (untrained) `mini` gpt as a byte-level artifact: latency does not depend on the weights."""
    import torch

    from bigmodel_cli.artifact import new_config, save_torch_artifact
    from bigmodel_cli.models import build_model, resolve_spec

    torch.manual_seed(0)
    spec = resolve_spec("gpt", "mini", data_fit={"vocab_size": 256})
    data = {"name": "text", "path": "stdlib", "vocab_size": 256, "block_size": 128}
    out = work / "gpt-mini"
    save_torch_artifact(out, build_model(spec), config=new_config("language-modeling", spec, data), stage="train")
    return out


def digits_artifact(work: Path, threads: int) -> Path:
    from bigmodel_cli import TrainConfig, train

    return train(TrainConfig(model="mlp", epochs=3, seed=0, threads=threads, out=str(work / "digits"))).best_dir


def export(source: Path, out: Path, **options) -> tuple[Path, dict, float]:
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx.export import ExportOptions, export_artifact

    start = time.perf_counter()
    result = export_artifact(open_artifact(source), out, ExportOptions(**options), threads=1)
    return out, result.verification, time.perf_counter() - start


def timed(candidates: dict, rounds: int, warmup: int = 3) -> dict[str, dict]:
    """As `bigmodel eval --bench` times backends (engine.core.timing.take_turns: turns of one untimed
    and TURN timed calls, the order reversed every turn), recording both wall time and this
    process's CPU time per call. With one thread, CPU time is the work itself, whatever else the
    shared machine is running; wall time is what a caller waits. ``rounds`` timed calls each."""
    from bigmodel_cli.engine.core.timing import TURN

    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    turn = 0
    while len(wall[names[0]]) < rounds:
        calls = min(TURN, rounds - len(wall[names[0]]))
        for name in (names if turn % 2 == 0 else names[::-1]):
            candidates[name]()  # untimed: the previous backend's pool threads may still be spinning
            for _ in range(calls):
                w, c = time.perf_counter(), time.process_time()
                candidates[name]()
                cpu[name].append((time.process_time() - c) * 1000.0)
                wall[name].append((time.perf_counter() - w) * 1000.0)
        turn += 1
    return {n: {"p50": statistics.median(wall[n]), "p95": percentile(wall[n], 0.95), "cpu_p50": statistics.median(cpu[n]),
                "n": rounds} for n in names}


def alternation_study(gpt: Path, example, threads: int, rounds: int, repeats: int = 3) -> dict:
    """Why turns: the same two backends timed call by call (A B B A …), the way this benchmark and
    `eval --bench` timed them before, against turns, ``repeats`` times. Each pass is warmed up, and
    which method goes first alternates between repeats, so neither gets the warmer machine."""
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.backends import open_backend

    runners = {name: open_backend(open_artifact(gpt), name, "cpu", threads) for name in ("torch", "onnx")}
    fns = {name: (lambda r=r: r.predict(example)) for name, r in runners.items()}

    def call_by_call() -> dict[str, float]:
        for fn in fns.values():
            fn()
        single: dict[str, list[float]] = {n: [] for n in fns}
        for r in range(rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                start = time.perf_counter()
                fns[name]()
                single[name].append((time.perf_counter() - start) * 1000.0)
        return {n: statistics.median(v) for n, v in single.items()}

    def turns() -> dict[str, float]:
        return {n: v["p50"] for n, v in timed(fns, rounds, warmup=1).items()}

    runs = []
    for repeat in range(repeats):
        first, second = (call_by_call, turns) if repeat % 2 == 0 else (turns, call_by_call)
        a, b = first(), second()
        c, t = (a, b) if first is call_by_call else (b, a)
        runs.append({"call_by_call": c, "turns": t, "call_by_call_ratio": c["onnx"] / c["torch"],
                     "turns_ratio": t["onnx"] / t["torch"]})
    return {"threads": threads, "rounds": rounds, "runs": runs}


def side_by_side(candidates: dict[str, tuple[Path, str]], example, threads: int, rounds: int) -> dict:
    """{name: (artifact, backend)} → interleaved timings, all with the same threads."""
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.backends import open_backend

    runners = {name: open_backend(open_artifact(path), backend, "cpu", threads) for name, (path, backend) in candidates.items()}
    assert len({r.threads for r in runners.values()}) == 1
    fns = {name: (lambda r=r: r.predict(example)) for name, r in runners.items()}
    return timed(fns, rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to measure")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds for the gpt (the MLP gets 20×)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no opset/fp16 side studies")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    rounds = 4 if args.quick else args.rounds
    import numpy as np

    started = time.perf_counter()
    info = machine()
    results: dict = {"machine": info, "threads": thread_counts, "cpu_start": cpu_snapshot()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gpt = gpt_artifact(work)
        gpt18, gpt_verify, gpt_export_s = export(gpt, work / "gpt-onnx")
        print(f"gpt mini exported in {gpt_export_s:.1f} s, verification {gpt_verify['max_abs_diff']:.2e}", flush=True)
        tokens = np.random.default_rng(0).integers(0, 256, size=(8, 128)).astype(np.int64)
        digits = digits_artifact(work, thread_counts[0])
        mlp, mlp_verify, mlp_export_s = export(digits, work / "digits-onnx")
        pixels = np.random.default_rng(0).standard_normal((256, 1, 8, 8)).astype(np.float32)

        results["gpt"], results["mlp"] = {}, {}
        for t in thread_counts:
            g = side_by_side({"torch": (gpt18, "torch"), "onnx": (gpt18, "onnx")}, tokens, t, rounds)
            m = side_by_side({"torch": (mlp, "torch"), "onnx": (mlp, "onnx")}, pixels, t, rounds * 20)
            results["gpt"][t] = {**g, "ratio": ratio(g, "onnx", "torch"), "cpu_ratio": g["onnx"]["cpu_p50"] / g["torch"]["cpu_p50"]}
            results["mlp"][t] = {**m, "ratio": ratio(m, "onnx", "torch"), "cpu_ratio": m["onnx"]["cpu_p50"] / m["torch"]["cpu_p50"]}
            print(f"threads {t}: gpt onnx/torch {results['gpt'][t]['ratio']:.3f}, mlp {results['mlp'][t]['ratio']:.3f}", flush=True)
        results["verification"] = {"gpt": gpt_verify, "mlp": mlp_verify}
        results["export_seconds"] = {"gpt": gpt_export_s, "mlp": mlp_export_s}

        if not args.quick:
            t = thread_counts[0]
            gpt23, _, _ = export(gpt, work / "gpt-onnx-23", opset=23)
            results["opset"] = side_by_side({"opset18": (gpt18, "onnx"), "opset23": (gpt23, "onnx")}, tokens, t, rounds)
            results["alternation"] = alternation_study(gpt18, tokens, max(thread_counts), rounds)
            mlp16, mlp16_verify, _ = export(digits, work / "digits-fp16", dtype="fp16")
            results["fp16"] = {
                "mlp": side_by_side({"fp32": (mlp, "onnx"), "fp16": (mlp16, "onnx")}, pixels, t, rounds * 20),
                "verification": {"mlp": mlp16_verify},
            }
    results["seconds"] = time.perf_counter() - started
    results["contention"] = contention(results.pop("cpu_start"), cpu_snapshot(), info.get("cores"))
    write_section("export", render(results, info), results)
    print(f"done in {results['seconds']:.0f} s; docs/benchmarks.md updated", flush=True)


def _verdict(value: float, target: float) -> str:
    return f"**met** (≤ {target}×)" if value <= target else f"**not met** (target ≤ {target}×)"


def render(r: dict, info: dict) -> str:
    lines = [
        "## Export: ONNX Runtime vs torch eager (`benchmarks/export.py`)",
        "",
        f"Machine: {machine_line(info)}. {contention_line(r.get('contention'))} "
        f"Absolute times are of this machine at that moment; the ratios are the claim. "
        f"Both backends opened and timed as `bigmodel eval --bench` does (same threads, taking turns of one untimed and "
        f"4 timed calls); "
        f"ratio = median(ONNX Runtime) / median(torch) of wall time; the CPU-time ratio compares this process's "
        f"CPU time per call, which contention does not inflate (with 2 threads it sums both). Run time {r['seconds']:.0f} s.",
        "",
        "| model | input | threads | torch p50 / p95 (ms) | ONNX Runtime p50 / p95 (ms) | ratio (wall p50) | target | CPU-time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label, shape, target in (("gpt", "gpt `mini` (10.8M params, fp32)", "8 × 128 tokens", GPT_TARGET),
                                      ("mlp", "digits MLP (`small`, fp32)", "256 × 1×8×8", MLP_TARGET)):
        for t, res in r[key].items():
            lines.append(f"| {label} | {shape} | {t} | {res['torch']['p50']:.3f} / {res['torch']['p95']:.3f} | "
                         f"{res['onnx']['p50']:.3f} / {res['onnx']['p95']:.3f} | {res['ratio']:.3f}× | {_verdict(res['ratio'], target)} | "
                         f"{res['cpu_ratio']:.3f}× |")
    v = r["verification"]
    lines += [
        "",
        f"Export verification (max |torch − ONNX Runtime| over batch 1 and 7 and two sequence lengths): gpt "
        f"{v['gpt']['max_abs_diff']:.2e}, MLP {v['mlp']['max_abs_diff']:.2e}; export (with verification) took "
        f"{r['export_seconds']['gpt']:.1f} s and {r['export_seconds']['mlp']:.1f} s.",
    ]
    if "opset" in r:
        o, f = r["opset"], r["fp16"]
        lines += [
            "",
            f"Side studies, {r['threads'][0]} thread, ONNX Runtime only: gpt `mini` opset 23 (native `Attention`) / "
            f"opset 18 (the default) = {ratio(o, 'opset23', 'opset18'):.3f}× "
            f"(opset 23 {o['opset23']['p50']:.1f} ms vs opset 18 {o['opset18']['p50']:.1f} ms p50). MLP exported as fp16 / fp32 on the CPU "
            f"provider: {ratio(f['mlp'], 'fp16', 'fp32'):.2f}× (fp16 verification: max |diff| "
            f"{f['verification']['mlp']['max_abs_diff']:.2e}, top-1 agreement {f['verification']['mlp']['top1_agreement']:.1%}).",
        ]
    if "alternation" in r and "runs" in r["alternation"]:
        a = r["alternation"]
        by_call = [x["call_by_call_ratio"] for x in a["runs"]]
        in_turns = [x["turns_ratio"] for x in a["runs"]]
        lines += [
            "",
            f"Call by call against turns ({a['threads']} threads, gpt `mini`, {len(a['runs'])} repeats of {a['rounds']} "
            f"timed calls each, the order of the two methods alternating): ONNX Runtime / torch timed call by call "
            f"(torch, ONNX Runtime, ONNX Runtime, torch, …) {' '.join(f'{v:.3f}×' for v in by_call)}; in turns "
            f"{' '.join(f'{v:.3f}×' for v in in_turns)}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
