"""Where a command may write, and how it claims the place (storage layer).

Three rules live here and nowhere else (docs/reliability.md, "What --overwrite will and will not
delete"):

- ``check_output``: an existing ``--out`` is replaced only with ``--overwrite``, and only when it is a
  directory bigmodel wrote itself (an artifact whose manifest lists every file, a training run with
  its ``run.json``, a recipe run with its ``run-state.json``) — never ``/``, the home directory, the
  current directory or one above it, a symbolic link, or a directory that is, holds or lies inside an
  input of the command.
- ``hold``: one writer per output. An exclusive, non-blocking ``flock`` on a hidden ``.NAME.lock``
  beside the output; the kernel drops it when the process dies, so a crash never leaves a stale lock.
- ``clean_stale``: hidden staging (``.NAME.tmp-PID-*``) and set-aside (``.NAME.old-PID-*``) directories
  whose process is gone are removed when a command next writes beside them; nothing else is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Iterable

from .errors import UserError

MANIFEST_FILE = "manifest.json"  # artifact.py's name for it (artifact.py imports this module)
RUN_FILE = "run.json"  # a training run directory (engine/training/run_dir.py)
RECIPE_STATE_FILE = "run-state.json"  # a recipe run directory (cli/recipe.py)
CHECKPOINT_STATE_FILE = "state.json"  # a checkpoint directory (engine/checkpoint.py)
# A `tokenizer train` directory (data/tokenizer.py's TOKENIZER_INFO_FILE and INFO_FORMAT)
TOKENIZER_INFO_FILE = "bigmodel-tokenizer.json"
TOKENIZER_FORMAT = "bigmodel-tokenizer"
# What a training run directory may hold besides hidden staging: the trainer's files, distill's
# options and its --baseline run.
RUN_ENTRIES = {RUN_FILE, "metrics.jsonl", "metrics.tmp", "best", "last", "checkpoints", "distill.json", "baseline"}
# What `bigmodel run` writes into a recipe run directory besides the steps' outputs (cli/run.py).
RECIPE_REPORTS = {"compare.png", "compare.md"}
# Staging and set-aside names carry the writer's pid, so a leftover can be told from a live one.
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")
_LEGACY_HIDDEN = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")  # before pids were recorded
_LOCK = re.compile(r"^\..+\.lock$")
# When this command started: a staging directory newer than this may belong to a process that
# reused a dead writer's pid in the meantime, so it is left alone.
STARTED = time.time()


# --------------------------------------------------------------------------- names


def staging_path(out: Path) -> Path:
    """A fresh hidden name beside ``out`` for building its replacement."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def aside_path(out: Path) -> Path:
    """A fresh hidden name beside ``out`` for the old output while the new one moves in."""
    return out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def lock_path(out: Path) -> Path:
    """``.NAME.lock`` in the output's folder, spelled canonically: one output, one lock file name,
    however --out was written (the in-process registry of held locks is keyed by it)."""
    absolute = Path(os.path.abspath(out))
    return Path(os.path.realpath(absolute.parent)) / f".{absolute.name}.lock"


