"""Nothing lost, nothing executed: SIGKILL and resume, kills mid-save, full and read-only disks,
no unpickling anywhere. See docs/reliability.md for the matrix."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigmodel_cli.artifact import open_artifact
from bigmodel_cli.errors import UserError

PY = sys.executable


def _train_cmd(out: Path, corpus: Path, *extra: str) -> list[str]:
    # A nano GPT with dropout: slow enough per step to be killed mid-run, and it exercises the RNG.
    return [PY, "-m", "bigmodel_cli", "train", "--model", "gpt", "--preset", "nano", "--data", f"text:{corpus}",
            "--model-args", '{"dropout": 0.1, "n_layer": 1}', "--block-size", "32", "--batch-size", "8",
            "--max-steps", "60", "--checkpoint-every", "5", "--eval-every", "5", "--eval-windows", "4",
            "--seed", "7", "--threads", "1", "--out", str(out), "--json", *extra]


def _last_logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue
    return 0


def _kill_at(cmd: list[str], run: Path, step: int) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while _last_logged_step(run) < step:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before step {step}: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run / "last").exists(), "killed before the end"


def test_sigkill_at_random_steps_then_resume_is_bitwise_identical(tmp_path, corpus):
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(whole, corpus), check=True, capture_output=True)
    cut = tmp_path / "cut"
    kill_points = sorted(random.Random(2024).sample(range(3, 58), 3))
    _kill_at(_train_cmd(cut, corpus), cut, kill_points[0])
    for point in kill_points[1:]:  # killed again while resuming
        _kill_at(_train_cmd(cut, corpus, "--resume"), cut, point)
    done = subprocess.run(_train_cmd(cut, corpus, "--resume"), check=True, capture_output=True, text=True)
    assert json.loads(done.stdout)["resumed_from"] is not None
    a, b = load_file(whole / "last" / "model.safetensors"), load_file(cut / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"kill points {kill_points}"
    steps = [json.loads(l)["step"] for l in (cut / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, 61))


_SAVER = """
import sys, torch
from bigmodel_cli.artifact import new_config, save_torch_artifact
from bigmodel_cli.models import build_model, resolve_spec
spec = resolve_spec("gpt", "mini")
model = build_model(spec)
config = new_config("language-modeling", spec, {"name": "text"})
print("ready", flush=True)
while True:
    save_torch_artifact(sys.argv[1], model, config=config, stage="train", overwrite=True)
