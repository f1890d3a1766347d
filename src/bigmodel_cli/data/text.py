"""Byte-level language-modelling data: ``text:PATH`` (a file or a folder) and ``text:stdlib``.

The vocabulary is the 256 byte values, so no tokenizer is downloaded. Files are memory-mapped and
read window by window, so a corpus larger than RAM trains. The corpus is one virtual stream (the
files in sorted order); train/val/test are contiguous ranges of it, split by position.
``text:stdlib`` is the running Python's own standard library source: real text that every machine
with Python already has.
"""

from __future__ import annotations

import bisect
import mmap
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


class TextData:
    task = "language-modeling"

    def __init__(self, spec: dict):
        self.spec = spec
        files = corpus_files(spec["path"])
        self.corpus = ByteCorpus(files)
        total = len(self.corpus)
        if total < 64:
            raise UserError(f"text:{spec['path']}: the corpus has {total} bytes; give at least a few kilobytes of text")
        split = spec.get("split") or {}
        n_val, n_test = int(total * split.get("val", 0.05)), int(total * split.get("test", 0.05))
        n_train = total - n_val - n_test
        self.ranges = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, total)}
        spec.update({"vocab_size": VOCAB_SIZE, "bytes": total, "files": len(self.corpus.files)})
        if spec["path"] == "stdlib":
            spec["python"] = sysconfig.get_python_version()

    def model_fit(self) -> dict:
        return {"vocab_size": VOCAB_SIZE}

    def split_size(self, split: str) -> int:
        start, end = self.ranges[split]
        return end - start

    def check_block(self, block_size: int) -> None:
        for split in ("train", "val"):
            if self.split_size(split) < block_size + 1:
                raise UserError(
                    f"the {split} split has {self.split_size(split)} bytes, fewer than one window of "
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


def load_text(spec: dict) -> TextData:
    return TextData(spec)
