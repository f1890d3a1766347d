"""The small helpers that many modules share instead of keeping a copy each: the one atomic
single-file write, the first line of a library's exception, the no-op progress callback."""

from __future__ import annotations

import json
import os

import pytest

from bigmodel_cli.errors import UserError, first_line
from bigmodel_cli.output_file import atomic_file, atomic_path, write_atomic, write_json_atomic
from bigmodel_cli.output_staging import clean_stale, is_bookkeeping


def test_write_atomic_writes_text_bytes_and_json_whole(tmp_path):
    assert write_atomic(tmp_path / "a.md", "é\n").read_text(encoding="utf-8") == "é\n"
    assert write_atomic(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert json.loads(write_json_atomic(tmp_path / "c.json", {"x": [1]}).read_text()) == {"x": [1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    # The temporary keeps the suffix (matplotlib picks the format by it) and is a name the
    # stale-leftover cleanup knows as bigmodel's own.
    assert seen[0].suffix == ".png" and is_bookkeeping(tmp_path, seen[0].name)


def test_a_killed_writers_temporary_file_is_cleaned_up(tmp_path):
    leftover = tmp_path / ".run-state.json.tmp-999999999-0123abcd.json"  # a pid that cannot be alive
    leftover.write_text("{")
    os.utime(leftover, (0, 0))  # older than this process
    assert clean_stale(tmp_path / "run-state.json") == [leftover]
    assert not leftover.exists()


def test_atomic_file_names_the_flag_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"^--plot .*cannot create its folder"):
        with atomic_file(blocker / "sub" / "p.png", "--plot"):
            pass


def test_first_line_of_an_exception():
    assert first_line(ValueError("\n  bad shape  \nTraceback noise")) == "bad shape"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(KeyError("x" * 500), limit=10) == "'xxxxxxxxx"
    assert first_line(OSError("disk\nfull"), with_type=True) == "OSError: disk"


def test_no_progress_takes_any_event():
    from bigmodel_cli.engine.core.progress import no_progress

    assert no_progress("step", loss=1.0, anything=object()) is None


def test_only_output_file_moves_a_single_file_into_place():
    """A new hand-made temp-file-and-os.replace would skip the fsync or the cleanup; use output_file."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "bigmodel_cli"
    callers = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr == "replace" and isinstance(node.value, ast.Name)
                    and node.value.id == "os"):
                callers.append(path.relative_to(src).as_posix())
    assert callers == ["output_file.py"]
