"""Decoding speed: `bigmodel generate` on PyTorch with and without its KV cache, side by side with
Hugging Face `transformers` `generate` (with its cache) on the same weights.

The model is the `mini` preset's shape (6 layers, width 384, 6 heads, 256-token vocabulary) with
random weights: speed does not depend on their values. It is made as a transformers
`GPT2LMHeadModel` and brought in with `bigmodel import`, so both tools run the very same numbers
(the greedy tokens are checked equal). Greedy, a 9-token prompt, 200 new tokens, 1 and 2 threads;
the tools take turns (interleaved, order reversed every round), every repeat is kept.

Then the cost per token against the context: decode tokens/s (after the first token) of 16 new
tokens after a prompt of 64, 256 and 1024 tokens (a model with a 1280-token window), cache and no
cache, on PyTorch and on ONNX Runtime (the model exported: decoder.onnx with its cache kept in ORT,
and the cache-free model.onnx that `generate --no-cache` and exports without a decoder use).

Last, batched throughput: four prompts of different lengths (5 to 20 tokens), 64 new tokens each,
decoded one at a time (batch 1) and together (batch 4, left-padded with an attention mask), with
the cache on PyTorch and on ONNX Runtime; tokens/s = all new tokens over the wall time.

Timing is the whole call (prefill included, negligible at 9 tokens) as a user waits for it; ours
is the code `bigmodel generate` runs (engine/generate.py: decoder, numpy sampling), not a bare
forward loop. transformers runs its default attention (SDPA), as its users get it.

Budget: about 4 minutes on 2 busy cores.

    python benchmarks/generate.py [--threads 1,2] [--rounds 3] [--sweep-rounds 2] [--batch-rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import contention, contention_line, cpu_snapshot, machine, machine_line, write_section

SHAPE = {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 256}
PROMPT_TOKENS, NEW_TOKENS = 9, 200
SWEEP_CONTEXTS, SWEEP_NEW, SWEEP_WINDOW = (64, 256, 1024), 16, 1280
BATCH_PROMPTS, BATCH_NEW = (9, 20, 5, 14), 64  # prompt lengths of the batched-throughput line
TARGET = 1.0  # ours with cache ≥ 1.0 × transformers


def make_models(work: Path, window: int):
    """(transformers model, our model) with the same random weights, via `bigmodel import`."""
    import torch
    import transformers

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.pretrained.hf_import import import_checkpoint

    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPE, n_positions=window, bos_token_id=0, eos_token_id=None)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(work / f"hf-{window}")
    import_checkpoint(work / f"hf-{window}", work / f"ours-{window}")
    ours = open_artifact(work / f"ours-{window}").build_model().eval()
    return theirs, ours


def ours_generate(model, prompt: list[int], new: int, window: int, cache: bool, clock: dict | None = None) -> list[int]:
    """What `bigmodel generate --temperature 0 [--no-cache]` runs for the tokens; ``clock`` gets the
    prefill's and the first token's times."""
    from bigmodel_cli.engine.core.tasks import torch_predict
    from bigmodel_cli.engine.decoders import CachedTorchDecoder, RecomputeDecoder
    from bigmodel_cli.engine.generate import GenerateConfig, decode_stream

    decoder = (CachedTorchDecoder(model, window, "cpu", "fp32", SHAPE["vocab_size"]) if cache
               else RecomputeDecoder(torch_predict(model), window))
    return list(decode_stream(decoder, prompt, GenerateConfig(prompt="x", max_new_tokens=new, temperature=0), clock))


def decode_seconds(decoder, prompt: list[int]) -> float:
    """Seconds for the sweep's tokens after the first (the prefill and first token left out)."""
    from bigmodel_cli.engine.generate import GenerateConfig, decode_stream

    clock: dict = {}
    start = time.perf_counter()
    list(decode_stream(decoder, prompt, GenerateConfig(prompt="x", max_new_tokens=SWEEP_NEW, temperature=0), clock))
    return time.perf_counter() - start - clock["first_token_s"]


def sweep_decoders(model, work: Path) -> dict:
    """name → a decoder over the sweep's model (each call's start resets it): PyTorch with and
    without the cache, and its export on ONNX Runtime (decoder.onnx, cached in ORT; model.onnx,
    recomputing), 1 thread."""
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.core.tasks import torch_predict
    from bigmodel_cli.engine.decoders import CachedTorchDecoder, RecomputeDecoder
    from bigmodel_cli.engine.onnx.decoder import open_ort_decoder
    from bigmodel_cli.engine.onnx.export import export_artifact
    from bigmodel_cli.engine.onnx.runtime import open_session, session_predict

    exported = work / f"onnx-{SWEEP_WINDOW}"
    export_artifact(open_artifact(work / f"ours-{SWEEP_WINDOW}"), exported, threads=1)
    section = open_artifact(exported).config["onnx"]["decoder"]
    vocab = SHAPE["vocab_size"]
    ort_plain = session_predict(open_session(exported / "model.onnx", threads=1)[0])
    return {
        "torch_cache": CachedTorchDecoder(model, SWEEP_WINDOW, "cpu", "fp32", vocab),
        "torch_no_cache": RecomputeDecoder(torch_predict(model), SWEEP_WINDOW),
        "ort_cache": open_ort_decoder(exported, section, SWEEP_WINDOW, vocab, "cpu", 1),
        "ort_no_cache": RecomputeDecoder(ort_plain, SWEEP_WINDOW),
    }


