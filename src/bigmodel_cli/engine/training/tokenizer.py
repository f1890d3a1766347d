"""``bigmodel tokenizer train``: a byte-level BPE trained on the user's corpus, written as a
tokenizer directory (tokenizer.json + its description) that ``train --tokenizer DIR`` reads."""

from __future__ import annotations

from pathlib import Path

from ... import artifact as art
from ...data import parse_data_arg
from ...data.text import corpus_files
from ...data.tokenizer import TOKENIZER_FILE, TOKENIZER_INFO_FILE, check_bpe_vocab, info_json, train_bpe
from ...errors import UserError


def train_tokenizer(data_arg: str, vocab_size: int, out: Path | str, overwrite: bool = False) -> dict:
    """Train on ``text:PATH`` (or ``text:stdlib``) and write ``out`` atomically; a summary dict."""
    check_bpe_vocab(vocab_size)  # before reading anything
    spec = parse_data_arg(data_arg)
    if spec["name"] != "text":
        raise UserError(f"{data_arg} is not text; a tokenizer is trained on text:PATH (a file or a folder) or text:stdlib")
    files = corpus_files(spec["path"])
    inputs = [] if spec["path"] == "stdlib" else [spec["path"]]
    art.check_output(out, overwrite, inputs)  # a mistake costs nothing
    if not any(f.stat().st_size for f in files):
        raise UserError(f"{data_arg}: holds no text; give a non-empty file or folder")
    tokenizer, section = train_bpe(files, vocab_size)
    data = tokenizer.to_str().encode("utf-8")
    with art.atomic_directory(out, overwrite, inputs) as staging:
        (staging / TOKENIZER_FILE).write_bytes(data)
        (staging / TOKENIZER_INFO_FILE).write_text(info_json(section, data), encoding="utf-8")
    return {"out": str(Path(out)), "vocab_size": section["vocab_size"], "requested_vocab_size": vocab_size,
            "eos_token": section["eos_token"], "files": len(files), "corpus_bytes": sum(f.stat().st_size for f in files)}
