"""ONNX files on disk: ``model.onnx`` alone, or ``model.onnx`` + exactly one ``model.onnx.data``.

Protobuf cannot serialize a message of 2 GiB or more, so ONNX keeps the weights of larger models in
"external data": files beside the model that it points into (location, offset, length per tensor).
The tools that write ONNX lay these out differently — the TorchScript exporter writes one file per
tensor, ``onnx.save`` picks a random file name and *appends* to an existing one, ONNX Runtime's
quantizer names the file after its output — so every writer here ends with ``place``, which leaves
one canonical layout whatever the tool did. Artifacts then hash, copy and verify a fixed set of files.

No torch here: quantize and the runtime use this module too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...artifact import may_have_external_data, onnx_tensors


def data_path(path: Path) -> Path:
    """Where ``path``'s external data lives in the canonical layout: ``model.onnx.data``."""
    return path.with_name(path.name + ".data")


def _tensors(graph):
    """Every tensor stored in a graph: initializers, Constant nodes' values, and subgraphs' own."""
    return onnx_tensors(graph)


def external_locations(path: Path) -> set[str]:
    """The files (relative to ``path``'s directory) that ``path``'s tensors point into."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the graph only: cheap even for 2 GB models
    found = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in tensor.external_data if e.key == "location")
    return found


def check_external_data(path: Path) -> None:
    """Refuse (exit 2) a model whose data file is missing or shorter than its tensors say.

    The manifest's hashes catch a data file damaged after the artifact was written; this catches
    one that was already wrong (copied half-way, or written by another tool), with a line naming
    the file instead of ONNX Runtime's deserializer message."""
    import onnx

    from ...errors import UserError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all (DecodeError, ...): whoever loads it next says so, in its words
        return
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            # nothing is looked up outside the model's folder, so nothing about it is revealed
            raise UserError(f"{path}: tensor {tensor.name!r} points outside {path.parent.name or 'its folder'} for "
                            "its weights; re-export the model")
        target = path.parent / location
        if not target.is_file():
            raise UserError(f"{target}: missing; {path.name} keeps its weights there — copy it beside {path.name}, "
                            "or re-export the model")
        offset, length = info.get("offset", "0"), info.get("length", "0")
        if not (offset.isdigit() and length.isdigit()):
            raise UserError(f"{path}: tensor {tensor.name!r} has external-data offset {offset!r} and length "
                            f"{length!r}, not byte counts; re-export the model")
        end = int(offset) + int(length)
        size = target.stat().st_size
        if end > size:
            raise UserError(f"{target}: is {size:,} bytes, but {path.name} reads tensor {tensor.name!r} up to byte "
                            f"{end:,} (truncated?); re-export the model")


def check_data_beside(path: Path) -> None:
    """``check_external_data`` when ``path`` may keep weights outside itself (``model.onnx.data``
    beside it, or the external-data key anywhere in its bytes). Parsing the graph reads the whole
    file, which for a one-file model means all its weights (~0.5 s per 256 MiB here), so one-file
    models skip it; and a location outside the model's folder is refused before ONNX Runtime
    would read it."""
    if data_path(path).exists() or may_have_external_data(path):
        check_external_data(path)


def has_external_data(path: Path) -> bool:
    return bool(external_locations(path))


def total_bytes(path: Path) -> int:
    """The model file plus every external data file it points into."""
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external_locations(path)
                                     if (path.parent / name).is_file())


def place(src: Path, dst: Path, external: bool) -> None:
    """Move the model at ``src`` (written by some tool into a scratch directory of its own) to ``dst``
    in the canonical layout: ``dst`` alone, or with ``external`` one ``dst``.data beside it (the
    caller decides, by the size of the weights: exporters.EXTERNAL_DATA_THRESHOLD_BYTES).

    When the tool already wrote that layout (under any name) the files are moved; otherwise the
    model is re-saved, its external tensors read from their files as they are written.
    ``src``'s directory is left for the caller to remove.
    """
    src, dst = Path(src), Path(dst)
    if src.parent.resolve() == dst.parent.resolve():
        raise ValueError("place() moves a model between directories; write it into a scratch directory first")
    for stale in (dst, data_path(dst)):
        stale.unlink(missing_ok=True)
    locations = external_locations(src)
    if not external and not locations:
        shutil.move(src, dst)  # a rename on one filesystem; quantize's temporary directory may be on another
    elif external and locations == {data_path(src).name}:
        shutil.move(data_path(src), data_path(dst))
        _relocate(src, dst, data_path(src).name, data_path(dst).name)
        src.unlink()
    else:
        _resave(src, dst, external)


def copy(src: Path, dst: Path) -> None:
    """Copy a model in the canonical layout to ``dst`` (in another directory, or under another name)."""
    src, dst = Path(src), Path(dst)
    data_path(dst).unlink(missing_ok=True)
    if data_path(src).name in external_locations(src):
        shutil.copyfile(data_path(src), data_path(dst))
        _relocate(src, dst, data_path(src).name, data_path(dst).name)
    else:
        shutil.copyfile(src, dst)


def _relocate(src: Path, dst: Path, old: str, new: str) -> None:
    """Write ``src``'s graph to ``dst`` with its tensors pointing into ``new`` instead of ``old``
    (the data file itself is not touched: offsets and lengths stay valid)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if old != new:
        for tensor in _tensors(model.graph):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value == old:
                    entry.value = new
    onnx.save(model, str(dst))  # the graph only: no tensor data is loaded or written


def _resave(src: Path, dst: Path, external: bool) -> None:
    """Re-write ``src`` as ``dst`` (+ ``dst``.data when ``external``), through onnx_ir: it maps
    external tensors lazily, and unlike ``onnx.save_model`` it neither appends to an existing data
    file nor refuses a location that happens to exist in the *current working directory*."""
    from onnxscript import ir

    model = ir.load(str(src))
    if external:
        ir.save(model, str(dst), external_data=data_path(dst).name)
    else:
        ir.external_data.load_to_model(model)  # into the one protobuf file
        ir.save(model, str(dst))


def save_proto(model, dst: Path, external: bool) -> None:
    """An in-memory ``onnx.ModelProto`` (its tensors loaded) to ``dst`` in the canonical layout."""
    from onnxscript import ir

    data_path(dst).unlink(missing_ok=True)
    ir.save(ir.from_proto(model), str(dst), external_data=data_path(dst).name if external else None)
