"""Shared fixtures: tiny real models trained once per session, and a CLI runner.

Fixtures return artifact paths; tests must not modify them (copy first if a test needs to).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("OMP_NUM_THREADS", "2")


# Tests that start worker processes of their own and wait on them: `make test` runs them after
# the others, alone, so that two ranks get the machine's two cores (the rest runs on pytest-xdist
# workers, one per core). A plain `pytest` runs everything in one process, as always.
SERIAL_MODULES = {"test_distributed.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)


def assert_one_error_line(result, *fragments):
    """A user mistake: exit code 2 and exactly one `error:` line on stderr naming each fragment."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def cli():
    """invoke(*args) → Result (exit_code, stdout, stderr), through Typer's CliRunner."""
    from bigmodel_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small, fixed text corpus (~40 KB) for language-model tests."""
    import sysconfig

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    source = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    path.write_bytes(source.read_bytes()[:40_000])
    return path


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory) -> Path:
    """The default classifier (`bigmodel train` with no options: an MLP on the bundled digits).
    Returns the run directory (best/ and last/ inside)."""
    from bigmodel_cli import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "digits-mlp"
    train(TrainConfig(out=str(out)))
    return out


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory) -> Path:
    from bigmodel_cli import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "digits-cnn"
    train(TrainConfig(model="cnn", preset="tiny", epochs=4, out=str(out), seed=0))
    return out


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory, corpus) -> Path:
    """A nano GPT trained briefly on the test corpus (byte level)."""
    from bigmodel_cli import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny-gpt"
    train(TrainConfig(model="gpt", preset="nano", data=f"text:{corpus}", block_size=32, batch_size=8,
                      max_steps=60, lr=3e-3, eval_windows=8, out=str(out), seed=0,
                      model_args={"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64}))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's OpenMP threads crawl on a busy shared machine; one thread keeps a module's tests
    quick. Restored afterwards, so other test modules keep their setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_EXPORTS: dict[tuple, Path] = {}


def export_once(tmp_path_factory, run_dir: Path, *args: str) -> Path:
    """Export ``run_dir`` with ``args`` once per test session (shared with the other test files)."""
    from bigmodel_cli.cli import app
    from typer.testing import CliRunner

    key = (str(run_dir), args)
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp("exports") / "onnx"
        result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        _EXPORTS[key] = out
    return _EXPORTS[key]


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory, digits_mlp):
    return export_once(tmp_path_factory, digits_mlp)


@pytest.fixture(scope="module")
def gpt_onnx(tmp_path_factory, tiny_gpt):
    return export_once(tmp_path_factory, tiny_gpt)
