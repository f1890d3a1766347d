"""What a valid artifact says about itself: the format's names (file names, tasks, stages) and the
layout of config.json and manifest.json, checked before anything uses them.

Every problem is reported at once, in one line (exit 2): a hostile or damaged file must not reach the
code that builds models from it. ``artifact.py`` re-exports these names; import them from there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
# A language model's graph with past key values (engine/onnx/decoder.py); over 2 GB, its weights are
# in DECODER_FILE + ".data", verified the same way.
DECODER_FILE = "decoder.onnx"
MODEL_CODE_FILE = "model.py"  # a copy of the user's model file, for --model FILE.py:Class
TASKS = ("classification", "language-modeling")
STAGES = ("train", "prune", "distill", "quantize", "export", "import")
# Entries bigmodel itself may keep in an artifact directory that are not part of the artifact
# (the output lock, for one): hidden names starting with this are neither listed nor refused.
PRIVATE_PREFIX = ".bigmodel"
# config.json and manifest.json are a few KB; a cap keeps a hostile one (or /dev/zero) from
# being read into memory. Generous: a manifest lists every file and metrics of long runs.
MAX_JSON_BYTES = 16 << 20


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
    if config.get("tokenizer") is not None:
        from .data.tokenizer import section_problems

        problems += section_problems(config["tokenizer"])
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


