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
import os
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import outputs
from .errors import UserError

FORMAT = "bigmodel"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
# A model over protobuf's 2 GB limit keeps its weights here, beside model.onnx (engine/onnx_files.py).
# It is hashed, verified and copied like every other file of the artifact.
ONNX_DATA_FILE = ONNX_FILE + ".data"
MODEL_CODE_FILE = "model.py"  # a copy of the user's model file, for --model FILE.py:Class
TASKS = ("classification", "language-modeling")
STAGES = ("train", "prune", "distill", "quantize", "export")


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no {path.name}; this is not a bigmodel artifact directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc}); re-create the artifact") from None
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
            manifest = _read_json(path / MANIFEST_FILE, "manifest")
            entry["stage"] = manifest.get("stage")
            entry["found"] = sha256_file(path / MANIFEST_FILE) == parent.get("sha256")
            parent = manifest.get("parent")
        return chain

    def load_state_dict(self) -> dict:
        """The weights as tensors. safetensors never executes code."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not self.has_weights:
            raise UserError(
                f"{self.path}: has no {WEIGHTS_FILE} (an ONNX-only artifact); use its PyTorch parent "
                f"({(self.manifest.get('parent') or {}).get('path', 'unknown')}) for this command"
            )
        try:
            state = load_file(self.path / WEIGHTS_FILE)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{self.path / WEIGHTS_FILE}: cannot read weights ({exc}); re-create the artifact") from None
        quantization = self.config.get("quantization") or {}
        if quantization.get("mode") == "weight-only":  # int8/int4 weights + scales → float (bigmodel quantize)
            from .engine.quantization.weight_only import dequantize_state

            state = dequantize_state(state, quantization, source=str(self.path / WEIGHTS_FILE))
        return state

    def build_model(self):
        """Rebuild the torch model from config.json and load its weights (eval mode, CPU)."""
        from .models import build_model
        from .weights import load_into

        model = build_model(self.model_spec, base_dir=self.path)
        load_into(model, self.load_state_dict(), source=self.path / WEIGHTS_FILE)
        model.eval()
        return model


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
    if not isinstance(config.get("data"), dict):
        problems.append('"data" must be an object')
    if problems:
        raise UserError(f"{where / CONFIG_FILE}: " + "; ".join(problems) + "; re-create the artifact")


def verify_files(path: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{path / MANIFEST_FILE}: lists no files; re-create the artifact")
    for name, entry in files.items():
        target = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{path / MANIFEST_FILE}: file name {name!r} leaves the artifact directory")
        if not target.is_file():
            raise UserError(f"{path}: {name} is listed in the manifest but missing; re-create the artifact")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if target.stat().st_size != (entry or {}).get("bytes") or sha256_file(target) != expected:
            raise UserError(
                f"{target}: does not match the sha256 in its manifest (corrupt, truncated or edited); "
                "re-create the artifact from its parent"
            )
    if (path / ONNX_DATA_FILE).is_file() and ONNX_DATA_FILE not in files:
        # model.onnx's weights would be read from a file nobody hashed
        raise UserError(f"{path / ONNX_DATA_FILE}: is not listed in the manifest, so its weights cannot be verified; "
                        "re-create the artifact from its parent")


def open_artifact(path: Path | str, verify: bool = True) -> Artifact:
    """Open and verify an artifact directory (or a training run's best/ artifact)."""
    path = resolve_artifact_dir(path)
    manifest = _read_json(path / MANIFEST_FILE, "manifest")
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
        outputs.fsync_dir(Path(dirpath))


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
    with outputs.hold(out):
        check_output(out, overwrite, inputs)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = outputs.staging_path(out)
            staging.mkdir()
        except OSError as exc:
            raise UserError(f"{out}: cannot create the output ({exc.strerror}); choose another --out") from None
        try:
            yield staging
            _fsync_tree(staging)
            if out.exists() and not overwrite:  # appeared while we worked
                raise UserError(f"{out}: appeared while this command ran; pass --overwrite or choose another --out")
            outputs.swap_into_place(staging, out)
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
        if name == MANIFEST_FILE:
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
        "options": _jsonable(options or {}),
        "metrics": _jsonable(metrics or {}),
        **_jsonable(extra or {}),
        "files": file_entries(directory),
        "versions": library_versions(),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _jsonable(value: Any) -> Any:
    """Paths and numpy/torch scalars → plain JSON types, so a manifest always serialises."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
