"""The user's own ``nn.Module``: ``--model path/to/file.py:ClassOrFactory``.

The file is copied into the artifact (``model.py``) so the artifact reloads anywhere. A Python file
is code, so it is executed only when the user names it: on the command line that trains it, or when
loading an artifact, through ``--trust-model-code`` (or BIGMODEL_TRUST_MODEL_CODE=1). A model file
named in a TOML file (a recipe step, a ``--config`` file) is treated like one inside an artifact:
whoever wrote the file chose it, not the user, so it too needs ``--trust-model-code``.
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
    """Start one invocation's trust: ``--trust-model-code`` or not, and no file named yet (a file
    named by an earlier command in the same process must not stay trusted)."""
    global _TRUST_ALL
    _TRUST_ALL = value
    _TRUSTED.clear()


def trust_model_code_enabled() -> bool:
    """--trust-model-code (or BIGMODEL_TRUST_MODEL_CODE=1) is in effect for this invocation."""
    return _TRUST_ALL or os.environ.get("BIGMODEL_TRUST_MODEL_CODE") == "1"


def _trusted(path: Path) -> bool:
    return trust_model_code_enabled() or str(path.resolve()) in _TRUSTED


def names_model_file(reference: str) -> bool:
    """'path/to/file.py:Name' (user code) rather than a built-in architecture's name."""
    file, sep, _ = reference.rpartition(":")
    return bool(sep) and file.endswith(".py")


def require_trust_for_file_reference(reference: str, named_in: str, command_line_fix: str) -> None:
    """A model file named in a TOML file runs only with --trust-model-code, or when the user named
    the same file on the command line (``command_line_fix`` says how)."""
    path, _ = parse_reference(reference)
    if not _trusted(path):
        raise UserError(
            f"{named_in}: model = {reference!r} is Python code named in a TOML file, so it runs only if you trust "
            f"it: pass --trust-model-code (bigmodel --trust-model-code COMMAND ...) or {command_line_fix}"
        )


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
