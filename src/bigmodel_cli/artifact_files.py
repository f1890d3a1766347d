"""Reading an artifact's files without trusting them: only regular files, size-capped, listed in
the manifest and matching its sha256; ONNX weights only from the listed ``model.onnx.data``
(``decoder.onnx.data`` for ``decoder.onnx``).

``artifact.py`` re-exports these names; import them from there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from .artifact_format import CONFIG_FILE, DECODER_FILE, MANIFEST_FILE, ONNX_FILE, PRIVATE_PREFIX, validate_manifest
from .errors import UserError
from .input_file import open_regular, read_capped


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of an artifact's file, if it is a regular file of at most ``limit`` bytes.
    Raises FileNotFoundError when there is nothing there; UserError for anything else."""
    return read_capped(path, limit, "re-create the artifact")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _artifact_entries(path: Path) -> Iterator[str]:
    """Every entry under ``path`` but directories, the manifest and bigmodel's own private
    (``.bigmodel*``) entries, as posix names relative to ``path``. Symlinks are not followed."""
    for dirpath, dirs, files in os.walk(path):  # symlinked directories are listed, not entered
        root = Path(dirpath)
        dirs[:] = [d for d in dirs if not d.startswith(PRIVATE_PREFIX)]
        for name in files + [d for d in dirs if (root / d).is_symlink()]:
            relative = (root / name).relative_to(path).as_posix()
            if relative != MANIFEST_FILE and not name.startswith(PRIVATE_PREFIX):
                yield relative


def _hash_listed_file(target: Path, entry: dict) -> str | None:
    """sha256 of a listed file, or None when it is not a regular file of the listed size (checked
    on the open descriptor before anything is read)."""
    try:
        handle = open_regular(target)
    except OSError:
        return None
    if handle is None:
        return None
    with handle:
        if os.fstat(handle.fileno()).st_size != entry["bytes"]:
            return None
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(path: Path, manifest: dict) -> None:
    """Every file of the artifact is listed in the manifest, is a regular file, and matches its
    size and sha256; and ONNX weights come only from the listed model.onnx.data."""
    validate_manifest(manifest, path)
    files = manifest["files"]
    if CONFIG_FILE not in files:
        raise UserError(f"{path / MANIFEST_FILE}: does not list {CONFIG_FILE}, so it cannot be verified; "
                        "re-create the artifact")
    unlisted = sorted(name for name in _artifact_entries(path) if name not in files)
    if unlisted:
        # A file nobody hashed could be read in place of a verified one (swapped weights, a
        # second external-data file, a cached .pyc beside model.py).
        raise UserError(f"{path}: holds {', '.join(unlisted[:3])}{' …' if len(unlisted) > 3 else ''}, not listed in "
                        f"the manifest ({MANIFEST_FILE}), so it cannot be verified; remove it or re-create the artifact")
    for name, entry in files.items():
        target = path / name
        if not target.exists():
            raise UserError(f"{path}: {name} is listed in the manifest but missing; re-create the artifact")
        if _hash_listed_file(target, entry) != entry["sha256"]:
            raise UserError(
                f"{target}: does not match the sha256 in its manifest (corrupt, truncated or edited); "
                "re-create the artifact from its parent"
            )
    for graph in (ONNX_FILE, DECODER_FILE):
        if graph in files:
            check_onnx_locations(path, graph)


def check_onnx_locations(path: Path, graph: str = ONNX_FILE) -> None:
    """model.onnx (or decoder.onnx) may keep its weights only in model.onnx.data (decoder.onnx.data),
    at valid offsets: no other file, inside or outside the artifact, is read as weights. Nothing
    about any other file is reported."""
    onnx_path = path / graph
    data_file = graph + ".data"
    if not may_have_external_data(onnx_path):
        return
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # not ONNX at all: the runtime that loads it next says so, in its words
        return
    data_size = (path / data_file).stat().st_size if (path / data_file).is_file() else None
    for tensor in onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        if info.get("location") != data_file:
            raise UserError(f"{onnx_path}: tensor {tensor.name!r} keeps its weights in {info.get('location')!r}, "
                            f"not in {data_file}; only {data_file} is verified — re-export the model")
        offset, length = info.get("offset", "0"), info.get("length", "0")
        if not (offset.isdigit() and length.isdigit()):
            raise UserError(f"{onnx_path}: tensor {tensor.name!r} has an external-data offset {offset!r} and "
                            f"length {length!r}, not byte counts; re-export the model")
        if data_size is None or int(offset) + int(length) > data_size:
            raise UserError(f"{onnx_path}: tensor {tensor.name!r} reads past the end of {data_file}; "
                            "re-export the model")


def may_have_external_data(path: Path) -> bool:
    """False when an ONNX file certainly has no external data: the key "location" that every
    external-data entry carries is nowhere in its bytes. A scan at memory speed, where parsing
    the graph would decode every weight of a one-file model."""
    import mmap

    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return False
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return mapped.find(b"location") >= 0


def onnx_tensors(graph):
    """Every tensor stored in an ONNX graph: initializers, Constant nodes' values, and subgraphs' own."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from onnx_tensors(sub)


