"""``bigmodel run RECIPE``: an ordered list of commands, each writing ``RUN_DIR/<step-name>``.

A step is the command line it stands for. Its options are checked against the real command's
parameters (names and types) before anything runs, so a recipe and the CLI cannot drift apart:
there is no second list of options to keep in sync. Each step then runs through the same entry
point as the command line.

This module reads and checks a recipe; ``recipe.py`` runs it.

Reruns are cheap: a step is skipped only when it completed, with exactly this fingerprint — its
command line plus the manifests of the artifacts it reads — and its output is complete and valid
(manifest hashes match). A step that failed is recorded as incomplete, so a rerun runs it again
rather than passing off the previous output as its result. A training step that crashed is
continued with ``--resume``. Changing a step reruns it and, through the fingerprints, everything
downstream of it.

A model file named in the recipe (``model = "net.py:Net"``) is code chosen by whoever wrote the
recipe, so the run refuses it unless ``--trust-model-code`` is given (or the user names it on the
command line with ``--set``); that trust then holds for every step of the run.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.core.recipe_state import STATE_FILE
from ..errors import ConfigErrors
from ..models.user import names_model_file

# Commands that write an artifact (or a training run) directory: the runner gives them --out.
ARTIFACT_COMMANDS = ("train", "prune", "distill", "export", "quantize")
# Commands that only report: their --json output is saved as RUN_DIR/<name>.json.
REPORT_COMMANDS = ("eval", "info", "predict", "generate", "explain")
# Steps that write a directory that is not an artifact, and the command line each stands for: a
# `tokenizer` step trains a BPE tokenizer (`bigmodel tokenizer train`) that a later train step
# reads with tokenizer = "STEP". It is not a model, so compare leaves it out.
DIRECTORY_COMMANDS = {"tokenizer": ("tokenizer", "train")}
STEP_COMMANDS = ARTIFACT_COMMANDS + REPORT_COMMANDS + tuple(DIRECTORY_COMMANDS)
# Options the runner sets itself.
MANAGED = {"out", "overwrite", "json_out", "resume", "help"}
# Step keys that name another step's output.
REFERENCES = {"from": None, "teacher": "--teacher", "student": "--student", "compare": "--compare", "init": "--init",
              "tokenizer": "--tokenizer"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Files the run itself keeps in RUN_DIR: no step's output may take one of these names.
RUN_FILES = (STATE_FILE, STATE_FILE + ".tmp", "compare.png", "compare.md")


@dataclass
class Step:
    name: str
    command: str
    options: dict[str, Any]
    refs: dict[str, str] = field(default_factory=dict)  # key -> earlier step name
    # The command's arguments after the artifact (predict's INPUT), parameter name -> value.
    arguments: dict[str, Any] = field(default_factory=dict)
    # Model files (path.py:Name) that the recipe file names, rather than the user's --set.
    code_named_in_toml: list[str] = field(default_factory=list)

    @property
    def writes_artifact(self) -> bool:
        return self.command in ARTIFACT_COMMANDS

    @property
    def writes_directory(self) -> bool:
        """It writes RUN_DIR/NAME with --out: an artifact, or a directory such as a tokenizer's."""
        return self.writes_artifact or self.command in DIRECTORY_COMMANDS

    @property
    def command_words(self) -> tuple[str, ...]:
        """The words that name its command on the command line (`tokenizer train`)."""
        return DIRECTORY_COMMANDS.get(self.command, (self.command,))

    @property
    def output_name(self) -> str:
        """Its output in RUN_DIR: a directory for an artifact (or tokenizer) step, NAME.json for a report step."""
        return self.name if self.writes_directory else f"{self.name}.json"


@dataclass
class Recipe:
    path: Path
    steps: list[Step]
    out: str | None = None
    description: str = ""
    # [inputs]: name → an existing artifact outside the run (absolute path), read like a step's output
    inputs: dict[str, str] = field(default_factory=dict)


def command_group():
    import typer

    from . import app

    return typer.main.get_command(app)


def step_command(group, command: str):
    """The click command a step's ``command`` stands for (a `tokenizer` step: `tokenizer train`)."""
    for word in DIRECTORY_COMMANDS.get(command, (command,)):
        group = group.commands[word]
    return group


def command_params(command) -> dict[str, Any]:
    """Option name (python name) → the command's parameter, with ``kind`` set to its Python type."""
    import inspect
    import typing

    hints = {}
    if command.callback is not None:
        for name, parameter in inspect.signature(command.callback, eval_str=True).parameters.items():
            kind = parameter.annotation
            if typing.get_origin(kind) is typing.Annotated:
                kind = typing.get_args(kind)[0]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if typing.get_origin(kind) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
                kind = args[0]
            hints[name] = typing.get_origin(kind) or kind
    params = {}
    for p in command.params:
        p.kind = hints.get(p.name, str)
        params[p.name] = p
    return params


def _argument_key(param) -> str:
    """The recipe key for a command argument after the artifact: its metavar (INPUT → input)."""
    return (param.metavar or param.name).strip("[].").lower()


def _flag(param) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else param.opts[0]


