"""The command line: results, --json, and one clear line with exit code 2 for every user mistake."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line as _one_error_line




def test_eval_json_has_the_documented_keys(cli, digits_mlp):
    result = cli("eval", digits_mlp, "--json", "--bench", "--iterations", "5", "--warmup", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("accuracy", "loss", "params", "nonzero_params", "file_bytes", "latency_ms_p50", "latency_ms_p95", "throughput"):
        assert key in data
    assert data["latency_ms_p95"] >= data["latency_ms_p50"] > 0 and data["backend"] == "torch"


def test_eval_table_and_info(cli, digits_mlp):
    result = cli("eval", digits_mlp, "--split", "test")
    assert result.exit_code == 0 and "accuracy" in result.stdout
    info = cli("info", digits_mlp, "--json")
    data = json.loads(info.stdout)
    assert data["model"]["arch"] == "mlp" and data["params"] == sum(g["params"] for g in data["groups"])
    assert data["lineage"][0]["stage"] == "train" and "val_accuracy" in data["metrics"]
    assert cli("info", digits_mlp, "--layers").exit_code == 0


def test_issue_example_command_trains_on_synthetic_data(cli, tmp_path):
    result = cli("train", "--model", "mlp", "--input-size", "100", "--hidden-size", "500", "--output-size", "10",
                 "--optimizer", "adam", "--lr", "1e-3", "--max-steps", "5", "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r" / "best" / "config.json").read_text())
    assert config["data"]["name"] == "synthetic" and config["data"]["input_shape"] == [100]
    assert config["model"]["hidden_sizes"] == [500] and config["model"]["num_classes"] == 10


def test_train_config_file_with_flags_winning(cli, tmp_path):
    recipe = tmp_path / "train.toml"
    recipe.write_text('[train]\nmodel = "cnn"\npreset = "tiny"\nmax-steps = 3\nlr = 0.01\n')
    result = cli("train", "--config", recipe, "--max-steps", "2", "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2
    options = json.loads((tmp_path / "r" / "best" / "manifest.json").read_text())["options"]
    assert options["model"] == "cnn" and options["lr"] == 0.01


def test_models_datasets_estimate(cli):
    models = json.loads(cli("models", "--json").stdout)
    assert {"mlp", "cnn", "gpt"} <= {m["arch"] for m in models}
    assert any(m["preset"] == "micro" and m["default"] for m in models)
    assert "digits" in cli("datasets").stdout
    est = json.loads(cli("estimate", "--model", "gpt", "--preset", "7b", "--batch-size", "2", "--seq-len", "512", "--json").stdout)
    assert 6.4e9 < est["params"] < 7.1e9
    assert est["weight_bytes"] == est["params"] * 2
    assert est["train"]["optimizer_state"] == est["params"] * 8
    # about 2 FLOPs per parameter per token (the embedding lookup costs none), plus attention
    assert 1.9 * est["params"] < est["flops_per_token_forward"] < 2.2 * est["params"]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def test_missing_artifact_path(cli, tmp_path):
    _one_error_line(cli("eval", tmp_path / "nope"), "no such file or directory")


def test_unknown_model_preset_dataset(cli, tmp_path):
    _one_error_line(cli("train", "--model", "resnet", "--out", tmp_path / "a"), "unknown model 'resnet'")
    _one_error_line(cli("train", "--model", "gpt", "--preset", "huge", "--out", tmp_path / "b"), "unknown preset 'huge'")
    _one_error_line(cli("train", "--data", "imagenet", "--out", tmp_path / "c"), "unknown dataset 'imagenet'")
    assert not any(tmp_path.iterdir())


def test_malformed_recipe(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    _one_error_line(cli("train", "--config", bad, "--out", tmp_path / "r"), "not valid TOML")
    typo = tmp_path / "typo.toml"
    typo.write_text('lr = "fast"\nepochz = 3\n')
    _one_error_line(cli("train", "--config", typo, "--out", tmp_path / "r"), "unknown option 'epochz'")
    assert not (tmp_path / "r").exists()


def test_malformed_config_json_and_corrupt_weights(cli, digits_mlp, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_mlp / "best", copy)
    (copy / "config.json").write_text("{")
    _one_error_line(cli("eval", copy), "config.json", "does not match")
    shutil.rmtree(copy)
    shutil.copytree(digits_mlp / "best", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _one_error_line(cli("eval", copy), "model.safetensors", "re-create")


def test_model_that_does_not_fit_the_data(cli, tmp_path):
    _one_error_line(cli("train", "--data", "digits", "--input-size", "100", "--out", tmp_path / "r"),
                    "input size 100 does not fit", "--input-size")
    _one_error_line(cli("train", "--model", "gpt", "--data", "digits", "--out", tmp_path / "g"), "classification")
    assert not any(tmp_path.iterdir())


def test_label_out_of_range(cli, tmp_path):
    _one_error_line(cli("train", "--data", "digits", "--output-size", "5", "--out", tmp_path / "r"), "labels go up to 9")


def test_empty_dataset_and_bad_csv_cell(cli, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("a,y\n")
    _one_error_line(cli("train", "--data", f"csv:{empty}", "--target", "y", "--out", tmp_path / "r"), "no data rows")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,y\n1,0\nx,1\n")
    _one_error_line(cli("train", "--data", f"csv:{bad}", "--target", "y", "--out", tmp_path / "r"), "line 3", "'x' is not a number")
    npz = tmp_path / "empty.npz"
    np.savez(npz, x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64))
    _one_error_line(cli("train", "--data", f"npz:{npz}", "--out", tmp_path / "r"), "empty")
    assert not (tmp_path / "r").exists()


def test_existing_output_is_not_overwritten(cli, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _one_error_line(cli("train", "--out", out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_bad_json_and_numbers(cli, tmp_path):
    _one_error_line(cli("train", "--model-args", "{hidden", "--out", tmp_path / "r"), "--model-args", "not valid JSON")
    _one_error_line(cli("train", "--hidden-sizes", "12,x", "--out", tmp_path / "r"), "--hidden-sizes")
    _one_error_line(cli("eval", tmp_path, "--split", "dev"), "")


def test_debug_env_shows_the_traceback(tmp_path):
    env = {**os.environ, "BIGMODEL_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "bigmodel_cli", "eval", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_installed_entry_point_in_a_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("bigmodel")
    assert exe.exists(), "the console script `bigmodel` is installed with the package"
    proc = subprocess.run([str(exe), "train", "--max-steps", "3", "--out", str(tmp_path / "r"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 3
    bad = subprocess.run([str(exe), "eval", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    help_ = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "train" in help_.stdout


def test_help_does_not_import_torch():
    """`bigmodel --help` must stay fast: the CLI imports torch only inside the commands that need it."""
    code = ("import sys; from bigmodel_cli.cli import app; "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules and 'matplotlib' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'matplotlib'))[:5]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args, fragments", [
    (["train", "--epochs", "abc"], ["--epochs", "train --help"]),
    (["train", "--no-such-option"], ["--no-such-option", "train --help"]),
    (["trian"], ["'trian'", "train", "--help"]),
    (["eval"], ["Missing argument", "eval --help"]),
    (["train", "--model"], ["--model", "--help"]),
])
def test_an_option_that_does_not_parse_is_one_line_and_exit_2(cli, args, fragments):
    """Click's own usage errors are user mistakes too: one line, not its usage box."""
    _one_error_line(cli(*args), *fragments)


def test_an_unknown_root_option_is_one_line_too(cli):
    _one_error_line(cli("--no-such-option"), "--no-such-option", "--help")
