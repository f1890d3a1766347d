"""Cached decoding on ONNX Runtime: ours (`bigmodel export`'s decoder.onnx, as `bigmodel generate`
runs it) side by side with Hugging Face Optimum's `ORTModelForCausalLM`, on the same weights.

Optimum (`optimum-onnx`) pins transformers<4.58, older than the project's dev extra, so this runs in
its own venv: `make bench-optimum` creates `.venv-optimum` and runs this script there.

The model is `benchmarks/generate.py`'s (the `mini` shape: 6 layers, width 384, 6 heads, 256
vocabulary; random weights made as a transformers GPT-2 with save_pretrained). Optimum exports
that directory itself (`from_pretrained(dir, export=True)`: its decoder with past key values, its
defaults for cache and IO binding, which is off on CPU, so it also runs with `use_io_binding=True`); ours is `bigmodel import` → `bigmodel export` (decoder.onnx,
fp32). Both sessions get the same thread settings (intra-op = threads, inter-op = 1, sequential,
all graph optimisations) and torch the same thread count (Optimum's generate loop is
transformers', in torch). Greedy, a 9-token prompt, 200 new tokens, 1 and 2 threads; the two take
turns (interleaved, order reversed every round) after a warm-up, every repeat kept.

    python benchmarks/generate_optimum.py [--threads 1,2] [--rounds 3] [--no-profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
from pathlib import Path

from _common import contention, contention_line, cpu_snapshot, machine, machine_line, write_section
from generate import NEW_TOKENS, PROMPT_TOKENS, make_models, ours_generate, take_turns, tokens_per_s
from generate_onnx import ort_decoder, ort_generate

TARGET = 1.0  # ours on ORT ≥ 1.0 × Optimum ORTModelForCausalLM


def session_options(threads: int):
    """The options bigmodel's open_session sets, so both sides run ORT alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def optimum_model(directory: Path, threads: int, io_binding: bool | None):
    """Optimum's model; ``io_binding`` None keeps its default (off on CPU)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    extra = {} if io_binding is None else {"use_io_binding": io_binding}
    return ORTModelForCausalLM.from_pretrained(directory, provider="CPUExecutionProvider",
                                               session_options=session_options(threads), **extra)


def optimum_generate(model, prompt: list[int], new: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def profile(call, top: int = 12) -> tuple[str, float]:
    """cProfile's top functions by own time over one call, and the share of the call spent inside
    ONNX Runtime's run (the rest is Python: input preparation, sampling, the generate loop)."""
    prof = cProfile.Profile()
    prof.runcall(call)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    in_ort = sum(tt for (_, _, name), (_, _, tt, _, _) in stats.stats.items()
                 if "onnxruntime" in name and name.endswith((".run>", ".run_with_iobinding>")))
    return out.getvalue(), in_ort / stats.total_tt


