"""Typed configurations, validated as a whole before any work starts.

Every option has one name, used on the command line (``--grad-accum``) and in recipe/config files
(``grad-accum`` or ``grad_accum``). Sources are layered: defaults < ``--config FILE`` < flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigErrors, UserError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
# The choices of --precision and --device; engine/core/hardware.py decides what each one means.
PRECISIONS = ("fp32", "bf16-mixed", "auto")
DEVICES = ("auto", "cpu", "cuda")

# torch.manual_seed takes seeds up to 2**64 - 1 and numpy's generators refuse negative ones; beyond
# either, the run died deep in the work with an internal error.
SEED_MAX = 2**64 - 1


def thread_limit() -> int:
    """The most --threads any command accepts: this machine's logical cores. Asked for tens of
    thousands, torch's OpenMP pool crashes the process (a segfault), and more threads than cores
    only wait on each other."""
    return os.cpu_count() or 1


def threads_problem(threads: int | None) -> str | None:
    """What is wrong with a --threads value (None: not given, the default), or None."""
    if threads is None or 1 <= threads <= thread_limit():
        return None
    return f"--threads must be between 1 and {thread_limit()} (the cores of this machine), got {threads}"


def seed_problem(seed: int) -> str | None:
    """What is wrong with a --seed value, or None."""
    if 0 <= seed <= SEED_MAX:
        return None
    return f"--seed must be between 0 and 2**64-1 ({SEED_MAX}), got {seed}"


def is_finite_number(value: Any) -> bool:
    """True for a real, finite number: options parsed as floats accept 'nan' and 'inf'."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    # what to train
    model: str = "mlp"  # registry name, or path/to/file.py:ClassOrFactory
    preset: str | None = None
    model_args: dict = field(default_factory=dict)
    # shorthands for common model arguments (mlp/cnn); they fold into model_args
    input_size: int | None = None
    hidden_size: int | None = None
    hidden_sizes: list[int] | None = None
    output_size: int | None = None
    data: str | None = None  # None: digits for classifiers, text:stdlib for gpt
    target: str | None = None  # csv class column
    tokenizer: str | None = None  # language models: a `bigmodel tokenizer train` directory; None = bytes
    augment: str | None = None  # data/augment.py's policies, e.g. "shift=1,rotate=10" or "default"
    # an artifact (or run directory) to continue from: its model section, weights and tokenizer
    init: str | None = None
    # how long
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 64
    block_size: int | None = None  # language models: context length of a training window
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1
    # where and how
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    # evaluation, early stopping, checkpoints
    eval_every: int | None = None  # steps; default once per epoch (classification) or 10 times a run
    eval_windows: int = 64  # language models: validation windows per evaluation
    patience: int | None = None  # evaluations without improvement before stopping
    min_delta: float = 0.0
    checkpoint_every: int | None = None  # steps; default: at every evaluation
    keep_checkpoints: int = 2
    skip_nonfinite: int = 0  # bad (NaN/Inf) batches to skip before stopping
    # output
    out: str = "runs/train"
    overwrite: bool = False
    resume: bool = False

    def model_overrides(self) -> dict:
        """--model-args plus the shorthand flags, as the architecture's own argument names."""
        overrides = dict(self.model_args)
        if self.input_size is not None:
            overrides["input_size"] = self.input_size
        if self.hidden_sizes is not None:
            overrides["hidden_sizes"] = list(self.hidden_sizes)
        elif self.hidden_size is not None:
            overrides["hidden_sizes"] = [self.hidden_size]
        if self.output_size is not None:
            overrides["num_classes"] = self.output_size
        return overrides

    def validate(self) -> None:
        """Collect every problem, then raise them together."""
        p: list[str] = []
        positive_ints = ("batch_size", "grad_accum", "keep_checkpoints", "eval_windows")
        for name in positive_ints:
            if getattr(self, name) < 1:
                p.append(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "eval_every", "checkpoint_every", "patience", "block_size",
                     "input_size", "hidden_size", "output_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                p.append(f"{_flag(name)} must be at least 1, got {value}")
        for problem in (threads_problem(self.threads), seed_problem(self.seed)):
            if problem:
                p.append(problem)
        if not (is_finite_number(self.lr) and self.lr > 0):
            p.append(f"--lr must be a finite positive number, got {self.lr}")
        # NaN passes every `< 0` test, and an infinite clip or min-delta silently disables the feature.
        for name in ("weight_decay", "grad_clip", "min_delta", "momentum"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value >= 0):
                p.append(f"{_flag(name)} must be a finite number, 0 or more, got {value}")
        if self.warmup_steps < 0 or self.skip_nonfinite < 0:
            p.append("--warmup-steps and --skip-nonfinite must not be negative")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"--optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            p.append(f"--schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            p.append(f"--precision {self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            p.append(f"--device {self.device!r} is unknown; choose one of {', '.join(DEVICES)}")
        if self.hidden_sizes is not None and (not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes)):
            p.append(f"--hidden-sizes must be positive widths like 512,512, got {self.hidden_sizes}")
        if self.augment is not None:
            from .data.augment import parse_augment

            try:
                parse_augment(self.augment)
            except UserError as exc:
                p.append(str(exc))
        if not isinstance(self.model_args, dict):
            p.append("--model-args must be a JSON object, e.g. '{\"hidden_sizes\": [64]}'")
        if p:
            raise ConfigErrors(p, "training options")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a value from a file against the field's type (TOML and JSON are typed)."""
    import types
    import typing

    allowed = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    if value is None:
        if type(None) in allowed:
            return None
        raise TypeError("set (it cannot be empty)")
    allowed.discard(type(None))
    (kind,) = allowed
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        ok = isinstance(value, bool)
        expected = "true or false"
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value, expected = (float(value) if ok else value), "a number"
    elif origin is str:
        ok, expected = isinstance(value, str), "a string"
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        expected = "a list of integers"
    elif origin is dict:
        ok, expected = isinstance(value, dict), "a table / JSON object"
    else:  # pragma: no cover - a field type this function does not know yet
        raise AssertionError(f"unsupported option type {kind!r} for {name}")
    if not ok:
        raise TypeError(expected)
    return value


def build_config(cls, file_values: dict | None = None, flags: dict | None = None, source: str = "config"):
    """defaults < file values < flags (None means 'not given'); unknown keys and bad types are errors."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    problems = []
    for key, value in (file_values or {}).items():
        name = key.replace("-", "_")
        if name not in names:
            problems.append(f"{source}: unknown option {key!r}")
            continue
        try:
            values[name] = _coerce(name, value, hints[name])
        except TypeError as exc:
            problems.append(f"{source}: {key} must be {exc}, got {value!r}")
    if problems:
        raise ConfigErrors(problems, source)
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return cls(**values)


# An options file or recipe is a few kilobytes; a bigger one is not what the user meant to give.
MAX_TOML_BYTES = 4 * 1024 * 1024


def read_toml(path: Path | str, table: str | None = None) -> dict:
    """A TOML options file; ``table`` picks e.g. [train] when present."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a regular file; give the path of a TOML file")
    if path.exists() and not path.is_file():
        # A FIFO or device would block or never end: refuse it up front.
        raise UserError(f"{path}: is not a regular file; give the path of a TOML file")
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_TOML_BYTES + 1)  # bounded: the size on disk may not tell the truth
        if len(raw) > MAX_TOML_BYTES:
            raise UserError(f"{path}: is larger than {MAX_TOML_BYTES // (1024 * 1024)} MiB; "
                            "a recipe or options file is a few kilobytes: give the right file")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; give the path of a TOML file") from None
    except OSError as exc:  # unreadable: permissions
        raise UserError(f"{path}: cannot be read ({exc.strerror}); give the path of a readable TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc}); fix the file") from None
    except RecursionError:
        # tomllib parses nested arrays and tables recursively: a few hundred levels exhaust the stack.
        raise UserError(f"{path}: arrays or tables are nested too deeply to read; fix the file") from None
    if table and isinstance(data.get(table), dict):
        return data[table]
    return data


def asdict(config) -> dict:
    return dataclasses.asdict(config)
