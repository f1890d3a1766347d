"""Cached decoding on ONNX Runtime (decoder.onnx, fp32 and MatMulNBits int4) side by side with our
PyTorch cache and Hugging Face `transformers` `generate`, on the same weights.

The model is `benchmarks/generate.py`'s (the `mini` shape: 6 layers, width 384, 6 heads, 256
vocabulary; random weights made as a transformers GPT-2 and brought in with `bigmodel import`), then
`bigmodel export` (which writes decoder.onnx) and `bigmodel quantize --mode matmul-nbits --bits 4`.
Greedy, a 9-token prompt, 200 new tokens, 1 and 2 threads; the four take turns (interleaved,
order reversed every round) after a warm-up, every repeat kept. Ours is the code `bigmodel
generate` runs (engine/generate.py's decode_stream with the cached decoders), not a bare loop.
Perplexity of fp32 and int4 on the same text (the quantize report) bounds the int4 cost.

Optimum's `ORTModelForCausalLM` (the issue's ONNX reference) is not run here: `optimum-onnx` pins
an older transformers than the one installed; `benchmarks/generate_optimum.py` (`make
bench-optimum`, its own venv) compares ours with it.

    python benchmarks/generate_onnx.py [--threads 1,2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import contention, contention_line, cpu_snapshot, machine, machine_line, write_section
from generate import NEW_TOKENS, PROMPT_TOKENS, SHAPE, make_models, ours_generate, take_turns, theirs_generate, tokens_per_s

BLOCK_SIZE = 32  # MatMulNBits block


def ort_generate(decoder, prompt: list[int], new: int) -> list[int]:
    from bigmodel_cli.engine.generate import GenerateConfig, decode_stream

    return list(decode_stream(decoder, prompt, GenerateConfig(prompt="x", max_new_tokens=new, temperature=0)))


def ort_decoder(directory: Path, threads: int):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx.decoder import open_ort_decoder

    artifact = open_artifact(directory)
    return open_ort_decoder(directory, artifact.config["onnx"]["decoder"], 256, SHAPE["vocab_size"], "cpu", threads)


def main() -> None:
    import torch

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.compress.quantize.command import QuantizeOptions, quantize_artifact
    from bigmodel_cli.engine.onnx.export import export_artifact

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]

    info = machine()
    before = cpu_snapshot()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-onnx-"))
    theirs, ours = make_models(work, 256)
    export_artifact(open_artifact(work / "ours-256"), work / "onnx")
    q = quantize_artifact(open_artifact(work / "onnx"), work / "int4",
                          QuantizeOptions(mode="matmul-nbits", bits=4, group_size=BLOCK_SIZE, limit=16))
    ppl = (q.report["before"].get("perplexity"), q.report["after"].get("perplexity"))
    prompt = list(range(40, 40 + PROMPT_TOKENS))
    reference = ours_generate(ours, prompt, NEW_TOKENS, 256, True)

    rows, raw = [], {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        fp32, int4 = ort_decoder(work / "onnx", threads), ort_decoder(work / "int4", threads)
        same = {"ort_fp32": ort_generate(fp32, prompt, NEW_TOKENS) == reference,
                "transformers": theirs_generate(theirs, prompt, NEW_TOKENS) == reference}
        seconds = take_turns({
            "transformers": lambda: theirs_generate(theirs, prompt, NEW_TOKENS),
            "ours_torch": lambda: ours_generate(ours, prompt, NEW_TOKENS, 256, True),
            "ort_fp32": lambda: ort_generate(fp32, prompt, NEW_TOKENS),
            "ort_int4": lambda: ort_generate(int4, prompt, NEW_TOKENS),
        }, args.rounds)
        raw[threads] = {"seconds": seconds, "same_tokens": same}
        speed = {name: tokens_per_s(s, NEW_TOKENS) for name, s in seconds.items()}
        rows.append((threads, speed, seconds, same))
        print(threads, {k: round(v, 1) for k, v in speed.items()}, same, flush=True)
    busy = contention(before, cpu_snapshot(), info.get("cores"))
    flags = info.get("cpu_flags") or info.get("flags") or ""
    vnni = "avx512_vnni" in json.dumps(info) or "avx512_vnni" in str(flags)

    lines = [
        "## Decoding on ONNX Runtime: decoder.onnx fp32 and int4 vs PyTorch cache vs transformers (`benchmarks/generate_onnx.py`)",
        "",
        f"Machine: {machine_line(info)}. {contention_line(busy)} AVX-512 VNNI: **{'yes' if vnni else 'not detected'}** "
        "(int8 dot products in hardware; int4 pays by reading fewer bytes either way).",
        "",
        f"`mini` shape, random weights (as `benchmarks/generate.py`); greedy, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} "
        f"new tokens; tokens/s = {NEW_TOKENS} / median wall time of the whole call, {args.rounds} interleaved repeats "
        f"after a warm-up. int4 = `quantize --mode matmul-nbits --bits 4 --group-size {BLOCK_SIZE}` (symmetric, "
        f"accuracy level unset). Perplexity fp32 → int4 on 16 windows of the import's data: "
        f"{ppl[0]:.4g} → {ppl[1]:.4g} ({(ppl[1] / ppl[0] - 1) * 100:+.2f} %; random weights, so this only shows "
        "the quantizer's error, not a trained model's).",
        "",
        "| threads | transformers tok/s | ours torch cache tok/s | ORT fp32 cache tok/s | ORT int4 cache tok/s | ORT fp32 ÷ torch | ORT fp32 ÷ transformers | int4 ÷ ORT fp32 | same greedy tokens (ORT fp32, transformers) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for threads, s, _, same in rows:
        lines.append(f"| {threads} | {s['transformers']:.1f} | {s['ours_torch']:.1f} | {s['ort_fp32']:.1f} | {s['ort_int4']:.1f} "
                     f"| {s['ort_fp32'] / s['ours_torch']:.2f}× | {s['ort_fp32'] / s['transformers']:.2f}× "
                     f"| **{s['ort_int4'] / s['ort_fp32']:.2f}×** | {same['ort_fp32']}, {same['transformers']} |")
    lines += ["", "Every repeat (seconds per call):", ""]
    for threads, _, seconds, _ in rows:
        for name, values in seconds.items():
            lines.append(f"- {threads} thread(s), {name}: {', '.join(f'{v:.3f}' for v in values)}")
    worst = min(s["ort_int4"] / s["ort_fp32"] for _, s, _, _ in rows)
    lines += ["", f"Target int4 ≥ 1.5× ORT fp32 decode: **{'met' if worst >= 1.5 else 'not met'}** (worst {worst:.2f}×). "
              "Target ORT ≥ 1.0× Optimum `ORTModelForCausalLM`: measured in its own venv, see the next section "
              "(`benchmarks/generate_optimum.py`)."]
    write_section("generate-onnx", "\n".join(lines), {"machine": info, "contention": busy, "raw": raw,
                                                      "perplexity": ppl})


if __name__ == "__main__":
    main()
