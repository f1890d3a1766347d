"""--overwrite deletes only what bigmodel wrote; one writer per output; a replaced output is swapped in
whole; leftovers of killed runs are cleaned; resume survives a damaged or moved run (issue 20,
sections 1 and 5, and the run-directory cases of 7 and 8). See docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel_cli import output_file, output_lock, output_staging, outputs
from bigmodel_cli.artifact import open_artifact
from bigmodel_cli.errors import UserError

from conftest import assert_one_error_line

PY = sys.executable
QUICK = ("--max-steps", "2", "--threads", "1")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: "nothing touched" means this is unchanged."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden_beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.fixture()
def run_copy(tmp_path, digits_mlp):
    """A copy of the session's training run, for tests that try to destroy it."""
    run = tmp_path / "t"
    shutil.copytree(digits_mlp, run)
    return run


# --------------------------------------------------------------------------- what --overwrite refuses


def test_overwrite_refuses_the_current_directory_and_its_parents(cli, tmp_path, monkeypatch):
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    (project / "notes.txt").write_text("notes")
    before = _tree(tmp_path)
    monkeypatch.chdir(project / "sub")
    for out in (".", "..", str(project)):
        assert_one_error_line(cli("train", *QUICK, "--out", out, "--overwrite"), "current directory")
    assert _tree(tmp_path) == before


