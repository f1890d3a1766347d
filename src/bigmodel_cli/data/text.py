"""Language-modelling data: ``text:PATH`` (a file or a folder) and ``text:stdlib``.

Without a tokenizer the vocabulary is the 256 byte values: files are memory-mapped and read window
by window, so a corpus larger than RAM trains. With a tokenizer (data/tokenizer.py) the corpus is
tokenized once, streamed chunk by chunk, into a cached token file (``token_file``) that is then
memory-mapped the same way; positions, windows and splits are then counted in tokens. The corpus is one virtual stream (the
files in sorted order); train/val/test are contiguous ranges of it, split by position.
``text:stdlib`` is the running Python's own standard library source: real text that every machine
with Python already has.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import sysconfig
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import UserError

VOCAB_SIZE = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
_MAX_OPEN_MAPS = 64


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def corpus_files(path: str) -> list[Path]:
    if path == "stdlib":
        return stdlib_files()
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        return sorted((p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")), key=lambda p: p.as_posix())
    raise UserError(f"text:{path}: no such file or folder; give a text file or a folder of text files")


class ByteCorpus:
    """Many files seen as one byte stream; windows are read through lazily opened memory maps."""

    def __init__(self, files: list[Path]):
        self.files = [f for f in files if f.stat().st_size > 0]
        self.offsets = [0]
        for f in self.files:
            self.offsets.append(self.offsets[-1] + f.stat().st_size)
        self._maps: OrderedDict[int, mmap.mmap] = OrderedDict()

    def __len__(self) -> int:
        return self.offsets[-1]

    def _map(self, i: int) -> mmap.mmap:
        if i in self._maps:
            self._maps.move_to_end(i)
        else:
            with open(self.files[i], "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_RANDOM"):
                mapped.madvise(mmap.MADV_RANDOM)  # windows are random: reading ahead is waste
            self._maps[i] = mapped
            if len(self._maps) > _MAX_OPEN_MAPS:
                self._maps.popitem(last=False)[1].close()
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        filled = 0
        while filled < length:
            pos = start + filled
            i = bisect.bisect_right(self.offsets, pos) - 1
            local = pos - self.offsets[i]
            take = min(length - filled, self.offsets[i + 1] - pos)
            mapped = self._map(i)
            out[filled:filled + take] = np.frombuffer(mapped, dtype=np.uint8, count=take, offset=local)
            # Unmap the pages just read from this process (the page cache keeps them): otherwise
            # every window ever read stays resident, and the process grows towards the corpus size.
            if hasattr(mmap, "MADV_DONTNEED"):
                begin = local - local % mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, begin, local + take - begin)
            filled += take
        return out


# Where tokenized corpora are cached (see token_file): $BIGMODEL_CACHE_DIR, else the user's cache.
CACHE_ENV = "BIGMODEL_CACHE_DIR"
_HASH_BLOCK = 1 << 20
# Token ids are checked against the vocabulary this many at a time when a cached file is opened.
_CHECK_TOKENS = 1 << 24


def cache_dir() -> Path:
    """The token cache: $BIGMODEL_CACHE_DIR/tokens, else $XDG_CACHE_HOME (or ~/.cache)/bigmodel/tokens."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bigmodel" / "tokens"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def corpus_key(files: list[Path], tokenizer_sha256: str) -> str:
    """sha256 over the tokenizer's hash and every file's whole content, in order: any change to the
    corpus or the tokenizer names a different cache file."""
    digest = hashlib.sha256(f"bigmodel-tokens-v1\0{tokenizer_sha256}\0".encode())
    for file in files:
        content = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                content.update(block)
        digest.update(f"{file.stat().st_size}\0{content.hexdigest()}\0".encode())
    return digest.hexdigest()


class TokenCorpus:
    """A cached token file, memory-mapped; ``read`` matches ByteCorpus's."""

    def __init__(self, path: Path, dtype):
        self.path = path
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return np.array(self.tokens[start:start + length])


def _write_tokens(files: list[Path], tokenizer, target: Path, dtype) -> None:
    """Tokenize ``files`` chunk by chunk into ``target`` (through a hidden temporary file renamed
    into place, so a crash never leaves a cache file that looks complete). Each file ends with the
    end-of-text token when the tokenizer has one, so documents are not run together."""
    from ..output_file import atomic_path
    from .tokenizer import text_chunks

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as partial, open(partial, "wb") as out:
        last = None
        for index, text in text_chunks(files):
            if last is not None and index != last and tokenizer.eos_id is not None:
                np.array([tokenizer.eos_id], dtype=dtype).tofile(out)
            last = index
            np.asarray(tokenizer.encode_plain(text), dtype=dtype).tofile(out)
        if last is not None and tokenizer.eos_id is not None:
            np.array([tokenizer.eos_id], dtype=dtype).tofile(out)


