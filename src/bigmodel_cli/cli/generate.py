"""bigmodel generate: text from a language model (engine.generate), streamed to stdout as it comes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, BackendOpt, JsonOpt, RepetitionPenaltyOpt, TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt

INTERRUPTED = 130  # the shell's code for a Ctrl-C


def generate(
    artifact: ArtifactArg,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to continue.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(
        "--prompts-file", help='Several prompts, decoded together: JSON Lines, {"prompt": "..."} on each line '
        '(optionally "seed": N). Each is printed when it is complete; --json gives a list.')] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="With --prompts-file: prompts decoded together "
                                            "(left-padded with an attention mask).")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 200,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="End the text before this string "
                                                      "(repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed: the same seed gives the same text.")] = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole context for every token "
                                           "(PyTorch; ONNX Runtime always does).")] = False,
    no_truncate: Annotated[bool, typer.Option("--no-truncate", help="Refuse a prompt plus new tokens longer than "
                                              "the model's window instead of sliding it.")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text once, at the end (for scripts).")] = False,
    backend: BackendOpt = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Continue a prompt (or each of a --prompts-file's) with a language-model artifact (PyTorch or
    ONNX); the text goes to stdout as it is generated, timings to stderr. Ctrl-C stops it, keeps what
    was generated, and exits 130."""
    from ..artifact import open_artifact
    from ..engine.generate import GenerateConfig, generate_text
    from ..engine.prompts_file import read_prompts_file
    from ..errors import UserError

    if (prompt is None) == (prompts_file is None):
        raise UserError("give either --prompt TEXT or --prompts-file FILE (one JSON object per line), "
                        f"{'not both' if prompt is not None else 'one of them'}")
    cfg = GenerateConfig(prompt=prompt or "", max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, repetition_penalty=repetition_penalty, stop=tuple(stop or ()),
                         use_cache=not no_cache, truncate=not no_truncate, seed=seed, backend=backend, device=device,
                         threads=threads, batch_size=batch_size)
    if prompts_file is not None:
        prompts = read_prompts_file(prompts_file)
        generate_many(open_artifact(artifact), cfg, prompts, json_out, no_stream)
        return
    source = open_artifact(artifact)
    if json_out or no_stream:
        result = generate_quietly(source, cfg)
    else:
        out = StreamedText(prompt)
        result = generate_text(source, cfg, on_text=out.write)
        out.finish()
    if json_out:
        console.print_json(result)
    else:
        if no_stream:
            print(result["prompt"] + result["text"])
        console.note(summary(result))
    if result["interrupted"]:
        console.error(f"interrupted after {result['new_tokens']} tokens; the text above is what was generated")
        raise typer.Exit(INTERRUPTED)


class StreamedText:
    """The prompt, then each piece of text as it comes, then a newline, on stdout. The prompt waits
    for the first piece, so a command refused before any work (exit 2) writes nothing to stdout.
    Plain writes, not rich: generated text must not be read as markup."""

    def __init__(self, prompt: str):
        self.pending = prompt

    def write(self, chunk: str) -> None:
        sys.stdout.write(self.pending + chunk)
        sys.stdout.flush()
        self.pending = ""

    def finish(self) -> None:
        self.write("\n")


def generate_many(source, cfg, prompts, json_out: bool, no_stream: bool) -> None:
    """--prompts-file: the batches' results, each prompt with its text, in the file's order.

    Rows of a batch advance together, so streaming them token by token would interleave several
    texts on one terminal; instead each prompt's text is printed whole as soon as it is complete
    (and every prompt before it is), a blank line between prompts. --json gives a list, one object
    per prompt."""
    from ..engine.generate import generate_batch
    from .progress import CountProgress

    out = None if json_out or no_stream else OrderedTexts()
    # the bar only while nothing is printed (it would be drawn across the texts)
    batches = -(-len(prompts) // max(cfg.batch_size, 1))  # a bad --batch-size is refused by the engine
    with CountProgress("generate", total=cfg.max_new_tokens * batches,
                       enabled=out is None) as progress:
        result = generate_batch(source, cfg, prompts, progress=progress, on_done=out.done if out else None)
    if json_out:
        console.print_json(result["results"])
    else:
        if no_stream:
            OrderedTexts().print_all(result["results"])
        console.note(batch_summary(result))
    if result["interrupted"]:
        console.error(f"interrupted after {result['new_tokens']} tokens; the texts above are what was generated")
        raise typer.Exit(INTERRUPTED)


class OrderedTexts:
    """Each prompt + its text on stdout once it and every prompt before it are complete (plain
    writes: generated text must not be read as markup)."""

    def __init__(self):
        self.waiting: dict[int, str] = {}
        self.next = 0

    def done(self, index: int, result: dict) -> None:
        self.waiting[index] = result["prompt"] + result["text"]
        while self.next in self.waiting:
            sys.stdout.write(("\n" if self.next else "") + self.waiting.pop(self.next) + "\n")
            sys.stdout.flush()
            self.next += 1

    def print_all(self, results: list[dict]) -> None:
        for result in results:
            self.done(result["index"], result)


def batch_summary(result: dict) -> str:
    """One stderr line for a --prompts-file run: prompts, tokens, batch throughput, where, the cache."""
    where = result["backend"] + (f" ({result['provider']})" if "provider" in result else "")
    parts = [f"{len(result['results'])} prompts, {result['new_tokens']} tokens in {result['seconds']:.2f} s on {where}",
             f"batches of up to {result['batch_size']}"]
    if result["tokens_per_s"]:
        parts.append(f"{result['tokens_per_s']:.1f} tok/s over the batch")
    parts.append(f"KV cache {result['cache_bytes'] / 2**20:.2f} MiB" if result["cache"] else "no KV cache")
    return " · ".join(parts)


def generate_quietly(source, cfg) -> dict:
    """The whole text at once, with a progress bar on stderr meanwhile."""
    from ..engine.generate import generate_text
    from .progress import CountProgress

    with CountProgress("generate", total=cfg.max_new_tokens) as progress:
        return generate_text(source, cfg, progress=progress)


def summary(result: dict) -> str:
    """One stderr line: how many tokens, how fast (prefill, first token, decode), where, the cache."""
    where = result["backend"] + (f" ({result['provider']})" if "provider" in result else "")
    parts = [f"{result['new_tokens']} tokens in {result['seconds']:.2f} s on {where}"]
    if result["prefill_tokens_per_s"]:
        parts.append(f"prefill {result['prefill_tokens_per_s']:.0f} tok/s")
    if result["time_to_first_token_s"] is not None:
        parts.append(f"first token {result['time_to_first_token_s'] * 1000:.0f} ms")
    if result["decode_tokens_per_s"]:
        parts.append(f"decode {result['decode_tokens_per_s']:.1f} tok/s")
    parts.append(f"KV cache {result['cache_bytes'] / 2**20:.2f} MiB" if result["cache"] else "no KV cache")
    if result["stopped"]:
        parts.append("stopped at a --stop string")
    if result["prompt_cropped"]:
        parts.append("prompt cropped to the model's context")
    return " · ".join(parts)