"""


def test_kill_during_saves_never_leaves_a_directory_that_does_not_load(tmp_path):
    out = tmp_path / "artifact"
    rng = random.Random(1)
    for _ in range(4):
        proc = subprocess.Popen([PY, "-c", _SAVER, str(out)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 1.5))  # a ~43 MB artifact: the kill lands mid-save most times
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            open_artifact(out)  # complete and verified, or not there at all
        visible = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
        assert visible in ([], [out])


def _mount_tmpfs(path: Path, *options: str) -> bool:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "size=600k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)])


@pytest.fixture()
def readonly_dir(tmp_path):
    mount = tmp_path / "ro"
    if not _mount_tmpfs(mount, "size=1m", "ro"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_full_disk_is_one_clear_line_and_leaves_no_half_artifact(cli, small_disk):
    # ~1 MB of weights + optimizer state cannot fit in 600 KB.
    result = cli("train", "--hidden-sizes", "1024", "--max-steps", "2", "--out", small_disk / "run")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "Traceback" not in result.output
    for candidate in (small_disk / "run").rglob("manifest.json"):
        open_artifact(candidate.parent)  # whatever exists, loads
    assert not list((small_disk / "run").glob("**/.*tmp-*"))


def test_read_only_output_is_one_clear_line(cli, readonly_dir, digits_mlp):
    result = cli("train", "--max-steps", "2", "--out", readonly_dir / "run")
    assert result.exit_code == 2 and "not writable" in result.stderr
    from bigmodel_cli.artifact import save_torch_artifact

    artifact = open_artifact(digits_mlp)
    with pytest.raises(UserError, match="not writable"):
        save_torch_artifact(readonly_dir / "x", artifact.build_model(), config=artifact.config, stage="train")


def test_no_command_unpickles_a_file_it_is_handed(cli, digits_mlp, tmp_path, monkeypatch):
    """Train, resume, eval and info with every unpickling entry point booby-trapped."""
    import pickle

    def trap(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, trap)
    run = tmp_path / "run"
    assert cli("train", "--max-steps", "4", "--checkpoint-every", "2", "--out", run).exit_code == 0
    assert cli("train", "--max-steps", "4", "--checkpoint-every", "2", "--out", run, "--resume").exit_code == 0
    assert cli("eval", run).exit_code == 0
    assert cli("info", digits_mlp).exit_code == 0


def test_a_user_model_file_runs_only_when_named(cli, tmp_path, monkeypatch):
    from bigmodel_cli.models import user

    marker = tmp_path / "executed"
    file = tmp_path / "net.py"
    file.write_text(
        f"import pathlib, torch\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "def make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    assert cli("train", "--model", f"{file}:make", "--max-steps", "2", "--out", tmp_path / "run").exit_code == 0
    marker.unlink()
    monkeypatch.setattr(user, "_TRUSTED", set())
    monkeypatch.setattr(user, "_TRUST_ALL", False)
    monkeypatch.delenv("BIGMODEL_TRUST_MODEL_CODE", raising=False)
    for module in [m for m in sys.modules if m.startswith("bigmodel_user_model_")]:
        monkeypatch.delitem(sys.modules, module)
    assert cli("info", tmp_path / "run").exit_code == 0  # reads files only
    refused = cli("eval", tmp_path / "run")
    assert refused.exit_code == 2 and "--trust-model-code" in refused.stderr
    assert not marker.exists(), "the model file ran without being named"
    assert cli("--trust-model-code", "eval", tmp_path / "run").exit_code == 0
    assert marker.exists()
    user.set_trust_model_code(False)


def test_a_model_file_named_in_a_toml_file_runs_only_with_trust(cli, tmp_path, monkeypatch):
    """Issue 20 §6: a recipe step's or a --config file's model = "file.py:Name" is chosen by the
    file's author, not the user: like model.py in an artifact, it needs --trust-model-code."""
    from conftest import assert_one_error_line

    from bigmodel_cli.models import user

    monkeypatch.delenv("BIGMODEL_TRUST_MODEL_CODE", raising=False)
    monkeypatch.setattr(user, "_TRUST_ALL", False)  # restored afterwards: the trusted run below sets it
    marker = tmp_path / "executed"
    file = tmp_path / "evil.py"
    file.write_text(
        f"import pathlib, torch\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "def make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    reference = f"{file}:make"
    recipe = tmp_path / "user.toml"
    recipe.write_text(f'[[steps]]\nname = "t"\ncommand = "train"\nmodel = {reference!r}\nmax-steps = 2\n\n'
                      '[[steps]]\nname = "ex"\ncommand = "export"\nfrom = "t"\n')
    config = tmp_path / "train.toml"
    config.write_text(f"[train]\nmodel = {reference!r}\nmax-steps = 2\n")

    for args in (["run", recipe, "--out", tmp_path / "r"], ["run", recipe, "--check"],
                 ["train", "--config", config, "--out", tmp_path / "o"]):
        assert_one_error_line(cli(*args), "Python code named in a TOML file", "--trust-model-code")
    assert not marker.exists(), "a model file named in a TOML file ran without trust"
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()
    # Named on the command line by the user, it is theirs: --set for a recipe.
    assert cli("run", recipe, "--check", "--set", f"t.model={reference}").exit_code == 0

    # With --trust-model-code the whole run keeps it: the export step loads the trained model's code.
    trusted = cli("--trust-model-code", "run", recipe, "--out", tmp_path / "r", "--json", "--compare-rounds", "2")
    assert trusted.exit_code == 0, trusted.stderr
    assert [s["status"] for s in json.loads(trusted.stdout)["steps"]] == ["ran", "ran"]
    assert marker.exists() and (tmp_path / "r" / "ex" / "model.onnx").is_file()


def test_huge_corpus_is_not_read_into_memory(tmp_path):
    """A 2 GB (sparse) corpus trains a few steps in far less resident memory than its size."""
    corpus = tmp_path / "huge.txt"
    with open(corpus, "wb") as handle:
        handle.truncate(2 * 1024**3)
    code = (
        "import resource, sys\n"
        "from bigmodel_cli import TrainConfig, train\n"
        f"train(TrainConfig(model='gpt', preset='nano', data='text:{corpus}', max_steps=3, block_size=32,"
        f" batch_size=4, eval_windows=2, out={str(tmp_path / 'run')!r}))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-800:]
    peak_kib = int(proc.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB for a 2 GiB corpus"
