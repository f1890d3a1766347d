"""Where a command may write (storage layer): the overwrite policy.

``check_output``: an existing ``--out`` is replaced only with ``--overwrite``, and only when it is a
directory bigmodel wrote itself (an artifact whose manifest lists every file, a training run with its
``run.json``, a recipe run with its ``run-state.json``) — never ``/``, the home directory, the current
directory or one above it, a symbolic link, or a directory that is, holds or lies inside an input of
the command (docs/reliability.md, "What --overwrite will and will not delete").

The other two rules of writing an output live beside this module: one writer per output
(``output_lock.hold``), and staging plus the cleanup of killed writers' leftovers
(``output_staging``); ``output_file`` writes single files atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import UserError
from .output_lock import refuse_if_locked
from .output_staging import clean_stale, is_bookkeeping

MANIFEST_FILE = "manifest.json"  # artifact.py's name for it (artifact.py imports this module)
RUN_FILE = "run.json"  # a training run directory (engine/training/run_dir.py)
RECIPE_STATE_FILE = "run-state.json"  # a recipe run directory (cli/recipe.py)
CHECKPOINT_STATE_FILE = "state.json"  # a checkpoint directory (engine/training/checkpoint.py)
# A Hugging Face directory from `export --format hf` (engine/pretrained/hf_export.py): not an
# artifact, but its files and hashes are listed here so --overwrite may replace it.
HF_EXPORT_FILE = "bigmodel-export.json"
# A `tokenizer train` directory (data/tokenizer.py's TOKENIZER_INFO_FILE and INFO_FORMAT)
TOKENIZER_INFO_FILE = "bigmodel-tokenizer.json"
TOKENIZER_FORMAT = "bigmodel-tokenizer"
# What a training run directory may hold besides hidden staging: the trainer's files, distill's
# options and its --baseline run. ("metrics.tmp" and the recipe's ".tmp" names below are the
# temporary files of versions before output_file.atomic_path: runs they left can still be replaced.)
RUN_ENTRIES = {RUN_FILE, "metrics.jsonl", "metrics.tmp", "best", "last", "checkpoints", "distill.json", "baseline"}
# What `bigmodel run` writes into a recipe run directory besides the steps' outputs (cli/run.py).
RECIPE_REPORTS = {"compare.png", "compare.md"}
# A `bigmodel prune` output (engine/compress/prune/command.py): best/ and the fine-tuning runs.
PRUNE_ENTRIES = {"best", "finetune"}
# A `bigmodel optimize` directory (engine/optimize/search.py's STATE_FILE and CANDIDATES, and the
# files engine/optimize/report.py writes): candidates/ holds one output per step, chosen/ an artifact.
OPTIMIZE_STATE_FILE = "optimize-state.json"
OPTIMIZE_ENTRIES = {OPTIMIZE_STATE_FILE, "candidates", "chosen", "report.md", "report.html", "tradeoff.png",
                    "recipe.toml", "optimize.json"}


# --------------------------------------------------------------------------- the overwrite policy


def check_output(out: Path | str, overwrite: bool, inputs: Iterable[Path | str | None] = (),
                 lock_probe: bool = True) -> Path:
    """Fail before any work if ``out`` may not be written or replaced (see the module docstring).
    ``lock_probe=False`` only for a worker writing under the lock its launching process holds."""
    out = Path(out)
    if lock_probe:
        refuse_if_locked(out)  # before any work: the writer's own lock is taken when it writes
    _check_inputs(out, inputs)
    # Leftovers of a killed writer go first: a set-aside old output may have to come back, and then
    # it exists for the checks below.
    clean_stale(out)
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link; --out must be a real directory (choose another --out)")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; choose another --out or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; choose another --out")
    if out.exists():
        _check_replaceable(out)
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"{parent}: is not writable; choose another --out")
    return out


def _check_inputs(out: Path, inputs: Iterable[Path | str | None]) -> None:
    """--out may not be an input, hold one, or lie inside one (writing there would change it)."""
    target = out.resolve()
    for given in inputs:
        if not isinstance(given, (str, Path)) or str(given) in ("", "stdlib"):
            continue  # not a file (a built-in dataset), or a malformed record the loader will refuse
        source = Path(given).resolve()
        if source == target or target in source.parents:
            relation = "is" if source == target else "holds"
            raise UserError(f"{out}: {relation} an input of this command ({given}); writing there would destroy it; "
                            "choose another --out")
        if source in target.parents and source.is_dir():
            raise UserError(f"{out}: lies inside an input of this command ({given}); choose an --out outside it")


def _check_replaceable(out: Path) -> None:
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor):
        raise UserError(f"{out}: is the root directory; --overwrite never replaces it; choose another --out")
    if target == Path.home().resolve():
        raise UserError(f"{out}: is your home directory; --overwrite never replaces it; choose another --out")
    if target == cwd or target in cwd.parents:
        raise UserError(f"{out}: is the current directory or one above it; --overwrite never replaces it; "
                        "choose another --out")
    try:
        problem = foreign(out)
    except RecursionError:  # runs nested in runs beyond reason: not something bigmodel writes
        problem = "is nested too deeply to be one bigmodel wrote"
    if problem:
        raise UserError(f"{out}: {problem}; --overwrite replaces only a directory bigmodel wrote, so remove it "
                        "yourself or choose another --out")


def foreign(path: Path) -> str | None:
    """Why ``path`` is not a directory bigmodel wrote (None when it is, or when it is empty)."""
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    visible = [n for n in names if not is_bookkeeping(path, n)]
    if not visible:
        return None  # empty (or only bigmodel's own leftovers): nothing can be lost
    if MANIFEST_FILE in visible:
        return _foreign_artifact(path)
    if RUN_FILE in visible:
        return _foreign_run(path, visible)
    if RECIPE_STATE_FILE in visible:
        return _foreign_recipe_run(path, visible)
    if OPTIMIZE_STATE_FILE in visible:
        return _foreign_optimize_run(path, visible)
    if "best" in visible and set(visible) <= PRUNE_ENTRIES:
        return _foreign_prune_run(path, visible)
    if HF_EXPORT_FILE in visible:
        return _foreign_listed(path, path / HF_EXPORT_FILE, HF_EXPORT_FILE)
    if TOKENIZER_INFO_FILE in visible:
        return _foreign_tokenizer(path, visible)
    if CHECKPOINT_STATE_FILE in visible and path.name.startswith("step-"):
        return _foreign_listed(path, path / CHECKPOINT_STATE_FILE, CHECKPOINT_STATE_FILE)
    return (f"was not written by bigmodel (no {MANIFEST_FILE}, {RUN_FILE}, {RECIPE_STATE_FILE} or {OPTIMIZE_STATE_FILE}; "
            f"it holds {_sample(visible)})")


def _sample(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _read_object(path: Path) -> dict | None:
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _foreign_artifact(path: Path) -> str | None:
    return _foreign_listed(path, path / MANIFEST_FILE, MANIFEST_FILE)


def _foreign_listed(path: Path, record_file: Path, record_name: str) -> str | None:
    """An artifact or checkpoint: every file in it is listed (with its hash) in its record file."""
    record = _read_object(record_file)
    files = record.get("files") if record else None
    if not isinstance(files, dict):
        return f"its {record_name} cannot be read, so what it holds is unknown"
    extra = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not is_bookkeeping(dirpath, d)]
        # os.walk lists a link to a folder among the folders (and does not enter it): bigmodel writes none
        extra += [Path(dirpath, d).relative_to(path).as_posix() for d in dirnames if Path(dirpath, d).is_symlink()]
        for name in filenames:
            relative = Path(dirpath, name).relative_to(path).as_posix()
            if relative != record_name and relative not in files and not is_bookkeeping(dirpath, name):
                extra.append(relative)
    if extra:
        return f"holds files its {record_name} does not list ({_sample(sorted(extra))})"
    return None


def _foreign_tokenizer(path: Path, visible: list[str]) -> str | None:
    """A tokenizer directory holds its description and the tokenizer file it names, nothing else."""
    info = _read_object(path / TOKENIZER_INFO_FILE)
    section = info.get("tokenizer") if info and info.get("format") == TOKENIZER_FORMAT else None
    if not isinstance(section, dict):
        return f"its {TOKENIZER_INFO_FILE} cannot be read, so what it holds is unknown"
    extra = [n for n in visible if n not in (TOKENIZER_INFO_FILE, section.get("file"))]
    if extra:
        return f"holds files a tokenizer directory does not ({_sample(extra)})"
    return None


def _foreign_run(path: Path, visible: list[str]) -> str | None:
    """A training run: the trainer's own entries, each of the kind the trainer writes."""
    extra = [n for n in visible if n not in RUN_ENTRIES]
    if extra:
        return f"holds files the trainer did not write ({_sample(extra)})"
    for name in ("best", "last"):
        if (path / name).exists():
            problem = _foreign_artifact(path / name) if (path / name / MANIFEST_FILE).is_file() else "is not an artifact"
            if problem:
                return f"{name}/ {problem}"
    if (path / "baseline").exists():
        problem = foreign(path / "baseline") if (path / "baseline").is_dir() else "is not a directory"
        if problem:
            return f"baseline/ {problem}"
    checkpoints = path / "checkpoints"
    if checkpoints.exists():
        if not checkpoints.is_dir():
            return "checkpoints is not a directory"
        for name in sorted(os.listdir(checkpoints)):
            if is_bookkeeping(checkpoints, name):
                continue
            step = checkpoints / name
            problem = (_foreign_listed(step, step / CHECKPOINT_STATE_FILE, CHECKPOINT_STATE_FILE)
                       if name.startswith("step-") and step.is_dir() else "was not written by the trainer")
            if problem:
                return f"checkpoints/{name} {problem}"
    return None


