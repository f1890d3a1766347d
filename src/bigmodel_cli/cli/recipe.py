"""``bigmodel run``'s runner: the steps of a parsed recipe (``recipe_file.py``) in order, each skipped,
resumed or rerun by its fingerprint, through the CLI's own entry point; the run directory locked,
and an --overwrite'd old run set aside until the new one has finished.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..engine.core.recipe_state import STATE_FILE, load_state, save_state
from ..errors import UserError
from ..output_file import write_atomic
from .recipe_file import DIRECTORY_COMMANDS, Recipe, Step, command_group, command_params, step_argv, step_command


def _output_complete(path: Path, step: Step) -> bool:
    """The step's output exists, verifies, and (for a training run) reached its last step."""
    from ..artifact import open_artifact
    from ..data.tokenizer import open_tokenizer_dir

    if not path.exists():
        return False
    if step.command in DIRECTORY_COMMANDS:  # a tokenizer directory: complete when it loads
        try:
            open_tokenizer_dir(path)
            return True
        except UserError:
            return False
    if (path / "run.json").exists() and not (path / "last" / "manifest.json").exists():
        return False
    try:
        open_artifact(path)
        return True
    except UserError:
        return False


def _manifest_digest(path: Path) -> str:
    """What a step read, in one hash: an artifact's manifest, or a tokenizer directory's files (it
    has no manifest), so a retrained tokenizer reruns the steps that read it."""
    from ..artifact import resolve_artifact_dir, sha256_file
    from ..data.tokenizer import TOKENIZER_FILE, TOKENIZER_INFO_FILE

    if (path / TOKENIZER_INFO_FILE).is_file() and not (path / "manifest.json").exists():
        try:
            return hashlib.sha256("".join(sha256_file(path / name) for name in (TOKENIZER_FILE, TOKENIZER_INFO_FILE))
                                  .encode()).hexdigest()
        except OSError:
            return "missing"
    try:
        return sha256_file(resolve_artifact_dir(path) / "manifest.json")
    except UserError:
        return "missing"


