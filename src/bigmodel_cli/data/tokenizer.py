"""Tokenizers for language models: the artifact's ``tokenizer.json``, or bytes.

An artifact that has a tokenizer holds ``tokenizer.json`` (the Hugging Face ``tokenizers`` JSON
format) and a ``"tokenizer"`` section in config.json (see ``tokenizer_section``). Without that
section a language model is byte-level: ids are the 256 byte values, as bigmodel always did.

The file is only ever parsed from bytes the caller has read and verified (``tokenizer_from_bytes``):
never from a path, and never with pickle. ``train_bpe`` trains a byte-level BPE on the user's
corpus, fed by an iterator so that memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..input_file import read_capped

TOKENIZER_FILE = "tokenizer.json"
# A tokenizer directory written by `bigmodel tokenizer train`: tokenizer.json plus this, which holds
# the config.json section (special tokens, sizes) and tokenizer.json's sha256.
TOKENIZER_INFO_FILE = "bigmodel-tokenizer.json"
INFO_FORMAT = "bigmodel-tokenizer"
BYTE_VOCAB = 256
# Llama 3's tokenizer.json is ~9 MB and Qwen2's ~7 MB; a cap keeps a hostile one (or /dev/zero)
# from being read into memory.
MAX_TOKENIZER_BYTES = 64 << 20
MAX_INFO_BYTES = 1 << 20
# --vocab-size bounds: every byte plus one end-of-text token at least; beyond a million entries
# the embedding alone dwarfs any model this is for (Llama 3 has 128,256).
MIN_BPE_VOCAB = BYTE_VOCAB + 1
MAX_BPE_VOCAB = 1_000_000
END_OF_TEXT = "<|endoftext|>"
SECTION_KEYS = ("file", "vocab_size", "bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token",
                "chat_template")


class ByteTokenizer:
    """Bytes 0..255 as ids: what every artifact without a tokenizer section uses."""

    vocab_size = BYTE_VOCAB
    eos_id = None
    bos_id = None
    sha256 = None
    is_byte_level = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_plain(self, text: str) -> list[int]:
        """Bytes have no BOS: the same ids as encode (HFTokenizer's interface)."""
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")

    def byte_count(self, ids) -> int:
        """UTF-8 bytes of the text ``ids`` stand for (bits per byte divides by it)."""
        return len(ids)

    def segments(self, ids: list[int]) -> list[str]:
        """Each id's own text, for showing tokens one by one."""
        return [bytes([int(i)]).decode("utf-8", errors="replace") for i in ids]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind ByteTokenizer's interface, with its config section."""

    is_byte_level = False

    def __init__(self, tokenizer, section: dict, sha256: str):
        self.tokenizer = tokenizer
        self.section = section
        self.sha256 = sha256
        self.vocab_size = int(section["vocab_size"])
        self.eos_id = self._id(section.get("eos_token"))
        self.bos_id = self._id(section.get("bos_token"))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.section.get("add_bos_token") and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` alone (no BOS): a corpus chunk in the middle of a document."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def byte_count(self, ids) -> int:
        table = self._byte_lengths()
        if table is not None:
            return sum(table[int(i)] if 0 <= int(i) < len(table) else 0 for i in ids)
        # Special tokens (end of text) stand for no text of the corpus.
        return len(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).encode("utf-8"))

    def _byte_lengths(self) -> list[int] | None:
        """Bytes each id stands for, when the tokenizer is byte-level (GPT-2's scheme: one character
        of a token per byte), else None. Exact even where a window cuts a multi-byte character,
        which decoding the window would turn into a 3-byte replacement character."""
        if not hasattr(self, "_lengths"):
            self._lengths = byte_level_lengths(self.tokenizer)
        return self._lengths

    def segments(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte, inverted (char → byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def byte_level_lengths(tokenizer) -> list[int] | None:
    """Bytes of text per id for a tokenizer whose decoder is ByteLevel (special tokens: 0), else None."""
    if type(tokenizer.decoder).__name__ != "ByteLevel":
        return None
    alphabet = gpt2_byte_chars()
    lengths = [0] * tokenizer.get_vocab_size(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if index >= len(lengths):
            continue
        if index in added:  # special tokens stand for no text; other added tokens for their own
            lengths[index] = 0 if added[index].special else len(added[index].content.encode("utf-8"))
        elif all(ch in alphabet for ch in token):
            lengths[index] = len(token)
        else:
            return None  # not GPT-2's alphabet after all: count by decoding
    return lengths


def _problem(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what}")


def section_problems(section: Any) -> list[str]:
    """What is wrong with a config.json "tokenizer" section (empty when nothing is)."""
    if not isinstance(section, dict):
        return ['"tokenizer" must be an object']
    problems = []
    if section.get("file") != TOKENIZER_FILE:
        problems.append(f'"tokenizer.file" must be "{TOKENIZER_FILE}"')
    size = section.get("vocab_size")
    if not (isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_BPE_VOCAB):
        problems.append(f'"tokenizer.vocab_size" must be an integer from 1 to {MAX_BPE_VOCAB:,}')
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        if not isinstance(section.get(key), (str, type(None))):
            problems.append(f'"tokenizer.{key}" must be a string or null')
    if not isinstance(section.get("add_bos_token", False), bool):
        problems.append('"tokenizer.add_bos_token" must be true or false')
    return problems


def tokenizer_section(tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                      pad_token: str | None = None, unk_token: str | None = None, add_bos_token: bool = False,
                      chat_template: str | None = None) -> dict:
    """The config.json "tokenizer" section for a ``tokenizers.Tokenizer`` (its size counts added tokens)."""
    return {"file": TOKENIZER_FILE, "vocab_size": int(tokenizer.get_vocab_size(with_added_tokens=True)),
            "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token,
            "add_bos_token": bool(add_bos_token), "chat_template": chat_template}


def tokenizer_from_bytes(data: bytes, section: dict, where: str) -> HFTokenizer:
    """Parse verified tokenizer.json bytes; the section must agree with what they hold."""
    from tokenizers import Tokenizer

    problems = section_problems(section)
    if problems:
        raise _problem(where, "; ".join(problems) + "; re-create it")
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _problem(where, f"{TOKENIZER_FILE} is not UTF-8 text; re-create the tokenizer") from None
    except Exception as exc:  # the library's own parse error (its type is not public)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _problem(where, f"{TOKENIZER_FILE} is not a valid tokenizer ({first}); re-create the tokenizer") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != section["vocab_size"]:
        raise _problem(where, f"{TOKENIZER_FILE} has {size:,} tokens but its description says "
                              f"{section['vocab_size']:,}; re-create the tokenizer")
    for key in ("bos_token", "eos_token"):
        token = section.get(key)
        if token is not None and tokenizer.token_to_id(token) is None:
            raise _problem(where, f"{key} {token!r} is not in {TOKENIZER_FILE}; re-create the tokenizer")
    return HFTokenizer(tokenizer, section, hashlib.sha256(data).hexdigest())


def load_tokenizer(config: dict, file_bytes=None, where: str = "the artifact"):
    """The tokenizer a config.json asks for: ByteTokenizer without a "tokenizer" section, else the
    tokenizer.json whose verified bytes ``file_bytes(name)`` returns."""
    section = config.get("tokenizer")
    if section is None:
        return ByteTokenizer()
    if file_bytes is None:
        raise _problem(where, f"config.json names a tokenizer but no verified {TOKENIZER_FILE} was given")
    return tokenizer_from_bytes(file_bytes(TOKENIZER_FILE), section, where)


def open_tokenizer_dir(directory: Path | str) -> tuple[HFTokenizer, bytes]:
    """A tokenizer directory (``--tokenizer DIR``): its tokenizer and tokenizer.json's bytes.

    A directory written by ``bigmodel tokenizer train`` carries a description whose sha256 must match;
    a directory with only tokenizer.json (a Hugging Face checkpoint's) is described from the file."""
    directory = Path(directory)
    fix = "give a directory written by `bigmodel tokenizer train` (or one holding a tokenizer.json)"
    if not directory.is_dir():
        raise UserError(f"--tokenizer {directory}: no such directory; {fix}")
    try:
        data = read_capped(directory / TOKENIZER_FILE, MAX_TOKENIZER_BYTES, fix)
    except FileNotFoundError:
        raise UserError(f"--tokenizer {directory}: has no {TOKENIZER_FILE}; {fix}") from None
    where = f"--tokenizer {directory}"
    try:
        info_bytes = read_capped(directory / TOKENIZER_INFO_FILE, MAX_INFO_BYTES, fix)
    except FileNotFoundError:
        info_bytes = None
    if info_bytes is None:
        return _described_from_file(data, where), data
    try:
        info = json.loads(info_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{where}: {TOKENIZER_INFO_FILE} is not valid JSON; re-create the tokenizer") from None
    if not isinstance(info, dict) or info.get("format") != INFO_FORMAT or not isinstance(info.get("tokenizer"), dict):
        raise UserError(f"{where}: {TOKENIZER_INFO_FILE} is not a bigmodel tokenizer description; re-create the tokenizer")
    if info.get("sha256") != hashlib.sha256(data).hexdigest():
        raise UserError(f"{where}: {TOKENIZER_FILE} does not match the sha256 in {TOKENIZER_INFO_FILE} (corrupt, "
                        "truncated or edited); re-create the tokenizer")
    return tokenizer_from_bytes(data, info["tokenizer"], where), data


def _described_from_file(data: bytes, where: str) -> HFTokenizer:
    """A bare tokenizer.json: the section guessed from its added tokens (an end-of-text token is EOS)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # not UTF-8, not JSON, or not a tokenizer
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: {TOKENIZER_FILE} is not a valid tokenizer ({first}); re-create the tokenizer") from None
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    eos = next((t for t in added if t in (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>")), None)
    bos = next((t for t in added if t in ("<s>", "<|begin_of_text|>", "<bos>")), None)
    return tokenizer_from_bytes(data, tokenizer_section(tokenizer, eos_token=eos, bos_token=bos), where)


def check_bpe_vocab(vocab_size: int) -> None:
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise UserError(f"--vocab-size must be between {MIN_BPE_VOCAB} (every byte plus an end-of-text token) and "
                        f"{MAX_BPE_VOCAB:,}, got {vocab_size}")


def text_chunks(files: list[Path], chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, str]]:
    """(file index, text) pieces of about ``chunk_bytes``, cut after a line break so that no word and
    no UTF-8 character is split; memory stays at one chunk whatever the corpus size."""
    for index, path in enumerate(files):
        with open(path, "rb") as handle:
            rest = b""
            while True:
                block = handle.read(chunk_bytes)
                if not block:
                    break
                block = rest + block
                cut = block.rfind(b"\n") + 1
                if cut == 0 and len(block) < 4 * chunk_bytes:  # a very long line: read on, up to a bound
                    rest = block
                    continue
                cut = cut or len(block)
                rest = block[cut:]
                yield index, block[:cut].decode("utf-8", errors="replace")
            if rest:
                yield index, rest.decode("utf-8", errors="replace")


def train_bpe(files: list[Path], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (GPT-2's scheme: every byte is a token, so any text encodes) trained on
    ``files``, streamed; returns (tokenizers.Tokenizer, its config section)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((text for _, text in text_chunks(files)), trainer=trainer)
    return tokenizer, tokenizer_section(tokenizer, eos_token=END_OF_TEXT)


def info_json(section: dict, data: bytes) -> str:
    """The description written beside tokenizer.json in a tokenizer directory."""
    return json.dumps({"format": INFO_FORMAT, "tokenizer": section, "sha256": hashlib.sha256(data).hexdigest()},
                      indent=2) + "\n"
