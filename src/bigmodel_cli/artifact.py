"""The artifact directory: the one format every command reads and writes.

An artifact is a directory with ``config.json`` (how to rebuild and feed the model),
``model.safetensors`` and/or ``model.onnx`` (the weights), and ``manifest.json`` (lineage, options,
metrics, file hashes, library versions). See docs/artifacts.md.

Three invariants live here and nowhere else:
- loading never unpickles (safetensors, JSON and ONNX protobuf only);
- a file whose sha256 does not match the manifest is refused;
- writes go to a hidden staging directory next to the output, are fsynced, and are renamed into
  place, so a crash never leaves a directory that loads.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from . import outputs
from .output_lock import hold
from .output_staging import fsync_dir, staging_path, swap_into_place
from .errors import UserError

FORMAT = "bigmodel"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
# A model over protobuf's 2 GB limit keeps its weights here, beside model.onnx (engine/onnx/files.py).
# It is hashed, verified and copied like every other file of the artifact.
ONNX_DATA_FILE = ONNX_FILE + ".data"
MODEL_CODE_FILE = "model.py"  # a copy of the user's model file, for --model FILE.py:Class
TASKS = ("classification", "language-modeling")
STAGES = ("train", "prune", "distill", "quantize", "export")
# Entries bigmodel itself may keep in an artifact directory that are not part of the artifact
# (the output lock, for one): hidden names starting with this are neither listed nor refused.
PRIVATE_PREFIX = ".bigmodel"
# config.json and manifest.json are a few KB; a cap keeps a hostile one (or /dev/zero) from
# being read into memory. Generous: a manifest lists every file and metrics of long runs.
MAX_JSON_BYTES = 16 << 20


def open_regular(path: Path) -> BinaryIO | None:
    """``path`` opened for binary reading if it is a regular file, else None (OSError as open's).

    Opened non-blocking, so a FIFO cannot make the open wait forever, and checked with fstat on
    the open descriptor, so a device (a symlink to /dev/zero) is never read without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, if it is a regular file of at most ``limit`` bytes (see
    ``open_regular``). Raises FileNotFoundError when there is nothing there; UserError for anything else."""
    try:
        handle = open_regular(path)
    except FileNotFoundError:  # the caller knows what a missing file means ("not an artifact")
        raise
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror}); re-create the artifact") from None
    if handle is None:
        raise UserError(f"{path}: is not a regular file; re-create the artifact")
    with handle:
        info = os.fstat(handle.fileno())
        if info.st_size > limit:
            raise UserError(f"{path}: is {info.st_size:,} bytes, more than the {limit:,} bigmodel reads for it; "
                            "re-create the artifact")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise UserError(f"{path}: is more than the {limit:,} bytes bigmodel reads for it; re-create the artifact")
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of what produced an artifact, read from package metadata (no heavy imports)."""
    versions = {"python": sys.version.split()[0]}
    for dist in ("bigmodel", "torch", "numpy", "safetensors", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(read_regular_file(path, MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no {path.name}; this is not a bigmodel artifact directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc}); re-create the artifact") from None
    except RecursionError:  # nested thousands deep: no real config or manifest is
        raise UserError(f"{path}: {what} is nested too deeply to be a bigmodel {what}; re-create the artifact") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a JSON object; re-create the artifact")
    return data


@dataclass
class Artifact:
    """A loaded, verified artifact directory."""

    path: Path
    config: dict
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest.get("stage", "?")

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def model_spec(self) -> dict:
        return self.config["model"]

    @property
    def data_spec(self) -> dict:
        return self.config["data"]

    @property
    def has_weights(self) -> bool:
        return (self.path / WEIGHTS_FILE).is_file()

    @property
    def has_onnx(self) -> bool:
        return (self.path / ONNX_FILE).is_file()

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def file_bytes(self, name: str | None = None) -> int:
        """Size of the model file (safetensors, or ONNX when that is all there is), with ONNX's
        external data when it has some."""
        if name is None:
            name = WEIGHTS_FILE if self.has_weights else ONNX_FILE
        total = (self.path / name).stat().st_size
        if name == ONNX_FILE and (self.path / ONNX_DATA_FILE).is_file():
            total += (self.path / ONNX_DATA_FILE).stat().st_size
        return total

    def parent(self) -> Artifact | None:
        """The artifact this one was made from, if it is still where the manifest says."""
        parent = self.manifest.get("parent")
        if not parent or not Path(parent.get("path", "")).is_dir():
            return None
        try:
            return open_artifact(Path(parent["path"]))
        except UserError:
            return None

    def lineage(self) -> list[dict]:
        """This artifact and its ancestors, newest first, as far as they can be found."""
        chain: list[dict] = [{"path": str(self.path), "stage": self.stage}]
        parent = self.manifest.get("parent")
        seen = {str(self.path)}
        while parent:
            entry = {"path": parent.get("path"), "stage": None, "found": False}
            chain.append(entry)
            path = Path(parent.get("path", ""))
            if str(path) in seen or not (path / MANIFEST_FILE).is_file():
                break
            seen.add(str(path))
            try:
                manifest = _read_json(path / MANIFEST_FILE, "manifest")
                validate_manifest(manifest, path)
            except UserError:  # an unreadable ancestor ends the chain; it is not this artifact's problem
                break
            entry["stage"] = manifest.get("stage")
            entry["found"] = sha256_file(path / MANIFEST_FILE) == parent.get("sha256")
            parent = manifest.get("parent")
        return chain

    def require_weights(self) -> None:
        if not self.has_weights:
            raise UserError(
                f"{self.path}: has no {WEIGHTS_FILE} (an ONNX-only artifact); use its PyTorch parent "
                f"({(self.manifest.get('parent') or {}).get('path', 'unknown')}) for this command"
            )

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every weight as the model sees it (weight-only quantized tensors at
        their float shape, their scales left out), read from the safetensors header alone."""
        from .weights import stored_shapes

        self.require_weights()
        shapes = stored_shapes(self.path / WEIGHTS_FILE)
        quantization = self.config.get("quantization") or {}
        if quantization.get("mode") != "weight-only":
            return shapes
        from .weights import SCALE_SUFFIX

        source = self.path / WEIGHTS_FILE
        listed = quantization.get("tensors")
        if not isinstance(listed, dict):
            raise UserError(f"{source}: config.json's quantization section lists no tensors; re-create the artifact")
        for name, shape in listed.items():
            packed = shapes.get(name)
            if packed is None or not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
                raise UserError(f"{source}: quantized tensor {name} is missing or its shape {shape!r} is not "
                                "a list of sizes; re-create the artifact")
            if not _quantized_layout_ok(shape, packed, shapes.get(name + SCALE_SUFFIX), quantization.get("bits")):
                raise UserError(f"{source}: quantized tensor {name} is stored as {packed} (scale "
                                f"{shapes.get(name + SCALE_SUFFIX)}) but config.json says {tuple(shape)} at "
                                f"{quantization.get('bits')!r} bits; config.json and the weights do not belong together")
            shapes[name] = tuple(shape)
            shapes.pop(name + SCALE_SUFFIX, None)
        return shapes

    def load_state_dict(self) -> dict:
        """The weights as tensors. safetensors never executes code."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.require_weights()
        try:
            state = load_file(self.path / WEIGHTS_FILE)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{self.path / WEIGHTS_FILE}: cannot read weights ({exc}); re-create the artifact") from None
        quantization = self.config.get("quantization") or {}
        if quantization.get("mode") == "weight-only":  # int8/int4 weights + scales → float (bigmodel quantize)
            from .weights import dequantize_state

            state = dequantize_state(state, quantization, source=str(self.path / WEIGHTS_FILE))
        return state

    def build_model(self):
        """Rebuild the torch model from config.json and load its weights (eval mode, CPU)."""
        from .models import build_model
        from .weights import check_fits_weights, load_into

        # Checked against the weights' header first: config.json alone could ask for any size.
        check_fits_weights(self.model_spec, self.weight_shapes(), self.path / WEIGHTS_FILE, base_dir=self.path)
        model = build_model(self.model_spec, base_dir=self.path)
        load_into(model, self.load_state_dict(), source=self.path / WEIGHTS_FILE)
        model.eval()
        return model


def _quantized_layout_ok(shape: list[int], packed: tuple, scale: tuple | None, bits: Any) -> bool:
    """Whether a weight-only quantized tensor's stored and scale shapes fit its float ``shape``
    (engine/quantization/weight_only.py): int8 keeps the shape with one scale per row; int4 packs
    two per byte, rows padded to whole groups, one scale per group."""
    if scale is None or not packed or packed[0] != shape[0] or len(scale) not in (1, 2) or scale[0] != shape[0]:
        return False
    if bits == 8:
        return tuple(packed) == tuple(shape) and len(scale) == 1
    if bits != 4 or len(packed) != 2 or len(scale) != 2 or scale[1] < 1:
        return False
    padded, columns = 2 * packed[1], math.prod(shape[1:])
    return padded % scale[1] == 0 and columns <= padded < columns + padded // scale[1]


def resolve_artifact_dir(path: Path | str) -> Path:
    """Accept an artifact directory, or a training run directory (then its best/ or last/)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; give the path of an artifact directory")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; give the path of an artifact directory (with {MANIFEST_FILE})")
    if (path / MANIFEST_FILE).is_file():
        return path
    for sub in ("best", "last"):
        if (path / sub / MANIFEST_FILE).is_file():
            return path / sub
    raise UserError(f"{path}: no {MANIFEST_FILE} here; this is not a bigmodel artifact (or training run) directory")


def validate_config(config: dict, where: Path) -> None:
    """Every problem with config.json's layout, in one line (exit 2), before anything uses it."""
    problems = []
    if config.get("format") != FORMAT:
        problems.append(f'"format" must be "{FORMAT}"')
    if config.get("format_version") != FORMAT_VERSION:
        problems.append(f'"format_version" {config.get("format_version")!r} is not supported (this bigmodel reads {FORMAT_VERSION})')
    if config.get("task") not in TASKS:
        problems.append(f'"task" must be one of {", ".join(TASKS)}')
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str):
        problems.append('"model" must be an object with an "arch" name')
    data = config.get("data")
    if isinstance(data, dict):
        problems += data_spec_problems(data)
    else:
        problems.append('"data" must be an object')
    for key in ("quantization", "onnx"):
        if key in config and not isinstance(config[key], (dict, type(None))):
            problems.append(f'"{key}" must be an object')
    if problems:
        raise UserError(f"{where / CONFIG_FILE}: " + "; ".join(problems) + "; re-create the artifact")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any) -> list | None:
    """A number or a flat list of numbers as a list; None when it is anything else."""
    values = value if isinstance(value, list) else [value]
    return values if values and all(_is_number(v) for v in values) else None