def token_file(files: list[Path], tokenizer) -> Path:
    """The cached token file of ``files`` under ``tokenizer``, written on first use.

    Named by ``corpus_key``, so a changed corpus or tokenizer misses the cache and is tokenized
    afresh; bigmodel deletes nothing there (old entries are left for the user to clear)."""
    dtype = token_dtype(tokenizer.vocab_size)
    target = cache_dir() / f"{corpus_key(files, tokenizer.sha256)}.{np.dtype(dtype).name}"
    if not target.is_file():
        try:
            _write_tokens(files, tokenizer, target, dtype)
        except OSError as exc:
            raise UserError(f"{target.parent}: cannot write the token cache ({exc.strerror}); set "
                            f"{CACHE_ENV} to a writable directory") from None
    return target


def _check_ids(corpus: TokenCorpus, vocab_size: int) -> None:
    """A cache file is outside the artifact: an id beyond the vocabulary (an edited or foreign
    file) would index past the embedding, so every id is checked when it is opened."""
    tokens = corpus.tokens
    if len(tokens) * tokens.itemsize != corpus.path.stat().st_size:
        raise UserError(f"{corpus.path}: is not a whole number of tokens; delete it to re-tokenize")
    for start in range(0, len(tokens), _CHECK_TOKENS):
        if int(tokens[start:start + _CHECK_TOKENS].max()) >= vocab_size:
            raise UserError(f"{corpus.path}: holds token ids beyond the tokenizer's {vocab_size:,}; delete it to re-tokenize")


class TextData:
    task = "language-modeling"

    def __init__(self, spec: dict, tokenizer=None):
        self.spec = spec
        files = corpus_files(spec["path"])
        byte_corpus = ByteCorpus(files)
        self.tokenizer = tokenizer if tokenizer is not None and not tokenizer.is_byte_level else None
        self.unit = "bytes" if self.tokenizer is None else "tokens"
        self.vocab_size = VOCAB_SIZE if self.tokenizer is None else self.tokenizer.vocab_size
        if len(byte_corpus) < 64:
            raise UserError(f"text:{spec['path']}: the corpus has {len(byte_corpus)} bytes; give at least a few kilobytes of text")
        if self.tokenizer is None:
            self.corpus = byte_corpus
        else:
            dtype = token_dtype(self.vocab_size)
            self.corpus = TokenCorpus(token_file(byte_corpus.files, self.tokenizer), dtype)
            _check_ids(self.corpus, self.vocab_size)
        total = len(self.corpus)
        split = spec.get("split") or {}
        n_val, n_test = int(total * split.get("val", 0.05)), int(total * split.get("test", 0.05))
        n_train = total - n_val - n_test
        self.ranges = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, total)}
        spec.update({"vocab_size": self.vocab_size, "bytes": len(byte_corpus), "files": len(byte_corpus.files)})
        if self.tokenizer is not None:
            spec.update({"tokens": total, "tokenizer_sha256": self.tokenizer.sha256})
        if spec["path"] == "stdlib":
            spec["python"] = sysconfig.get_python_version()

    def model_fit(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def byte_count(self, targets: np.ndarray) -> int:
        """UTF-8 bytes of the text that evaluated target ids stand for (one per id when byte-level)."""
        if self.tokenizer is None:
            return int(targets.size)
        return sum(self.tokenizer.byte_count(row) for row in np.asarray(targets).reshape(-1, targets.shape[-1]))

    def split_size(self, split: str) -> int:
        start, end = self.ranges[split]
        return end - start

    def check_block(self, block_size: int) -> None:
        for split in ("train", "val"):
            if self.split_size(split) < block_size + 1:
                raise UserError(
                    f"the {split} split has {self.split_size(split)} {self.unit}, fewer than one window of "
                    f"{block_size + 1}; use a larger corpus or a smaller --block-size"
                )

    def window_starts(self, split: str, count: int, block_size: int, generator) -> np.ndarray:
        """``count`` random window starts inside ``split``, drawn from a torch generator."""
        import torch

        start, end = self.ranges[split]
        high = end - start - block_size - 1
        return (start + torch.randint(0, high + 1, (count,), generator=generator)).numpy()

    def windows(self, starts, block_size: int):
        """(inputs, targets) int64 tensors of shape (len(starts), block_size)."""
        import torch

        data = np.stack([self.corpus.read(int(s), block_size + 1) for s in starts]).astype(np.int64)
        data = torch.from_numpy(data)
        return data[:, :-1], data[:, 1:]

    def eval_starts(self, split: str, block_size: int, max_windows: int) -> list[int]:
        """Non-overlapping windows from the start of ``split``: the same every time."""
        start, end = self.ranges[split]
        return list(range(start, end - block_size - 1, block_size + 1)[:max_windows])  # range slices lazily


def load_text(spec: dict, tokenizer=None) -> TextData:
    return TextData(spec, tokenizer)