def _foreign_recipe_run(path: Path, visible: list[str]) -> str | None:
    """A recipe run: its state file, and for each step it records an output directory or report."""
    state = _read_object(path / RECIPE_STATE_FILE)
    if state is None:
        return f"its {RECIPE_STATE_FILE} cannot be read, so what it holds is unknown"
    allowed = {RECIPE_STATE_FILE, RECIPE_STATE_FILE + ".tmp", *RECIPE_REPORTS}
    for step in state:
        allowed.update({step, f"{step}.json", f"{step}.tmp"})
    extra = [n for n in visible if n not in allowed]
    if extra:
        return f"holds files the recipe runner did not write ({_sample(extra)})"
    for name in visible:
        entry = path / name
        if entry.is_dir() and name in state:
            problem = foreign(entry)
            if problem:
                return f"{name}/ {problem}"
    return None


def _foreign_optimize_run(path: Path, visible: list[str]) -> str | None:
    """An optimize search: its state and reports, candidates/ of bigmodel outputs, chosen/ an artifact."""
    extra = [n for n in visible if n not in OPTIMIZE_ENTRIES]
    if extra:
        return f"holds files bigmodel optimize did not write ({_sample(extra)})"
    if (path / "candidates").exists():
        problem = _foreign_entry(path / "candidates")
        if problem:
            return problem
    chosen = path / "chosen"
    if chosen.exists():
        problem = _foreign_artifact(chosen) if (chosen / MANIFEST_FILE).is_file() else "is not an artifact"
        if problem:
            return f"chosen/ {problem}"
    return None


def _foreign_prune_run(path: Path, visible: list[str]) -> str | None:
    """A prune output: best/ (the pruned artifact) and finetune/step-K/ (the trainer's runs)."""
    problem = _foreign_artifact(path / "best") if (path / "best" / MANIFEST_FILE).is_file() else "is not an artifact"
    if problem:
        return f"best/ {problem}"
    return _foreign_entry(path / "finetune") if "finetune" in visible else None


def _foreign_entry(folder: Path) -> str | None:
    """A folder of outputs (a search's candidates, a prune's fine-tuning runs): why an entry of it
    was not written by bigmodel, or None."""
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder.name} is not a directory"
    for name in sorted(os.listdir(folder)):
        entry = folder / name
        if is_bookkeeping(folder, name):
            continue
        problem = foreign(entry) if entry.is_dir() and not entry.is_symlink() else "is not a directory bigmodel wrote"
        if problem:
            return f"{folder.name}/{name} {problem}"
    return None