def _normalization_problems(norm: Any) -> list[str]:
    if not isinstance(norm, dict):
        return ['"data.normalization" must be an object with "mean" and "std"']
    problems = []
    mean, std = _numbers(norm.get("mean")), _numbers(norm.get("std"))
    if mean is None:
        problems.append('"data.normalization.mean" must be a finite number or a list of them')
    if std is None:
        problems.append('"data.normalization.std" must be a finite number or a list of them')
    elif any(v <= 0 for v in std):  # inputs are divided by it
        problems.append('"data.normalization.std" must be greater than 0')
    if mean is not None and std is not None and isinstance(norm["mean"], list) != isinstance(norm["std"], list):
        problems.append('"data.normalization" mean and std must both be numbers or both lists')
    elif mean is not None and std is not None and len(mean) != len(std):
        problems.append('"data.normalization" mean and std must have the same length')
    return problems


def _split_problems(split: Any) -> list[str]:
    if not isinstance(split, dict):
        return ['"data.split" must be an object']
    problems = []
    for key in ("val", "test"):
        if key in split and not (_is_number(split[key]) and 0 <= split[key] < 1):
            problems.append(f'"data.split.{key}" must be a fraction in [0, 1)')
    if "seed" in split and not (_is_int(split["seed"]) and 0 <= split["seed"] < 2**63):
        problems.append('"data.split.seed" must be a non-negative integer')
    return problems