def _fingerprint(step: Step, argv: list[str], run_dir: Path) -> str:
    inputs = {key: _manifest_digest(run_dir / target) for key, target in sorted(step.refs.items())}
    blob = json.dumps({"argv": argv, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _run_file_digest(output: Path) -> str | None:
    """sha256 of a training run's run.json (None without one): tells whose run the directory holds."""
    from ..artifact import sha256_file

    try:
        return sha256_file(output / "run.json") if (output / "run.json").is_file() else None
    except OSError:
        return None


def _decide(step: Step, previous: dict, fingerprint: str, output: Path, can_resume: bool) -> str:
    """skipped, resumed or ran. Skipped only when the step completed with exactly this fingerprint
    and its output is still whole: an attempt that failed was recorded as incomplete."""
    same = previous.get("fingerprint") == fingerprint
    done = same and previous.get("complete") is True
    if not step.writes_directory:
        return "skipped" if done and output.is_file() else "ran"
    if done and _output_complete(output, step):
        return "skipped"
    # Resume only a run this fingerprint started: after a failed attempt that never got to write,
    # the directory still holds the previous run (other options), which --resume would refuse.
    run_file = _run_file_digest(output)
    if same and can_resume and run_file is not None and (done or run_file != previous.get("replaces")):
        return "resumed"
    return "ran"


def check_model_code_trust(recipe: Recipe) -> None:
    """A model file the recipe names runs only with --trust-model-code (or when --set named it)."""
    from ..models.user import require_trust_for_file_reference

    for step in recipe.steps:
        for reference in step.code_named_in_toml:
            require_trust_for_file_reference(
                reference, f"recipe {recipe.path}, step {step.name!r}",
                f"name it on the command line yourself (--set {step.name}.model={reference})")


@dataclass
class StepOutcome:
    name: str
    command: str
    status: str  # "ran", "resumed", "skipped"
    output: Path
    argv: list[str]


def run_recipe(recipe: Recipe, run_dir: Path | str, *, overwrite: bool = False,
               announce: Callable[[int, int, Step, str, list[str]], None] | None = None) -> list[StepOutcome]:
    """Run the steps in order; skip the complete and unchanged; resume a crashed training step.

    The run directory is locked for the whole run. With --overwrite an existing run is set aside
    (``.NAME.old-*``), not deleted: it is removed when the new run has finished and put back if the
    new run fails. It cannot be built elsewhere and renamed, as the steps record the paths they read."""
    from .. import outputs
    from ..output_lock import hold
    from ..output_staging import rebuilt_in_place

    run_dir = Path(run_dir)
    check_model_code_trust(recipe)  # before anything is touched
    with hold(run_dir):
        if run_dir.exists() and not overwrite and (run_dir / STATE_FILE).exists():
            return _run_steps(recipe, run_dir, announce)  # a rerun continues the run
        outputs.check_output(run_dir, overwrite, [recipe.path])  # refuses what bigmodel did not write
        with rebuilt_in_place(run_dir, "run directory"):
            return _run_steps(recipe, run_dir, announce)


def _run_steps(recipe: Recipe, run_dir: Path,
               announce: Callable[[int, int, Step, str, list[str]], None] | None) -> list[StepOutcome]:
    """run_recipe's loop, in a locked run directory."""
    state = load_state(run_dir)
    group = command_group()
    outcomes: list[StepOutcome] = []
    for index, step in enumerate(recipe.steps, start=1):
        command = step_command(group, step.command)
        argv = step_argv(step, run_dir, command_params(command))
        fingerprint = _fingerprint(step, argv, run_dir)
        output = run_dir / step.output_name
        previous = state.get(step.name, {})
        status = _decide(step, previous, fingerprint, output, "resume" in command_params(command))
        extra = {"resumed": ["--resume"], "skipped": []}.get(
            status, ["--overwrite"] if output.exists() and step.writes_directory else [])
        full = _with_flags(argv, extra)
        if announce:
            announce(index, len(recipe.steps), step, status, full)
        if status != "skipped":
            # Recorded before running: if this attempt fails, the step is incomplete with this
            # fingerprint, so the rerun runs it again (a training run it started is resumed).
            replaces = _run_file_digest(output) if status == "ran" else previous.get("replaces")
            state[step.name] = {"fingerprint": fingerprint, "argv": argv, "complete": False, "replaces": replaces}
            save_state(run_dir, state)
            _invoke(group, full, output if not step.writes_directory else None, step)
            # Inputs may have been rewritten by this very run: fingerprint what was actually read.
            state[step.name] = {"fingerprint": _fingerprint(step, argv, run_dir), "argv": argv, "complete": True}
            save_state(run_dir, state)
        outcomes.append(StepOutcome(step.name, step.command, status, output, argv))
    return outcomes


def _with_flags(argv: list[str], flags: list[str]) -> list[str]:
    """``argv`` plus the runner's --overwrite/--resume, which go before a ``--`` (after it they
    would be read as the step's arguments, e.g. a tokenizer step's data)."""
    if "--" not in argv:
        return argv + flags
    cut = argv.index("--")
    return argv[:cut] + flags + argv[cut:]


def _invoke(group, argv: list[str], report_file: Path | None, step: Step) -> None:
    """Run one command through the CLI's own entry point; its failure is the run's failure,
    reported as one line that names the step."""
    import contextlib
    import io

    from . import BigModelGroup, describe_failure
    from ..errors import BigModelError
    from ..models.user import trust_model_code_enabled

    import sys

    # A report step's stdout is its result (saved); an artifact step's tables are progress for the
    # person watching, so they go to stderr and stdout stays the run's own result (or JSON).
    buffer = io.StringIO()
    # Each step starts a new invocation, which resets trust: `bigmodel --trust-model-code run`
    # keeps it for every step (the export after a user-model train loads that model's code).
    if trust_model_code_enabled():
        argv = ["--trust-model-code", *argv]
    BigModelGroup.pass_through = True
    try:
        with contextlib.redirect_stdout(buffer if report_file else sys.stderr):
            code = group.main(args=argv, prog_name="bigmodel", standalone_mode=False)
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("typer", "click"):
            raise
        message, code = describe_failure(exc)
        error = BigModelError(f"step {step.name!r} ({step.command}): {message}; fix it and rerun (finished steps are skipped)")
        error.exit_code = code
        raise error from exc
    finally:
        BigModelGroup.pass_through = False
    if code not in (None, 0):
        error = BigModelError(f"step {step.name!r} ({step.command}) exited with code {code}")
        error.exit_code = code
        raise error
    if report_file is not None:
        # The temporary name is dot-first: no step's output can have it (step names start with a
        # letter or digit).
        write_atomic(report_file, buffer.getvalue())


def artifact_outputs(recipe: Recipe, run_dir: Path) -> list[tuple[str, Path]]:
    """(step name, output dir) of the steps that wrote artifacts, in recipe order."""
    return [(s.name, run_dir / s.name) for s in recipe.steps if s.writes_artifact and (run_dir / s.name).exists()]
