"""Malformed command-line values and data, and the files compare/plot write: each mistake is one
`error:` line with exit code 2 (never an internal error, a crash or a silent success), and no
existing file is replaced without --overwrite or left half-written. See docs/reliability.md,
"Malformed input"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line

CORES = os.cpu_count() or 1
SEED_MAX = 2**64 - 1
QUICK_TRAIN = ("train", "--hidden-sizes", "8", "--max-steps", "1")


# ------------------------------------------------------------------ --threads and --seed


def test_threads_in_the_tens_of_thousands_is_one_line_not_a_segfault(digits_mlp):
    # In a subprocess: the regression is a segfault (exit 139), which would take the test runner with it.
    result = subprocess.run([sys.executable, "-m", "bigmodel_cli", "eval", str(digits_mlp), "--threads", "100000"],
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: --threads must be between 1 and") and "got 100000" in errors[0]


@pytest.mark.parametrize("threads", ["0", str(CORES + 1)])
@pytest.mark.parametrize("command", ["train", "eval", "explain", "generate"])
def test_threads_outside_one_to_the_cores_are_refused(cli, tmp_path, digits_mlp, tiny_gpt, command, threads):
    args = {
        "train": [*QUICK_TRAIN, "--out", tmp_path / "r"],
        "eval": ["eval", digits_mlp],
        "explain": ["explain", digits_mlp, "--data", "val"],
        "generate": ["generate", tiny_gpt, "--prompt", "def ", "--max-new-tokens", "2"],
    }[command]
    assert_one_error_line(cli(*args, "--threads", threads), "--threads", f"got {threads}", str(CORES))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", [str(2**70), str(SEED_MAX + 1), "-1"])
def test_a_seed_torch_and_numpy_cannot_take_is_refused(cli, tmp_path, tiny_gpt, seed):
    assert_one_error_line(cli(*QUICK_TRAIN, "--seed", seed, "--out", tmp_path / "r"), "--seed", seed)
    assert_one_error_line(cli("generate", tiny_gpt, "--prompt", "x", "--seed", seed), "--seed", seed)
    assert not (tmp_path / "r").exists()


def test_the_largest_seed_works(cli, tmp_path, tiny_gpt):
    assert cli(*QUICK_TRAIN, "--seed", str(SEED_MAX), "--out", tmp_path / "r").exit_code == 0
    result = cli("generate", tiny_gpt, "--prompt", "x", "--max-new-tokens", "2", "--seed", str(SEED_MAX))
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ numbers that are not numbers


@pytest.mark.parametrize("flag, value", [
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--min-delta", "nan"), ("--min-delta", "-inf"),
    ("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "nan"), ("--momentum", "inf"),
])
def test_training_floats_must_be_finite(cli, tmp_path, flag, value):
    assert_one_error_line(cli(*QUICK_TRAIN, flag, value, "--out", tmp_path / "r"), flag, value)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["generate", "export", "predict", "explain", "quantize", "prune"])
def test_other_float_options_must_be_finite(cli, tmp_path, digits_mlp, tiny_gpt, command):
    np.save(tmp_path / "one.npy", np.zeros((8, 8)))
    args, flag = {
        "generate": (["generate", tiny_gpt, "--prompt", "x", "--temperature", "inf"], "--temperature"),
        "export": (["export", digits_mlp, "--out", tmp_path / "o", "--atol", "inf"], "--atol"),
        "predict": (["predict", digits_mlp, tmp_path / "one.npy", "--image-scale", "inf"], "--image-scale"),
        "explain": (["explain", digits_mlp, tmp_path / "one.npy", "--pixel-max", "inf"], "--pixel-max"),
        "quantize": (["quantize", digits_mlp, "--out", tmp_path / "o", "--max-metric-drop", "nan"], "--max-metric-drop"),
        "prune": (["prune", digits_mlp, "--sparsity", "0.5", "--distill", "--finetune-epochs", "1",
                   "--temperature", "inf", "--out", tmp_path / "o"], "--temperature"),
    }[command]
    assert_one_error_line(cli(*args), flag)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("limit", ["-5", "0"])
def test_limit_must_be_at_least_one(cli, digits_mlp, limit):
    assert_one_error_line(cli("eval", digits_mlp, "--limit", limit), "--limit", limit)
    assert_one_error_line(cli("compare", digits_mlp, "--limit", limit, "--rounds", "1"), "--limit", limit)


def _limited(*args: str, memory: int = 3 << 30) -> subprocess.CompletedProcess:
    """bigmodel ARGS in a subprocess that may map at most ``memory`` bytes: a regression in a
    hostile-memory case fails the test instead of eating the machine."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "bigmodel_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_a_bench_batch_too_big_to_build_is_refused(digits_mlp, command):
    extra = ("--bench", "--iterations", "1") if command == "eval" else ("--rounds", "1", "--limit", "8")
    result = _limited(command, digits_mlp / "best", "--bench-batch", "1000000000", *extra)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: --bench-batch 1000000000") and "GiB" in errors[0]


def test_compare_bench_batch_must_be_at_least_one(cli, digits_mlp):
    for batch in ("0", "-1"):
        assert_one_error_line(cli("compare", digits_mlp / "best", "--bench-batch", batch), "--bench-batch", batch)


# ------------------------------------------------------------------ files that are not what they should be