def is_bookkeeping(folder: Path | str, name: str) -> bool:
    """A hidden staging, set-aside or lock entry that bigmodel itself creates beside its outputs. A
    lock file counts only while it holds nothing but a pid, so a user's own ``.something.lock`` is
    not taken for one of ours."""
    if _HIDDEN.match(name) or _LEGACY_HIDDEN.match(name):
        return True
    if not _LOCK.match(name):
        return False
    path = Path(folder) / name
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 32:
            return False
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return text == "" or text.isdigit()


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
    if TOKENIZER_INFO_FILE in visible:
        return _foreign_tokenizer(path, visible)
    if CHECKPOINT_STATE_FILE in visible and path.name.startswith("step-"):
        return _foreign_listed(path, path / CHECKPOINT_STATE_FILE, CHECKPOINT_STATE_FILE)
    return (f"was not written by bigmodel (no {MANIFEST_FILE}, {RUN_FILE} or {RECIPE_STATE_FILE}; "
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


# --------------------------------------------------------------------------- one writer per output


class OutputLock:
    """An exclusive flock on ``.NAME.lock`` beside an output. Re-entrant within a process (a recipe
    step, a nested save): only the outermost release unlocks."""

    _held: dict[str, "OutputLock"] = {}

    def __init__(self, out: Path, fd: int, path: Path, created: list[Path]):
        self.out, self.fd, self.path, self.count = out, fd, path, 1
        self.created = created  # folders made for the lock file, removed on release if still empty

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        OutputLock._held.pop(str(self.path), None)
        # Unlinked while still locked: a waiter that opened the old file sees, after locking it,
        # that the name now points elsewhere, and starts again (see ``hold``).
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        _remove_empty(self.created)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(out: Path | str) -> OutputLock:
    """Take the output's lock, or fail with one line naming the process that has it."""
    out = Path(out)
    if not Path(os.path.abspath(out)).name:
        raise UserError(f"{out}: is the root directory; choose another --out")
    path = lock_path(out)
    held = OutputLock._held.get(str(path))
    if held is not None:
        held.count += 1
        return held
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_create(out, exc) from None
    try:
        return _lock(out, path, created)
    except BaseException:
        _remove_empty(created)
        raise


def _lock(out: Path, path: Path, created: list[Path]) -> OutputLock:
    """hold's loop: open, lock, and check that the name still points at what was locked."""
    while True:
        try:
            # O_NOFOLLOW: a lock name planted as a link must not make us truncate what it points at
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise _cannot_create(out, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{path}: is not a regular file (bigmodel's lock for {out.name}); remove it or choose "
                            "another --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{out}: cannot lock the output ({exc.strerror}); choose another --out") from None
            who = f" (pid {owner})" if owner else ""
            raise UserError(f"{out}: is being written by another bigmodel process{who}; wait for it or choose "
                            "another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and removed it between our open and our lock
    with contextlib.suppress(OSError):  # the pid only names the holder in a refusal; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    lock = OutputLock(out, fd, path, created)
    OutputLock._held[str(path)] = lock
    return lock


def _cannot_create(out: Path, exc: OSError) -> UserError:
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{Path(os.path.abspath(out)).parent}: is not writable; choose another --out")
    return UserError(f"{out}: cannot create the output ({exc.strerror}); choose another --out")


def _remove_empty(directories: list[Path]) -> None:
    """Remove the folders made for a lock file if nothing was written into them (a refused or failed
    command leaves no trace); a folder that holds anything stays."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def refuse_if_locked(out: Path) -> None:
    """Fail if another process holds the output's lock; creates nothing."""
    path = lock_path(out)
    if not Path(os.path.abspath(out)).name or str(path) in OutputLock._held:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # no lock file: nobody is writing there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _read_pid(fd)
        who = f" (pid {owner})" if owner else ""
        raise UserError(f"{out}: is being written by another bigmodel process{who}; wait for it or choose "
                        "another --out") from None
    finally:
        os.close(fd)  # and with it the probe's lock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# --------------------------------------------------------------------------- moving into place


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is set aside first and removed only once the
    new one is in place (a crash in between leaves it as ``.NAME.old-*``, restored by ``clean_stale``)."""
    if out.exists():
        old = aside_path(out)
        out.rename(old)
        staging.rename(out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    fsync_dir(out.parent)


def write_json_atomic(path: Path, data) -> None:
    """Write a small JSON file so that a crash or a full disk leaves the old one or the new one,
    never an empty or half-written one."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- leftovers of killed runs


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path | str) -> list[Path]:
    """Beside ``out`` (in its folder): remove the staging directories whose writer is gone, and put
    back a set-aside old output that a killed swap left without its replacement. Only names of the
    form ``.NAME.tmp-PID-XXXXXXXX`` / ``.NAME.old-PID-XXXXXXXX`` are considered, and only when PID is
    dead and the entry is older than this command. Returns what was removed."""
    out = Path(out)
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _HIDDEN.match(entry.name)
        if not match or pid_alive(int(match["pid"])):
            continue
        try:
            if entry.is_symlink() or entry.lstat().st_mtime >= STARTED:
                continue
            owner = entry.parent / match["name"]
            if match["kind"] == "old" and not owner.exists() and not owner.is_symlink():
                entry.rename(owner)  # the swap was cut between its two renames: this is the only copy
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def clean_stale_temp(prefix: str) -> list[Path]:
    """Remove ``PREFIX<pid>-*`` work directories in the system's temp folder whose process is gone."""
    import tempfile

    pattern = re.compile(re.escape(prefix) + r"(?P<pid>\d+)-")
    removed: list[Path] = []
    root = Path(tempfile.gettempdir())
    try:
        entries = [e for e in root.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or pid_alive(int(match["pid"])):
            continue
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.lstat().st_mtime >= STARTED:
                continue
            if entry.lstat().st_uid != os.getuid():
                continue  # someone else's: not ours to remove
            shutil.rmtree(entry)
        except OSError:
            continue
        removed.append(entry)
    return removed