def _type_problem(param, value: Any) -> str | None:
    """None if ``value`` (from TOML) fits the parameter, else what it should be."""
    kind = param.kind
    if kind is bool or getattr(param, "is_flag", False):
        return None if isinstance(value, bool) else "true or false"
    if kind is list or getattr(param, "multiple", False):
        items = value if isinstance(value, list) else [value]
        return None if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items) else "a list of strings"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(value, dict):  # JSON options such as model-args, student-config
        return None
    if isinstance(value, list):  # comma lists such as hidden-sizes, dynamic
        return None if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value) else "a list"
    return None if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "a string"


def parse_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe; every problem is reported at once."""
    from ..config import read_toml

    path = Path(path)
    data = read_toml(path)
    problems: list[str] = []
    for key in data:
        if key not in ("run", "steps", "description", "inputs"):
            problems.append(f"unknown top-level key {key!r} (a recipe has [run], [inputs], description and [[steps]])")
    run = data.get("run", {})
    if not isinstance(run, dict) or any(k not in ("out",) for k in run):
        problems.append("[run] may only set out = \"RUN_DIR\"")
        run = {}
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps or not all(isinstance(s, dict) for s in raw_steps):
        raise ConfigErrors(problems + ["a recipe needs at least one [[steps]] table"], f"recipe {path}")
    from_command_line = _apply_overrides(raw_steps, overrides or [], problems)
    inputs = _read_inputs(data.get("inputs", {}), path, problems)

    group = command_group()
    steps: list[Step] = []
    seen: list[str] = []
    outputs: dict[str, str] = {name.casefold(): "the run itself" for name in RUN_FILES}
    for index, raw in enumerate(raw_steps, start=1):
        raw = dict(raw)
        name = raw.pop("name", None)
        where = f"step {index}" + (f" ({name})" if isinstance(name, str) else "")
        command = raw.pop("command", None)
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"{where}: needs a name made of letters, digits, '-', '_' or '.'")
            name = f"#{index}"
        elif name in seen:
            problems.append(f"{where}: the name {name!r} is used twice")
        elif name in inputs:
            problems.append(f"{where}: the name {name!r} is also an [inputs] name; rename one of them")
        elif command in STEP_COMMANDS:
            _claim_output(Step(name, command, {}), outputs, where, problems)
        if command not in STEP_COMMANDS or command not in group.commands:
            known = [c for c in STEP_COMMANDS if c in group.commands]
            problems.append(f"{where}: unknown command {command!r} (a step runs one of: {', '.join(known)})")
            seen.append(name)
            continue
        params = command_params(step_command(group, command))
        refs: dict[str, str] = {}
        for key in list(raw):
            if key not in REFERENCES:
                continue
            if key == "init" and (command != "train" or raw[key] not in seen):
                continue  # train's --init PATH outside the recipe: an ordinary option
            target = raw.pop(key)
            if not isinstance(target, str):
                problems.append(f"{where}: {key} must name an earlier step")
            elif target == name:
                problems.append(f"{where}: {key} = {target!r} refers to itself (a cycle)")
            elif target in inputs and target not in seen:
                refs[key] = inputs[target]  # an absolute path: RUN_DIR / it is itself
            elif target not in seen:
                later = any(isinstance(s, dict) and s.get("name") == target for s in raw_steps)
                problems.append(f"{where}: {key} = {target!r} names no earlier step"
                                + (" (it comes later: steps run in order, so this would be a cycle)" if later else ""))
            elif REFERENCES[key] and not any(REFERENCES[key] in p.opts for p in params.values()):
                problems.append(f"{where}: {command} has no option {REFERENCES[key]}, so {key} = {target!r} "
                                "cannot be passed to it; remove it")
            else:
                refs[key] = target
        positional = [p for p in params.values() if p.param_type_name == "argument"]
        # An artifact command's first argument is the artifact (from = "STEP"); a directory
        # command's arguments are all the recipe's to give (the tokenizer's data = "text:...").
        reads_artifact = bool(positional) and command not in DIRECTORY_COMMANDS
        arguments = _take_arguments(raw, positional[1:] if reads_artifact else positional, where, command, problems)
        if reads_artifact and "from" not in refs:
            problems.append(f"{where}: {command} needs from = \"STEP\" (the step whose output it reads)")
        if command == "distill" and "teacher" not in refs and "from" in refs:
            refs["teacher"] = refs.pop("from")
        if command == "distill" and "teacher" not in refs:
            problems.append(f"{where}: distill needs teacher = \"STEP\"")
        options: dict[str, Any] = {}
        for key, value in raw.items():
            pname = key.replace("-", "_")
            param = params.get(pname) or params.get(f"{pname}_out")
            if param is None or param.name in MANAGED or param.param_type_name == "argument":
                reason = "set by `bigmodel run` itself" if param is not None else f"{command} has no option --{key.replace('_', '-')}"
                problems.append(f"{where}: {key!r} is not allowed ({reason})")
                continue
            expected = _type_problem(param, value)
            if expected:
                problems.append(f"{where}: {key} must be {expected}, got {value!r}")
                continue
            options[param.name] = value
        code = [value for key, value in options.items()
                if key == "model" and isinstance(value, str) and names_model_file(value)
                and (name, key) not in from_command_line]
        steps.append(Step(name=name, command=command, options=options, refs=refs, arguments=arguments,
                          code_named_in_toml=code))
        seen.append(name)
    if problems:
        raise ConfigErrors(problems, f"recipe {path}")
    out = run.get("out")
    return Recipe(path=path, steps=steps, out=out if isinstance(out, str) else None,
                  description=str(data.get("description", "")), inputs=inputs)


def _read_inputs(raw: Any, path: Path, problems: list[str]) -> dict[str, str]:
    """[inputs] NAME = "PATH": artifacts the recipe starts from instead of training them (`bigmodel
    optimize` writes such a recipe). A relative path is relative to the recipe file, so the recipe
    means the same from any directory; the path is stored absolute."""
    if not isinstance(raw, dict):
        problems.append('[inputs] must be a table of NAME = "PATH TO AN ARTIFACT"')
        return {}
    inputs = {}
    for name, value in raw.items():
        if not _NAME.match(name):
            problems.append(f"[inputs] {name!r}: a name is made of letters, digits, '-', '_' or '.'")
        elif not isinstance(value, str) or not value:
            problems.append(f"[inputs] {name} must be the path of an artifact, got {value!r}")
        else:
            inputs[name] = str((path.parent / value).resolve())
    return inputs


def _claim_output(step: Step, outputs: dict[str, str], where: str, problems: list[str]) -> None:
    """Two steps must not write the same file or directory (report step x writes x.json, so an
    artifact step named x.json would take it), nor one of the run's own files. Compared without case:
    on a case-insensitive disk, Train and train are one directory."""
    key = step.output_name.casefold()
    owner = outputs.get(key)
    if owner == "the run itself":
        problems.append(f"{where}: its output RUN_DIR/{step.output_name} is a file the run keeps itself; rename the step")
    elif owner is not None:
        problems.append(f"{where}: its output RUN_DIR/{step.output_name} is also the output of step {owner!r} "
                        "(a report step NAME writes NAME.json); rename one of them")
    else:
        outputs[key] = step.name


def _take_arguments(raw: dict, params: list, where: str, command: str, problems: list[str]) -> dict[str, Any]:
    """The command's arguments after the artifact (predict's INPUT), given as e.g. input = "x.npy";
    a required one that is missing is a problem now, not a failure when the step runs."""
    arguments: dict[str, Any] = {}
    for param in params:
        key = _argument_key(param)
        if key not in raw:
            if param.required:
                problems.append(f"{where}: {command} needs {key} = \"PATH\" (its {key.upper()} argument)")
            continue
        value = raw.pop(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{where}: {key} must be a non-empty string, got {value!r}")
            continue
        arguments[param.name] = value
    return arguments


def _apply_overrides(raw_steps: list[dict], overrides: list[str], problems: list[str]) -> set[tuple[str, str]]:
    """--set STEP.OPTION=VALUE (VALUE in TOML syntax, bare words as strings). Returns the
    (step, option) pairs set, which the user named on the command line."""
    by_name = {s.get("name"): s for s in raw_steps}
    given: set[tuple[str, str]] = set()
    for item in overrides:
        target, eq, value = item.partition("=")
        step, dot, key = target.partition(".")
        if not eq or not dot or not key:
            problems.append(f"--set {item!r}: write it as STEP.OPTION=VALUE")
            continue
        if step not in by_name:
            problems.append(f"--set {item!r}: no step named {step!r}")
            continue
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        except RecursionError:  # tomllib recurses per level of nesting
            problems.append(f"--set {target}=...: the value is nested too deeply")
            continue
        by_name[step][key] = parsed
        given.add((step, key.replace("-", "_")))
    return given


def _to_argv_value(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, list):
        return [",".join(str(v) for v in value)]
    return [str(value)]


def step_argv(step: Step, run_dir: Path, params: dict) -> list[str]:
    """The exact command line a step stands for (without --overwrite/--resume)."""
    argv = list(step.command_words)
    if "from" in step.refs:
        argv.append(str(run_dir / step.refs["from"]))
    for key, target in step.refs.items():
        if key != "from":
            argv += [REFERENCES[key], str(run_dir / target)]
    for name, value in step.options.items():
        param = params[name]
        flag = _flag(param)
        if getattr(param, "is_flag", False) or isinstance(value, bool):
            if value:
                argv.append(flag)
            elif getattr(param, "secondary_opts", None):
                argv.append(param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for item in value if isinstance(value, list) else [value]:
                argv += [flag, str(item)]
        else:
            argv += [flag, *_to_argv_value(value)]
    if step.writes_directory:
        argv += ["--out", str(run_dir / step.name)]
    elif "json_out" in params:
        argv.append("--json")
    if step.arguments:
        # After "--", so an input whose name starts with "-" is still read as the input.
        argv += ["--", *(str(step.arguments[p.name]) for p in params.values() if p.name in step.arguments)]
    return argv