def test_overwrite_refuses_home_and_root(cli, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    assert_one_error_line(cli("train", *QUICK, "--out", home, "--overwrite"), "home directory")
    assert_one_error_line(cli("train", *QUICK, "--out", "/", "--overwrite"), "root directory")
    assert (home / ".profile").read_text() == "mine"


def test_overwrite_refuses_a_directory_holding_the_training_data(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    rows = "a,b,label\n" + "".join(f"{i % 7},{i % 3},{i % 2}\n" for i in range(40))
    (tmp_path / "mydata" / "table.csv").write_text(rows)
    result = cli("train", "--data", "csv:mydata/table.csv", "--target", "label", "--out", "mydata", "--overwrite", *QUICK)
    assert_one_error_line(result, "mydata", "input")
    assert (tmp_path / "mydata" / "table.csv").read_text() == rows


def test_overwrite_refuses_to_write_over_the_commands_own_input(cli, run_copy):
    before = _tree(run_copy)
    t = str(run_copy)
    cases = [
        ("distill", "--teacher", t, "--student-config", '{"hidden_sizes":[16]}', "--out", t, "--overwrite", *QUICK),
        ("export", f"{t}/best", "--out", t, "--overwrite"),
        ("prune", t, "--sparsity", "0.5", "--out", f"{t}/best", "--overwrite"),
        ("prune", f"{t}/best", "--sparsity", "0.5", "--out", t, "--overwrite"),
        ("quantize", t, "--mode", "weight-only", "--out", t, "--overwrite"),
    ]
    for args in cases:
        assert_one_error_line(cli(*args), "input of this command")
    assert _tree(run_copy) == before


def test_a_recipe_cannot_overwrite_the_folder_it_lives_in(cli, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "r.toml"
    recipe.write_text('[run]\nout = ".."\n[[steps]]\nname = "t"\ncommand = "train"\nmax_steps = 2\n')
    before = _tree(tmp_path)
    monkeypatch.chdir(folder)
    assert_one_error_line(cli("run", "r.toml", "--overwrite"), "..")
    assert_one_error_line(cli("run", "r.toml", "--out", ".", "--overwrite"), "r.toml")  # holds the recipe
    assert _tree(tmp_path) == before


def test_overwrite_refuses_directories_bigmodel_did_not_write(cli, tmp_path, run_copy):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert_one_error_line(cli("train", *QUICK, "--out", mine, "--overwrite"), "not written by bigmodel", "thesis.tex")
    assert_one_error_line(cli("export", run_copy, "--out", mine, "--overwrite"), "not written by bigmodel")
    assert (mine / "thesis.tex").read_text() == "years of work"

    (run_copy / "notes.txt").write_text("my notes")  # a run directory with a file the trainer never writes
    assert_one_error_line(cli("train", *QUICK, "--out", run_copy, "--overwrite"), "notes.txt")
    (run_copy / "notes.txt").unlink()
    (run_copy / "best" / "extra.bin").write_bytes(b"x")  # an artifact with a file its manifest does not list
    assert_one_error_line(cli("train", *QUICK, "--out", run_copy, "--overwrite"), "extra.bin")
    assert (run_copy / "best" / "extra.bin").exists()

    link = tmp_path / "link"
    link.symlink_to(mine)
    assert_one_error_line(cli("train", *QUICK, "--out", link, "--overwrite"), "symbolic link")


def test_foreign_explains_what_is_not_ours(tmp_path, digits_mlp):
    assert outputs.foreign(digits_mlp) is None
    assert outputs.foreign(digits_mlp / "best") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert outputs.foreign(empty) is None  # nothing to lose
    recipe_run = tmp_path / "r"
    recipe_run.mkdir()
    (recipe_run / "run-state.json").write_text(json.dumps({"ev": {}}))
    (recipe_run / "ev.json").write_text("{}")
    assert outputs.foreign(recipe_run) is None
    (recipe_run / f".ev.tmp-{os.getpid()}-0123abcd").mkdir()  # bigmodel's own staging and lock
    (recipe_run / ".ev.lock").write_text("123\n")
    assert outputs.foreign(recipe_run) is None
    (recipe_run / ".ev.lock").write_text("my own lock file, with my notes")
    assert ".ev.lock" in outputs.foreign(recipe_run)
    (recipe_run / ".ev.lock").unlink()
    (recipe_run / "todo.txt").write_text("x")
    assert "todo.txt" in outputs.foreign(recipe_run)
    (recipe_run / "run-state.json").write_text("[1, 2")  # unreadable state: what it holds is unknown
    assert "cannot be read" in outputs.foreign(recipe_run)


# --------------------------------------------------------------------------- replacing is atomic


def test_overwriting_a_run_swaps_in_the_new_one_and_a_failure_keeps_the_old(cli, tmp_path, monkeypatch):
    from bigmodel_cli.engine.training import loop as train_module

    run = tmp_path / "c"
    assert cli("train", *QUICK, "--out", run).exit_code == 0
    old = _tree(run)

    real_save = train_module.save_checkpoint

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(train_module, "save_checkpoint", broken)
    assert cli("train", *QUICK, "--out", run, "--overwrite", "--seed", "7").exit_code != 0
    assert _tree(run) == old, "a failed --overwrite changed the old run"
    assert _hidden_beside(run) == [], "a failed --overwrite left its staging directory"

    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert cli("train", *QUICK, "--out", run, "--overwrite", "--seed", "7").exit_code == 0
    assert json.loads((run / "run.json").read_text())["options"]["seed"] == 7
    assert _hidden_beside(run) == []
    manifest = json.loads((run / "best" / "manifest.json").read_text())
    assert manifest["options"]["out"] == str(run) and not any("lock" in name for name in manifest["files"])
    open_artifact(run / "best")
    # The replaced run is an ordinary run: it resumes, and can be overwritten again.
    assert cli("train", *QUICK, "--out", run, "--seed", "7", "--resume").exit_code == 0
    assert cli("train", *QUICK, "--out", run, "--overwrite").exit_code == 0


def test_distill_overwrite_builds_beside_and_keeps_its_options_file(cli, run_copy, tmp_path):
    out = tmp_path / "d"
    args = ("distill", "--teacher", run_copy, "--student-config", '{"hidden_sizes":[8]}', *QUICK, "--out", out)
    assert cli(*args).exit_code == 0
    result = cli(*args, "--overwrite", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (out / "distill.json").is_file()  # written into the staging directory, swapped in with the run
    assert json.loads((out / "run.json").read_text())["options"]["seed"] == 3
    assert _hidden_beside(out) == []


def test_a_failed_recipe_overwrite_puts_the_old_run_back(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nname = "t"\ncommand = "train"\nmax_steps = 2\nthreads = 1\n')
    run = tmp_path / "r"
    assert cli("run", recipe, "--out", run).exit_code == 0
    old = _tree(run)
    failed = cli("run", recipe, "--out", run, "--overwrite", "--set", f"t.data=csv:{tmp_path}/missing.csv",
                 "--set", "t.target=label")
    assert failed.exit_code == 2, failed.output
    assert _tree(run) == old and _hidden_beside(run) == []
    assert cli("run", recipe, "--out", run, "--overwrite", "--set", "t.seed=5").exit_code == 0
    assert json.loads((run / "t" / "run.json").read_text())["options"]["seed"] == 5
    assert _hidden_beside(run) == []


# --------------------------------------------------------------------------- one writer per output

_HOLDER = """
import sys
from bigmodel_cli.output_lock import hold
lock = hold(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_locked_output_refuses_every_writer(cli, tmp_path, run_copy):
    out = tmp_path / "busy"
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nname = "t"\ncommand = "train"\nmax_steps = 2\n')
    holder = subprocess.Popen([PY, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        for args in (("train", *QUICK, "--out", out), ("train", *QUICK, "--out", out, "--overwrite"),
                     ("export", run_copy, "--out", out), ("run", recipe, "--out", out)):
            assert_one_error_line(cli(*args), "being written by another bigmodel process", f"pid {holder.pid}")
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (tmp_path / ".busy.lock").exists(), "the lock file outlived its holder"
    (tmp_path / ".busy.lock").write_text(f"{_dead_pid()}\n")  # left by a killed writer: the kernel dropped its lock
    assert cli("train", *QUICK, "--out", out).exit_code == 0
    assert not (tmp_path / ".busy.lock").exists()


_FIRST_WRITER = """
import sys, time
from pathlib import Path
from bigmodel_cli.engine.training import loop as engine
real, signal_dir = engine.save_checkpoint, Path(sys.argv[1])

def paused(*args, **kwargs):  # hold the run mid-way until the test says go
    (signal_dir / "waiting").write_text("1")
    deadline = time.time() + 120
    while not (signal_dir / "go").exists() and time.time() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)

engine.save_checkpoint = paused
from bigmodel_cli.cli import main
sys.argv = ["bigmodel"] + sys.argv[2:]
main()
"""


def test_two_trainings_into_one_output_the_second_is_refused(tmp_path):
    out = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([PY, "-c", _FIRST_WRITER, str(tmp_path), "train", "--max-steps", "6",
                              "--checkpoint-every", "3", "--threads", "1", "--out", str(out), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "waiting").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        for extra in ((), ("--overwrite",)):
            second = subprocess.run([PY, "-m", "bigmodel_cli", "train", "--max-steps", "6", "--seed", "7",
                                     "--threads", "1", "--out", str(out), *extra],
                                    capture_output=True, text=True, env=env, timeout=120)
            lines = [line for line in second.stderr.splitlines() if line.strip()]
            assert second.returncode == 2 and len(lines) == 1, second.stderr
            assert "being written by another bigmodel process" in lines[0] and f"pid {first.pid}" in lines[0]
        (tmp_path / "go").write_text("1")
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr.decode()[-2000:]
    assert json.loads(stdout)["steps"] == 6
    assert json.loads((out / "run.json").read_text())["options"]["seed"] == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 7))
    open_artifact(out / "last")


def test_a_killed_overwrite_leaves_the_old_run_and_its_staging_is_cleaned_next_time(cli, tmp_path):
    out = tmp_path / "c"
    assert cli("train", *QUICK, "--out", out).exit_code == 0
    old = _tree(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([PY, "-c", _FIRST_WRITER, str(tmp_path), "train", *QUICK, "--seed", "7",
                               "--out", str(out), "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "waiting").exists():  # mid-run: the first checkpoint is being written
            assert killed.poll() is None and time.time() < deadline, killed.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait()
    assert _tree(out) == old, "a killed --overwrite changed the old run"
    assert [name.split("-")[1] for name in _hidden_beside(out) if ".tmp-" in name] == [str(killed.pid)]
    # The next command that writes beside it (a later process: the staging is older than it) cleans up.
    later = subprocess.run([PY, "-m", "bigmodel_cli", "train", *QUICK, "--out", str(tmp_path / "other")],
                           capture_output=True, text=True, env=env, timeout=120)
    assert later.returncode == 0, later.stderr
    assert [n for n in _hidden_beside(out) if ".tmp-" in n] == [] and _tree(out) == old


# --------------------------------------------------------------------------- leftovers of killed runs


def _dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


def _old(path: Path) -> Path:
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


def test_stale_staging_is_cleaned_beside_the_next_write_and_nothing_else(tmp_path, digits_mlp):
    from bigmodel_cli.artifact import save_torch_artifact

    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".a.tmp-{dead}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    _old(stale)
    kept = [tmp_path / f".a.tmp-{live}-0123abcd",  # its writer is alive
            tmp_path / ".a.tmp-0123abcd",  # no owner recorded (written by an older bigmodel)
            tmp_path / ".a.tmpfoo", tmp_path / "a.tmp-1-0123abcd", tmp_path / f".a.tmp-{dead}-xyz"]  # not our names
    other_output = tmp_path / f".b.tmp-{dead}-0123abcd"  # a dead writer's, beside another output: also removed
    other_output.mkdir()
    _old(other_output)
    for path in kept:
        path.mkdir()
        _old(path)
    fresh = tmp_path / f".a.tmp-{dead}-4567abcd"  # newer than this command: the pid may be reused
    fresh.mkdir()
    os.utime(fresh, (time.time() + 60, time.time() + 60))
    kept.append(fresh)

    artifact = open_artifact(digits_mlp)
    save_torch_artifact(tmp_path / "a", artifact.build_model(), config=artifact.config, stage="train")
    assert not stale.exists() and not other_output.exists()
    assert all(path.exists() for path in kept)
    open_artifact(tmp_path / "a")


def test_a_swap_cut_between_its_renames_gets_the_old_output_back(tmp_path, digits_mlp):
    aside = tmp_path / f".a.old-{_dead_pid()}-0123abcd"
    shutil.copytree(digits_mlp / "best", aside)
    _old(aside)
    output_staging.clean_stale(tmp_path / "a")
    assert not aside.exists()
    open_artifact(tmp_path / "a")


def test_a_killed_quantize_leaves_work_files_that_the_next_one_removes(cli, tmp_path, monkeypatch, digits_mlp):
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    dead = _dead_pid()
    stale = temp / f"bigmodel-quantize-{dead}-abc"
    stale.mkdir()
    (stale / "int8.onnx").write_bytes(b"x" * 100)
    _old(stale)
    other = temp / "bigmodel-quantize-k3j4"  # no pid: not provably ours to remove
    other.mkdir()
    _old(other)
    result = cli("quantize", digits_mlp, "--mode", "weight-only", "--out", tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and other.exists()
    assert [p.name for p in temp.iterdir()] == [other.name]


# --------------------------------------------------------------------------- resume and run files


def test_resume_ignores_how_the_output_is_spelled_and_where_the_run_moved(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("train", "--max-steps", "4", "--checkpoint-every", "2", "--threads", "1")
    assert cli(*args, "--out", "c").exit_code == 0
    result = cli(*args, "--out", tmp_path / "c", "--resume")  # absolute now
    assert result.exit_code == 0, result.output
    (tmp_path / "c").rename(tmp_path / "moved")
    result = cli(*args, "--out", "moved", "--resume")
    assert result.exit_code == 0, result.output


def test_a_damaged_run_file_or_checkpoint_state_is_one_line_on_resume(cli, tmp_path, run_copy):
    resume = ("train", "--out", run_copy, "--resume")
    run_file = run_copy / "run.json"
    good = run_file.read_text()
    for damaged in (good[: len(good) // 2], "{}", "[]", '{"options": 3}', ""):
        run_file.write_text(damaged)
        assert_one_error_line(cli(*resume), "run.json")
    run_file.write_text(good)

    state_file = sorted((run_copy / "checkpoints").glob("step-*"))[-1] / "state.json"
    state = json.loads(state_file.read_text())
    for key, value in (("step", "abc"), ("best", "x"), ("optimizer", []), ("files", {"a": 1}), ("step", True)):
        state_file.write_text(json.dumps({**state, key: value}))
        assert_one_error_line(cli(*resume), "state.json")
    state_file.write_text("{")
    assert_one_error_line(cli(*resume), "checkpoint")


def test_output_under_proc_is_one_line(cli):
    assert_one_error_line(cli("train", *QUICK, "--out", "/proc/bigmodel-x"), "/proc/bigmodel-x")


def test_run_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    output_file.write_json_atomic(path, {"options": {"seed": 0}})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        output_file.write_json_atomic(path, {"options": {"seed": 1}})
    assert json.loads(path.read_text()) == {"options": {"seed": 0}}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_lock_is_reentrant_in_one_process_and_removed_when_released(tmp_path):
    out = tmp_path / "x"
    (tmp_path / "sub").mkdir()
    with output_lock.hold(out):
        with output_lock.hold(tmp_path / "sub" / ".." / "x"):  # the same output, spelled another way
            pass
        assert (tmp_path / ".x.lock").exists()
    assert not (tmp_path / ".x.lock").exists()
    with pytest.raises(UserError, match="root directory"):
        output_lock.hold("/")
