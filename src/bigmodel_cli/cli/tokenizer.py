"""bigmodel tokenizer train: a BPE tokenizer for `train --tokenizer DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import console
from .options import JsonOpt

app = typer.Typer(help="Tokenizers for language models (train one on your corpus).", no_args_is_help=True)


@app.command("train")
def train(
    data: Annotated[str, typer.Argument(help="text:PATH (a file or a folder of text) or text:stdlib.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Tokens, including the 256 bytes and <|endoftext|> (at least 257).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Tokenizer directory to write (tokenizer.json + bigmodel-tokenizer.json).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if bigmodel wrote it.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a byte-level BPE (GPT-2's scheme: any text encodes) on a corpus, streamed."""
    from ..engine.training.tokenizer import train_tokenizer

    result = train_tokenizer(data, vocab_size, out, overwrite)
    if json_out:
        console.print_json(result)
        return
    console.out.print(console.key_value_table("bigmodel tokenizer train", [
        ("tokenizer", result["out"]), ("vocabulary", f"{result['vocab_size']:,}"),
        ("end of text", result["eos_token"]), ("corpus", f"{result['files']:,} files, {result['corpus_bytes']:,} bytes"),
    ]))
