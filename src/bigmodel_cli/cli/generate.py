"""bigmodel generate: text from a byte-level language model (engine.generate)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import console
from .options import ArtifactArg, BackendOpt, JsonOpt, ThreadsOpt


def generate(
    artifact: ArtifactArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Bytes to generate.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k most likely tokens (0: all).")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed: the same seed gives the same text.")] = 0,
    backend: BackendOpt = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Continue a prompt with a language-model artifact (PyTorch or ONNX); the text goes to stdout."""
    from ..artifact import open_artifact
    from ..engine.generate import GenerateConfig, generate_text
    from .progress import CountProgress

    cfg = GenerateConfig(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         seed=seed, backend=backend, device=device, threads=threads)
    source = open_artifact(artifact)
    with CountProgress("generate", total=max_new_tokens) as progress:
        result = generate_text(source, cfg, progress=progress)
    if json_out:
        console.print_json(result)
        return
    where = result["backend"] + (f" ({result['provider']})" if "provider" in result else "")
    note = " · prompt cropped to the model's context" if result["prompt_cropped"] else ""
    console.note(f"{result['new_tokens']} tokens in {result['seconds']:.2f} s ({result['tokens_per_s']:.1f}/s) on {where}{note}")
    # Plain print: generated text must not be read as rich markup.
    print(result["prompt"] + result["text"])
