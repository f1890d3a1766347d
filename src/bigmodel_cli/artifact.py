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
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import outputs
# The format's names and checks, and the careful readers of its files, live in their own modules;
# every command imports them from here, the artifact layer's one front door.
from .artifact_format import (  # noqa: F401  (re-exported)
    FORMAT, FORMAT_VERSION, CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, ONNX_FILE, ONNX_DATA_FILE, DECODER_FILE,
    MODEL_CODE_FILE,
    TASKS, STAGES, PRIVATE_PREFIX, MAX_JSON_BYTES, validate_config, data_spec_problems, validate_manifest,
)
from .artifact_files import (  # noqa: F401  (re-exported)
    open_regular, read_regular_file, sha256_file, verify_files, check_onnx_locations, may_have_external_data, onnx_tensors,
)
from .output_lock import hold
from .output_staging import fsync_dir, staging_path, swap_into_place
from .errors import UserError

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

    def read_verified(self, name: str, limit: int) -> bytes:
        """A listed file's bytes, read once (size-capped) and checked against the manifest's sha256,
        so what is parsed is exactly what was verified, even if the file changed since opening."""
        entry = self.manifest.get("files", {}).get(name)
        if entry is None:
            raise UserError(f"{self.path}: config.json names {name} but the manifest does not list it; re-create the artifact")
        try:
            data = read_regular_file(self.path / name, limit)
        except FileNotFoundError:
            raise UserError(f"{self.path}: {name} is listed in the manifest but missing; re-create the artifact") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise UserError(f"{self.path / name}: does not match the sha256 in its manifest (corrupt, truncated or "
                            "edited); re-create the artifact from its parent")
        return data

    def tokenizer(self):
        """The language model's tokenizer (data/tokenizer.py): its tokenizer.json, or bytes."""
        from .data.tokenizer import MAX_TOKENIZER_BYTES, load_tokenizer

        tokenizer = load_tokenizer(self.config, lambda name: self.read_verified(name, MAX_TOKENIZER_BYTES),
                                   where=str(self.path))
        rows = self.model_spec.get("vocab_size")
        if isinstance(rows, int) and tokenizer.vocab_size > rows:
            raise UserError(f"{self.path}: the tokenizer has {tokenizer.vocab_size:,} tokens but the model's embedding "
                            f"has {rows:,} rows; re-create the artifact with a model vocabulary of at least "
                            f"{tokenizer.vocab_size:,}")
        return tokenizer

    def tokenizer_files(self) -> dict[str, Path]:
        """Files a derived artifact (pruned, distilled, exported, quantized) carries over so that
        it reads text as this one does: tokenizer.json when there is one."""
        from .data.tokenizer import TOKENIZER_FILE

        return {TOKENIZER_FILE: self.path / TOKENIZER_FILE} if self.config.get("tokenizer") is not None else {}

    def copy_tokenizer(self, staging: Path) -> None:
        """Write this artifact's tokenizer.json (the verified bytes) into a derived artifact's staging
        directory, when it has one."""
        from .data.tokenizer import MAX_TOKENIZER_BYTES

        for name in self.tokenizer_files():
            (staging / name).write_bytes(self.read_verified(name, MAX_TOKENIZER_BYTES))

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
    (engine/compress/quantize/weight_only.py): int8 keeps the shape with one scale per row; int4 packs
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
    if (path / outputs.HF_EXPORT_FILE).is_file():  # `export --format hf` wrote it for other tools
        raise UserError(f"{path}: is a Hugging Face directory (export --format hf), not a bigmodel artifact; "
                        f"run `bigmodel import {path} --out ART` to use it here")
    raise UserError(f"{path}: no {MANIFEST_FILE} here; this is not a bigmodel artifact (or training run) directory")


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