def batch_tokens_per_s(decoder, prompts: list[list[int]], batch: int) -> float:
    """All new tokens over the wall time, the prompts decoded ``batch`` at a time (engine.generate's
    decode_rows: what `generate --prompts-file --batch-size` runs)."""
    from bigmodel_cli.data.tokenizer import ByteTokenizer
    from bigmodel_cli.engine.generate import GenerateConfig, decode_rows

    cfg = GenerateConfig(prompt="x", max_new_tokens=BATCH_NEW, temperature=0)
    start, made = time.perf_counter(), 0
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        rows, _ = decode_rows(decoder, ByteTokenizer(), chunk, [0] * len(chunk), cfg)
        made += sum(row["new_tokens"] for row in rows)
    return made / (time.perf_counter() - start)


def theirs_generate(model, prompt: list[int], new: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def take_turns(calls: dict, rounds: int, timed_by_call: bool = False) -> dict[str, list[float]]:
    """Every call once per round, order reversed every other round, after one warm-up round.
    Seconds, every repeat: the call's wall time, or what the call returns if ``timed_by_call``."""
    names = list(calls)
    for name in names:
        calls[name]()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            result = calls[name]()
            seconds[name].append(result if timed_by_call else time.perf_counter() - start)
    return seconds


def tokens_per_s(seconds: list[float], tokens: int) -> float:
    return tokens / statistics.median(seconds)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep-rounds", type=int, default=2)
    parser.add_argument("--batch-rounds", type=int, default=3)
    args = parser.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]

    info = machine()
    before = cpu_snapshot()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    theirs, ours = make_models(work, 256)
    prompt = list(range(40, 40 + PROMPT_TOKENS))
    same = theirs_generate(theirs, prompt, NEW_TOKENS) == ours_generate(ours, prompt, NEW_TOKENS, 256, True)

    main_rows, raw = [], {"main": {}, "sweep": {}}
    for threads in threads_list:
        torch.set_num_threads(threads)
        seconds = take_turns({
            "transformers": lambda: theirs_generate(theirs, prompt, NEW_TOKENS),
            "ours_cache": lambda: ours_generate(ours, prompt, NEW_TOKENS, 256, True),
            "ours_no_cache": lambda: ours_generate(ours, prompt, NEW_TOKENS, 256, False),
        }, args.rounds)
        raw["main"][threads] = seconds
        speed = {name: tokens_per_s(s, NEW_TOKENS) for name, s in seconds.items()}
        main_rows.append((threads, speed, seconds))
        print(threads, {k: round(v, 1) for k, v in speed.items()}, flush=True)

    torch.set_num_threads(1)
    theirs_long, ours_long = make_models(work, SWEEP_WINDOW)
    del theirs_long
    decoders = sweep_decoders(ours_long, work)
    sweep_rows = []
    for context in SWEEP_CONTEXTS:
        long_prompt = [(7 * i) % 256 for i in range(context)]
        seconds = take_turns({name: (lambda d=decoder: decode_seconds(d, long_prompt))
                              for name, decoder in decoders.items()}, args.sweep_rounds, timed_by_call=True)
        raw["sweep"][context] = seconds
        speed = {n: tokens_per_s(s, SWEEP_NEW - 1) for n, s in seconds.items()}
        sweep_rows.append((context, speed, seconds))
        print(context, {n: round(v, 1) for n, v in speed.items()}, flush=True)

    # batched throughput on the mini model (256 window): its export, 1 thread
    from bigmodel_cli.engine.onnx.decoder import open_ort_decoder
    from bigmodel_cli.engine.onnx.export import export_artifact
    from bigmodel_cli.engine.decoders import CachedTorchDecoder
    from bigmodel_cli.artifact import open_artifact

    export_artifact(open_artifact(work / "ours-256"), work / "onnx-256", threads=1)
    section = open_artifact(work / "onnx-256").config["onnx"]["decoder"]
    batch_prompts = [[(11 * i + n) % 256 for i in range(n)] for n in BATCH_PROMPTS]
    batch_decoders = {"torch": CachedTorchDecoder(ours, 256, "cpu", "fp32", SHAPE["vocab_size"]),
                      "onnx": open_ort_decoder(work / "onnx-256", section, 256, SHAPE["vocab_size"], "cpu", 1)}
    batch_calls = {f"{backend}_batch{size}": (lambda d=decoder, size=size: len(BATCH_PROMPTS) * BATCH_NEW
                                              / batch_tokens_per_s(d, batch_prompts, size))
                   for backend, decoder in batch_decoders.items() for size in (1, len(BATCH_PROMPTS))}
    batch_seconds = take_turns(batch_calls, args.batch_rounds, timed_by_call=True)
    raw["batch"] = batch_seconds
    batch_speed = {n: tokens_per_s(s, len(BATCH_PROMPTS) * BATCH_NEW) for n, s in batch_seconds.items()}
    print(batch_speed, flush=True)
    busy = contention(before, cpu_snapshot(), info.get("cores"))

    def repeats(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    lines = [
        "## Decoding: KV cache vs transformers `generate` (`benchmarks/generate.py`)",
        "",
        f"Machine: {machine_line(info)}. {contention_line(busy)}",
        "",
        f"`mini` shape (6 layers, width 384, 6 heads, 256 vocabulary), random weights made as a transformers "
        f"GPT-2 and brought in with `bigmodel import`; greedy, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new "
        f"tokens; tokens/s = {NEW_TOKENS} / median wall time of the whole call, {args.rounds} interleaved repeats "
        f"after a warm-up. Same greedy tokens from both tools: **{'yes' if same else 'NO'}**.",
        "",
        "| threads | transformers (cache) tok/s | ours, cache tok/s | ours, no cache tok/s | ours cache ÷ transformers | cache ÷ no cache |",
        "|---|---|---|---|---|---|",
    ]
    for threads, speed, _ in main_rows:
        lines.append(f"| {threads} | {speed['transformers']:.1f} | {speed['ours_cache']:.1f} | {speed['ours_no_cache']:.1f} "
                     f"| **{speed['ours_cache'] / speed['transformers']:.2f}×** | {speed['ours_cache'] / speed['ours_no_cache']:.1f}× |")
    lines += ["", "Every repeat (seconds per call):", ""]
    for threads, _, seconds in main_rows:
        for name, values in seconds.items():
            lines.append(f"- {threads} thread(s), {name}: {repeats(values)}")
    lines += [
        "",
        f"Cost per token against the context (1 thread; a {SWEEP_WINDOW}-token window; {SWEEP_NEW} new tokens after "
        f"a prompt of the given length; decode tokens/s = the {SWEEP_NEW - 1} tokens after the first over their time, "
        f"median of {args.sweep_rounds} repeats; the prefill is left out). PyTorch, and ONNX Runtime on the same "
        "model exported (decoder.onnx with the cache kept in ORT; the cache-free model.onnx):",
        "",
        "| context | torch cache tok/s | torch no cache tok/s | torch cache ÷ no cache "
        "| ORT cache tok/s | ORT no cache tok/s | ORT cache ÷ no cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for context, s, _ in sweep_rows:
        lines.append(f"| {context} | {s['torch_cache']:.1f} | {s['torch_no_cache']:.1f} "
                     f"| {s['torch_cache'] / s['torch_no_cache']:.1f}× | {s['ort_cache']:.1f} | {s['ort_no_cache']:.1f} "
                     f"| {s['ort_cache'] / s['ort_no_cache']:.1f}× |")
    lines += ["", "Every repeat (decode seconds):", ""]
    for context, _, seconds in sweep_rows:
        for name, values in seconds.items():
            lines.append(f"- context {context}, {name}: {repeats(values)}")
    size = len(BATCH_PROMPTS)
    lines += [
        "",
        f"Batched throughput (1 thread, the `mini` model above; {size} prompts of {', '.join(map(str, BATCH_PROMPTS))} "
        f"tokens, {BATCH_NEW} new tokens each, greedy, with the cache; tokens/s = all {size * BATCH_NEW} new tokens over "
        f"the wall time, median of {args.batch_rounds} interleaved repeats): batch 1 decodes the prompts one after "
        f"another, batch {size} together, left-padded with an attention mask.",
        "",
        f"| backend | batch 1 tok/s | batch {size} tok/s | batch {size} ÷ batch 1 |",
        "|---|---|---|---|",
    ]
    for backend in ("torch", "onnx"):
        one, many = batch_speed[f"{backend}_batch1"], batch_speed[f"{backend}_batch{size}"]
        lines.append(f"| {'PyTorch' if backend == 'torch' else 'ONNX Runtime'} | {one:.1f} | {many:.1f} | {many / one:.2f}× |")
    lines += ["", "Every repeat (seconds for all the prompts):", ""]
    for name, values in batch_seconds.items():
        lines.append(f"- {name}: {repeats(values)}")
    worst = min(speed["ours_cache"] / speed["transformers"] for _, speed, _ in main_rows)
    lines += ["", f"Target ours (cache) ≥ {TARGET:.1f}× transformers: **{'met' if worst >= TARGET else 'not met'}** "
              f"(worst {worst:.2f}×)."]
    write_section("generate", "\n".join(lines), {"machine": info, "contention": busy, "same_tokens": same, "raw": raw})


if __name__ == "__main__":
    main()