def test_a_directory_as_the_options_file(cli, tmp_path):
    assert_one_error_line(cli("train", "--config", tmp_path, "--out", tmp_path / "r"), str(tmp_path), "is a directory")
    assert not (tmp_path / "r").exists()


def _csv(path: Path, labels: list[str]) -> Path:
    path.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{y}\n" for i, y in enumerate(labels)))
    return path


@pytest.mark.parametrize("labels, fragments", [
    (["0"], ("label '0'", "at least 2 classes")),                      # was KeyError: 'accuracy'
    (["cat"] * 40, ("label 'cat'", "at least 2 classes")),             # trained a one-class "classifier"
    (["0", "1"], ("validation split empty", "at least 6 rows")),     # too few rows for a validation row
])
def test_csv_that_cannot_train_a_classifier(cli, tmp_path, labels, fragments):
    data = _csv(tmp_path / "d.csv", labels)
    result = cli(*QUICK_TRAIN, "--data", f"csv:{data}", "--target", "label", "--out", tmp_path / "r")
    assert_one_error_line(result, str(data), *fragments)
    assert not (tmp_path / "r").exists()


def test_npz_with_one_class_cannot_train_a_classifier(cli, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((40, 4)), y=np.full(40, 3))
    result = cli(*QUICK_TRAIN, "--data", f"npz:{tmp_path / 'd.npz'}", "--out", tmp_path / "r")
    assert_one_error_line(result, "label '3'", "at least 2 classes")


@pytest.mark.parametrize("arrays", [{"x": [{"a": 1}, None]}, {"inputs": [{"a": 1}, None]}])
def test_explain_an_object_array_npz(cli, tmp_path, digits_mlp, arrays):
    path = tmp_path / "obj.npz"
    np.savez(path, **{k: np.array(v, dtype=object) for k, v in arrays.items()})
    assert_one_error_line(cli("explain", digits_mlp, path), str(path), "without pickle")


# ------------------------------------------------------------------ report and plot files


def test_report_files_are_checked_before_the_measurement(cli, tmp_path, digits_mlp):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc, a folder no file can be written into")
    best = digits_mlp / "best"
    assert_one_error_line(cli("compare", best, "--markdown", "/proc/x.md"), "--markdown /proc/x.md", "not writable")
    assert_one_error_line(cli("compare", best, "--plot", tmp_path), "--plot", "is a directory")
    assert_one_error_line(cli("compare", best, "--plot", tmp_path / "t.jpg"), "--plot", ".png")
    assert_one_error_line(cli("compare", best, "--markdown", tmp_path / "r.png"), "--markdown", ".md")
    (tmp_path / "r.png").write_bytes(b"mine")  # the plot a Markdown report writes beside itself
    assert_one_error_line(cli("compare", best, "--markdown", tmp_path / "r.md"), "writes its plot to", "already exists")
    assert (tmp_path / "r.png").read_bytes() == b"mine" and not (tmp_path / "r.md").exists()
    assert_one_error_line(cli("plot", digits_mlp, "--out", "/proc/c.png"), "/proc/c.png", "not writable")
    assert_one_error_line(cli("plot", digits_mlp, "--out", tmp_path), "is a directory")


def test_compare_and_plot_replace_a_file_only_with_overwrite(cli, tmp_path, digits_mlp):
    plot, md, page, curves = (tmp_path / n for n in ("t.png", "r.md", "r.html", "c.png"))
    for path in (plot, md, page, curves):
        path.write_text("mine")
    fast = ("--rounds", "1", "--limit", "8")
    for flag, path in (("--plot", plot), ("--markdown", md), ("--html", page)):
        assert_one_error_line(cli("compare", digits_mlp / "best", *fast, flag, path), flag, "already exists", "--overwrite")
    assert_one_error_line(cli("plot", digits_mlp, "--out", curves), "already exists", "--overwrite")
    assert all(p.read_text() == "mine" for p in (plot, md, page, curves))

    result = cli("compare", digits_mlp / "best", *fast, "--plot", plot, "--markdown", md, "--html", page, "--overwrite")
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:4] == b"\x89PNG" and "t.png" in md.read_text() and "base64" in page.read_text()
    assert f"wrote {plot}" in result.stderr + result.stdout
    assert cli("plot", digits_mlp, "--out", curves, "--overwrite").exit_code == 0
    assert curves.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.fixture()
def full_disk(tmp_path):
    """A 256 KiB tmpfs, filled up but for a few KiB (needs root)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mount / "old.png").write_bytes(b"old picture")
        with open(mount / "filler", "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:  # full
                pass
        (mount / "filler").write_bytes(b"\0" * (os.path.getsize(mount / "filler") - 8192))  # a few KiB free
        yield mount
    finally:
        subprocess.run(["umount", str(mount)])


def test_a_full_disk_leaves_no_empty_png_and_keeps_the_old_one(cli, digits_mlp, full_disk):
    result = cli("plot", digits_mlp, "--out", full_disk / "new.png")
    assert_one_error_line(result, "new.png", "nothing was written")
    result = cli("plot", digits_mlp, "--out", full_disk / "old.png", "--overwrite")
    assert_one_error_line(result, "old.png", "nothing was written")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.png"]
    assert (full_disk / "old.png").read_bytes() == b"old picture"