def main() -> None:
    from importlib.metadata import version

    import torch

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx.export import export_artifact
    from optimum.onnxruntime import ORTModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile of one call of each (1 thread)")
    args = parser.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]

    info = machine()
    before = cpu_snapshot()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-optimum-"))
    _theirs, ours_torch = make_models(work, 256)
    export_artifact(open_artifact(work / "ours-256"), work / "onnx")
    ORTModelForCausalLM.from_pretrained(work / "hf-256", export=True).save_pretrained(work / "optimum")
    versions = {p: version(p) for p in ("optimum-onnx", "optimum", "transformers", "onnxruntime", "torch")}
    prompt = list(range(40, 40 + PROMPT_TOKENS))
    reference = ours_generate(ours_torch, prompt, NEW_TOKENS, 256, True)

    rows, raw, io_binding, profiles = [], {}, None, {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        ours = ort_decoder(work / "onnx", threads)
        theirs = optimum_model(work / "optimum", threads, None)
        theirs_bound = optimum_model(work / "optimum", threads, True)
        io_binding = getattr(theirs, "use_io_binding", None)
        same = {"ours_ort": ort_generate(ours, prompt, NEW_TOKENS) == reference,
                "optimum": optimum_generate(theirs, prompt, NEW_TOKENS) == reference,
                "optimum_io_binding": optimum_generate(theirs_bound, prompt, NEW_TOKENS) == reference}
        seconds = take_turns({
            "optimum": lambda: optimum_generate(theirs, prompt, NEW_TOKENS),
            "optimum_io_binding": lambda: optimum_generate(theirs_bound, prompt, NEW_TOKENS),
            "ours_ort": lambda: ort_generate(ours, prompt, NEW_TOKENS),
        }, args.rounds)
        raw[threads] = {"seconds": seconds, "same_tokens": same}
        speed = {name: tokens_per_s(s, NEW_TOKENS) for name, s in seconds.items()}
        rows.append((threads, speed, seconds, same))
        print(threads, {k: round(v, 1) for k, v in speed.items()}, same, flush=True)
        if not args.no_profile and threads == threads_list[0]:
            # after the timed repeats, so the profiler's overhead touches no timing
            profiles = {"optimum": profile(lambda: optimum_generate(theirs, prompt, NEW_TOKENS)),
                        "ours_ort": profile(lambda: ort_generate(ours, prompt, NEW_TOKENS))}
            for name, (text, share) in profiles.items():
                print(f"--- {name} (in ORT run: {share:.0%})\n{text}", flush=True)
    busy = contention(before, cpu_snapshot(), info.get("cores"))

    lines = [
        "## Decoding on ONNX Runtime: ours vs Optimum `ORTModelForCausalLM` (`benchmarks/generate_optimum.py`)",
        "",
        f"Machine: {machine_line(info)}. {contention_line(busy)} Run with `make bench-optimum` in its own venv "
        f"(`.venv-optimum`): {', '.join(f'{p} {v}' for p, v in versions.items())}.",
        "",
        f"`mini` shape, random weights (as `benchmarks/generate.py`), one GPT-2 directory: Optimum exports it "
        f"(`from_pretrained(dir, export=True)`; run with its defaults — IO binding on CPU: {io_binding} — and "
        f"again with `use_io_binding=True`; the ratio is against the faster of the two), ours is "
        f"`bigmodel import` → `bigmodel export` (decoder.onnx, fp32) run by `bigmodel generate`'s code. Same "
        f"session options on both (intra-op = threads, inter-op = 1, sequential, all optimisations), torch at "
        f"the same thread count. Greedy, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens; tokens/s = "
        f"{NEW_TOKENS} / median wall time of the whole call, {args.rounds} interleaved repeats after a warm-up.",
        "",
        "| threads | Optimum (default) tok/s | Optimum + IO binding tok/s | ours ORT tok/s | ours ÷ faster Optimum | "
        "same greedy tokens as our PyTorch (ours ORT, Optimum, Optimum + IO binding) |",
        "|---|---|---|---|---|---|",
    ]
    for threads, s, _, same in rows:
        best = max(s["optimum"], s["optimum_io_binding"])
        lines.append(f"| {threads} | {s['optimum']:.1f} | {s['optimum_io_binding']:.1f} | {s['ours_ort']:.1f} "
                     f"| **{s['ours_ort'] / best:.2f}×** | {same['ours_ort']}, {same['optimum']}, {same['optimum_io_binding']} |")
    lines += ["", "Every repeat (seconds per call):", ""]
    for threads, _, seconds, _ in rows:
        for name, values in seconds.items():
            lines.append(f"- {threads} thread(s), {name}: {', '.join(f'{v:.3f}' for v in values)}")
    worst = min(s["ours_ort"] / max(s["optimum"], s["optimum_io_binding"]) for _, s, _, _ in rows)
    lines += ["", f"Target ours on ORT ≥ {TARGET:.1f}× Optimum `ORTModelForCausalLM`: "
              f"**{'met' if worst >= TARGET else 'not met'}** (worst {worst:.2f}×)."]
    if profiles:
        lines += ["", f"Where the time goes (cProfile of one call each at {threads_list[0]} thread(s), after the timed "
                  "repeats): share of the call inside ONNX Runtime's run — "
                  + "; ".join(f"{name} {share:.0%}" for name, (_, share) in profiles.items())
                  + ". The rest is Python around it (Optimum: transformers' generate loop, torch↔numpy input "
                  "and output preparation; ours: IO binding and numpy sampling)."]
    write_section("generate-optimum", "\n".join(lines), {"machine": info, "contention": busy, "raw": raw,
                                                         "versions": versions, "optimum_io_binding": io_binding,
                                                         "profiles": profiles})


if __name__ == "__main__":
    main()
