"""The user's own ``nn.Module``: ``--model path/to/file.py:ClassOrFactory``.

The file is copied into the artifact (``model.py``) so the artifact reloads anywhere. A Python file
is code, so it is executed only when the user names it: on the command line that trains it, or when
loading an artifact, through ``--trust-model-code`` (or BIGMODEL_TRUST_MODEL_CODE=1).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import UserError

_TRUSTED: set[str] = set()
_TRUST_ALL = False


def trust_file(path: Path | str) -> None:
    """The user named this file: it may be executed."""
    _TRUSTED.add(str(Path(path).resolve()))


def set_trust_model_code(value: bool) -> None:
    global _TRUST_ALL
    _TRUST_ALL = value


def _trusted(path: Path) -> bool:
    return _TRUST_ALL or os.environ.get("BIGMODEL_TRUST_MODEL_CODE") == "1" or str(path.resolve()) in _TRUSTED


def parse_reference(reference: str) -> tuple[Path, str]:
    """'dir/file.py:Name' → (path, name)."""
    file, _, entry = reference.rpartition(":")
    if not file or not entry or not file.endswith(".py"):
        raise UserError(f"--model {reference!r}: a model file is given as path/to/file.py:ClassOrFactory")
    path = Path(file)
    if not path.is_file():
        raise UserError(f"--model {reference!r}: {path} does not exist")
    if not entry.isidentifier():
        raise UserError(f"--model {reference!r}: {entry!r} is not a Python name")
    return path, entry


def build_user_model(spec: dict, base_dir: Path | None):
    import torch

    path = Path(spec["file"])
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise UserError(f"model file {path} is missing; the artifact needs its model.py")
    if not _trusted(path):
        raise UserError(
            f"{path}: this artifact's model is Python code; pass --trust-model-code "
            "(bigmodel --trust-model-code COMMAND ...) if you trust it"
        )
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"bigmodel_user_model_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            # Compiled from the verified source itself: the import system would write a
            # __pycache__ into the artifact, and would run a .pyc found there instead of the
            # hashed model.py whenever its recorded size and mtime match.
            source = path.read_bytes()
            exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the user trusted this file
        except Exception as exc:  # the user's code: any error is theirs to fix
            raise UserError(f"{path}: importing the model file failed: {type(exc).__name__}: {exc}") from None
        sys.modules[module_name] = module
    factory = getattr(module, spec["entry"], None)
    if factory is None or not callable(factory):
        raise UserError(f"{path}: has no class or function named {spec['entry']!r}")
    args = spec.get("args") or {}
    try:
        model = factory(**args)
    except TypeError as exc:
        raise UserError(f"{path}:{spec['entry']}: cannot be built with --model-args {args}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{path}:{spec['entry']}: returned {type(model).__name__}, not a torch.nn.Module")
    return model