def data_spec_problems(data: dict) -> list[str]:
    """What is wrong with the types of config.json's "data" section (empty when nothing is)."""
    problems = []
    if not isinstance(data.get("name"), str):
        problems.append('"data.name" must be a dataset name')
    for key in ("path", "target"):
        if key in data and not isinstance(data[key], str):
            problems.append(f'"data.{key}" must be a string')
    if "normalization" in data:
        problems += _normalization_problems(data["normalization"])
        norm, shape = data["normalization"], data.get("input_shape")
        features = math.prod(shape) if isinstance(shape, list) and all(_is_int(v) for v in shape) else None
        if not problems and isinstance(norm["mean"], list) and features is not None and len(norm["mean"]) != features:
            # per-feature statistics are broadcast against the input's features
            problems.append(f'"data.normalization" has {len(norm["mean"])} per-feature values but the input has '
                            f'{features} features')
    if "split" in data:
        problems += _split_problems(data["split"])
    if "input_shape" in data and not (isinstance(data["input_shape"], list)
                                      and all(_is_int(v) and v > 0 for v in data["input_shape"])):
        problems.append('"data.input_shape" must be a list of positive integers')
    for key in ("num_classes", "block_size", "vocab_size", "samples"):
        if key in data and not (_is_int(data[key]) and data[key] > 0):
            problems.append(f'"data.{key}" must be a positive integer')
    for key in ("class_names", "feature_names"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            problems.append(f'"data.{key}" must be a list of strings')
    return problems


_SHA256_LENGTH = 64


def _files_problems(files: Any) -> list[str]:
    if not isinstance(files, dict) or not files:
        return ['"files" must be an object naming every file of the artifact with its "bytes" and "sha256"']
    problems = []
    for name, entry in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not name:
            problems.append(f'file name {name!r} leaves the artifact directory')
        elif not isinstance(entry, dict) or not (_is_int(entry.get("bytes")) and entry["bytes"] >= 0) \
                or not (isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == _SHA256_LENGTH):
            problems.append(f'"files.{name}" must be an object with integer "bytes" and a sha256 hex "sha256"')
        if len(problems) >= 3:  # enough to show the pattern; the line must stay readable
            break
    return problems


def validate_manifest(manifest: dict, where: Path) -> None:
    """Every problem with manifest.json's layout, in one line (exit 2), before anything uses it."""
    problems = _files_problems(manifest.get("files"))
    if "stage" in manifest and manifest["stage"] not in STAGES:
        problems.append(f'"stage" must be one of {", ".join(STAGES)}')
    parent = manifest.get("parent")
    if parent is not None and not (isinstance(parent, dict) and isinstance(parent.get("path"), str)
                                   and isinstance(parent.get("sha256"), (str, type(None)))):
        problems.append('"parent" must be null or an object with a "path" and a "sha256"')
    for key in ("metrics", "options", "versions"):
        if key in manifest and not isinstance(manifest[key], dict):
            problems.append(f'"{key}" must be an object')
    if problems:
        raise UserError(f"{where / MANIFEST_FILE}: " + "; ".join(problems) + "; re-create the artifact")


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
    if ONNX_FILE in files:
        check_onnx_locations(path)


def check_onnx_locations(path: Path) -> None:
    """model.onnx may keep its weights only in model.onnx.data, at valid offsets: no other file,
    inside or outside the artifact, is read as weights. Nothing about any other file is reported."""
    onnx_path = path / ONNX_FILE
    if not may_have_external_data(onnx_path):
        return
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # not ONNX at all: the runtime that loads it next says so, in its words
        return
    data_size = (path / ONNX_DATA_FILE).stat().st_size if (path / ONNX_DATA_FILE).is_file() else None
    for tensor in onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        if info.get("location") != ONNX_DATA_FILE:
            raise UserError(f"{onnx_path}: tensor {tensor.name!r} keeps its weights in {info.get('location')!r}, "
                            f"not in {ONNX_DATA_FILE}; only {ONNX_DATA_FILE} is verified — re-export the model")
        offset, length = info.get("offset", "0"), info.get("length", "0")
        if not (offset.isdigit() and length.isdigit()):
            raise UserError(f"{onnx_path}: tensor {tensor.name!r} has an external-data offset {offset!r} and "
                            f"length {length!r}, not byte counts; re-export the model")
        if data_size is None or int(offset) + int(length) > data_size:
            raise UserError(f"{onnx_path}: tensor {tensor.name!r} reads past the end of {ONNX_DATA_FILE}; "
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


def open_artifact(path: Path | str, verify: bool = True) -> Artifact:
    """Open and verify an artifact directory (or a training run's best/ artifact)."""
    path = resolve_artifact_dir(path)
    manifest = _read_json(path / MANIFEST_FILE, "manifest")
    validate_manifest(manifest, path)
    if verify:
        verify_files(path, manifest)
    config = _read_json(path / CONFIG_FILE, "config")
    validate_config(config, path)
    return Artifact(path=path.resolve(), config=config, manifest=manifest)


def new_config(task: str, model: dict, data: dict, **extra: Any) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task, "model": model, "data": data, **extra}


def check_output(out: Path | str, overwrite: bool, inputs: Iterable[Path | str | None] = (),
                 lock_probe: bool = True) -> Path:
    """Fail before any work if the output exists and may not be replaced, or would destroy an input
    (the policy is outputs.check_output's)."""
    return outputs.check_output(out, overwrite, inputs, lock_probe)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(out: Path | str, overwrite: bool = False,
                     inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out`` only if the block succeeds.

    The output is locked for the whole block (one writer at a time). The staging directory sits
    next to ``out`` (same filesystem, so the rename is atomic) and has a hidden name with this
    process's id, so a crash leaves at worst a ``.name.tmp-PID-*`` directory that nothing loads and
    the next write beside it removes.
    """
    out = Path(out)
    with hold(out):
        check_output(out, overwrite, inputs)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = staging_path(out)
            staging.mkdir()
        except OSError as exc:
            raise UserError(f"{out}: cannot create the output ({exc.strerror}); choose another --out") from None
        try:
            yield staging
            _fsync_tree(staging)
            if out.exists() and not overwrite:  # appeared while we worked
                raise UserError(f"{out}: appeared while this command ran; pass --overwrite or choose another --out")
            swap_into_place(staging, out)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            problem = storage_problem(exc)
            if problem:
                raise UserError(f"{out}: {problem}; choose another --out (nothing was written)") from None
            raise


def storage_problem(exc: BaseException) -> str | None:
    """'the disk is full' etc. for an exception from a failed write, else None.

    safetensors raises its own error type for I/O failures, so the OS error is recognised by its
    errno or its text.
    """
    import errno

    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "os error 28" in text:
        return "the disk is full"
    if code == errno.EROFS or "Read-only file system" in text or "os error 30" in text:
        return "the location is read-only"
    if code == errno.EACCES or "Permission denied" in text:
        return "permission denied"
    return None


def file_entries(root: Path) -> dict[str, dict]:
    entries = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        name = file.relative_to(root).as_posix()
        if name == MANIFEST_FILE or any(part.startswith(PRIVATE_PREFIX) for part in file.relative_to(root).parts):
            continue
        entries[name] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return entries


def parent_ref(parent: Artifact | Path | None) -> dict | None:
    if parent is None:
        return None
    path = parent.path if isinstance(parent, Artifact) else Path(parent)
    return {"path": str(path.resolve()), "sha256": sha256_file(path / MANIFEST_FILE)}


def write_metadata(
    directory: Path,
    *,
    config: dict,
    stage: str,
    parent: Artifact | Path | None = None,
    options: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    argv: list[str] | None = None,
) -> dict:
    """Write config.json, then manifest.json with hashes of every file already in ``directory``.

    Call it last, after the weight files are in place.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "parent": parent_ref(parent),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "options": jsonable(options or {}),
        "metrics": jsonable(metrics or {}),
        **jsonable(extra or {}),
        "files": file_entries(directory),
        "versions": library_versions(),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def jsonable(value: Any) -> Any:
    """Paths and numpy/torch scalars → plain JSON types, so a manifest always serialises."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


@dataclass
class SavedArtifact:
    path: Path
    manifest: dict = field(default_factory=dict)


def save_torch_artifact(
    out: Path | str,
    model,
    *,
    config: dict,
    stage: str,
    overwrite: bool = False,
    parent: Artifact | Path | None = None,
    options: dict | None = None,
    metrics: dict | None = None,
    extra_files: dict[str, Path] | None = None,
    extra: dict | None = None,
) -> SavedArtifact:
    """Write a model as a complete artifact (weights + config + manifest), atomically."""
    from .weights import save_model_weights

    with atomic_directory(out, overwrite) as staging:
        save_model_weights(model, staging / WEIGHTS_FILE)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)
        manifest = write_metadata(
            staging, config=config, stage=stage, parent=parent, options=options, metrics=metrics, extra=extra
        )
    return SavedArtifact(Path(out), manifest)
