"""Hostile and broken inputs, fuzzed with hypothesis: recipes and config files, config.json, CSV
files, and truncated or bit-flipped safetensors and ONNX files. Every case must end in a clean
result or one `error:` line with exit code 2 — never a traceback, an internal error, or a file
written. The case counts are listed in docs/reliability.md; raise them with BIGMODEL_FUZZ_EXAMPLES."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigmodel_cli.artifact import MANIFEST_FILE, sha256_file
from bigmodel_cli.config import TrainConfig, build_config, read_toml
from bigmodel_cli.errors import UserError

EXAMPLES = int(os.environ.get("BIGMODEL_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _clean_failure(result) -> None:
    """Exit 0, or exit 2 with exactly one `error:` line; never a traceback or internal error."""
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1, result.stderr


def _rehash(artifact: Path) -> None:
    """Make the manifest agree with the (damaged) files, as an attacker would, so the parsers
    themselves are what is tested — not just the hash check in front of them."""
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        entry.update(bytes=(artifact / name).stat().st_size, sha256=sha256_file(artifact / name))
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))


# ------------------------------------------------------------------ options files (recipes)


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_as_a_toml_options_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("toml") / "options.toml"
    path.write_text(text, encoding="utf-8")
    try:
        values = read_toml(path, "train")
        build_config(TrainConfig, values, {}).validate()
    except UserError:
        pass


@FUZZ
@given(values=st.dictionaries(st.sampled_from(["lr", "epochs", "batch-size", "model", "optimizer", "grad_clip",
                                               "hidden-sizes", "model-args", "resume", "bogus", "seed"]),
                              json_values, max_size=5))
def test_any_values_in_an_options_file(values):
    try:
        build_config(TrainConfig, values, {}).validate()
    except UserError:
        pass


@FUZZ
@given(text=st.text(max_size=120))
def test_broken_recipe_through_the_cli(cli, tmp_path_factory, text):
    root = tmp_path_factory.mktemp("recipe")
    path = root / "bad.toml"
    # Always broken: unknown key at the end, whatever comes before it.
    path.write_text(text + "\n\nno_such_option = 1\n", encoding="utf-8")
    result = cli("train", "--config", path, "--out", root / "run")
    assert result.exit_code == 2
    _clean_failure(result)
    assert not (root / "run").exists()


# ------------------------------------------------------------------ config.json


@FUZZ
@given(key=st.sampled_from(["task", "model", "data", "format_version", "format"]), value=json_values,
       model_key=st.sampled_from(["hidden_sizes", "input_size", "num_classes", "arch", "dropout", "preset"]),
       model_value=json_values)
def test_mangled_config_json(cli, digits_mlp, tmp_path_factory, key, value, model_key, model_value):
    artifact = tmp_path_factory.mktemp("cfg") / "a"
    shutil.copytree(digits_mlp / "best", artifact)
    config = json.loads((artifact / "config.json").read_text())
    config[key] = value
    if isinstance(config.get("model"), dict):
        config["model"][model_key] = model_value
    (artifact / "config.json").write_text(json.dumps(config))
    _rehash(artifact)
    _clean_failure(cli("eval", artifact, "--limit", "8"))
    _clean_failure(cli("info", artifact, "--json"))


# ------------------------------------------------------------------ CSV


csv_cells = st.one_of(st.integers(-5, 5).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                      st.text(alphabet="ab ,\"\n\r1.-e", max_size=4))


@FUZZ
@given(rows=st.lists(st.lists(csv_cells, min_size=1, max_size=4), max_size=12),
       header=st.lists(st.sampled_from(["a", "b", "y", "", "y"]), min_size=1, max_size=4))
def test_arbitrary_csv_rows(cli, tmp_path_factory, rows, header):
    root = tmp_path_factory.mktemp("csv")
    path = root / "rows.csv"
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]), encoding="utf-8")
    result = cli("train", "--data", f"csv:{path}", "--target", "y", "--max-steps", "1", "--out", root / "run")
    _clean_failure(result)
    if result.exit_code == 2:
        assert not (root / "run").exists()


# ------------------------------------------------------------------ weight files


def _damage(data: bytes, mode: str, at: int, byte: int) -> bytes:
    if mode == "truncate":
        return data[: at % max(1, len(data))]
    position = at % len(data)
    return data[:position] + bytes([data[position] ^ (byte or 1)]) + data[position + 1:]


@FUZZ
@given(mode=st.sampled_from(["truncate", "flip"]), at=st.integers(0, 10**6), byte=st.integers(0, 255),
       rehash=st.booleans())
def test_damaged_safetensors(cli, digits_mlp, tmp_path_factory, mode, at, byte, rehash):
    artifact = tmp_path_factory.mktemp("st") / "a"
    shutil.copytree(digits_mlp / "best", artifact)
    weights = artifact / "model.safetensors"
    # Bias damage towards the header, where the parser lives.
    weights.write_bytes(_damage(weights.read_bytes(), mode, at if at % 3 else at % 200, byte))
    if rehash:
        _rehash(artifact)
    result = cli("eval", artifact, "--limit", "8")
    _clean_failure(result)
    if not rehash:
        assert result.exit_code == 2 and "sha256" in result.stderr


@pytest.fixture(scope="module")
def onnx_artifact(digits_mlp, tmp_path_factory):
    pytest.importorskip("bigmodel_cli.engine.onnx.export")
    out = tmp_path_factory.mktemp("onnx") / "exported"
    from bigmodel_cli.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["export", str(digits_mlp), "--out", str(out)])
    if result.exit_code != 0:
        pytest.skip(f"export is not available: {result.output[-300:]}")
    return out


@FUZZ
@given(mode=st.sampled_from(["truncate", "flip"]), at=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_damaged_onnx(cli, onnx_artifact, tmp_path_factory, mode, at, byte):
    artifact = tmp_path_factory.mktemp("ox") / "a"
    shutil.copytree(onnx_artifact, artifact)
    model = artifact / "model.onnx"
    model.write_bytes(_damage(model.read_bytes(), mode, at if at % 3 else at % 200, byte))
    _rehash(artifact)
    _clean_failure(cli("eval", artifact, "--backend", "onnx", "--limit", "8"))


def test_not_an_onnx_file(cli, onnx_artifact, tmp_path):
    artifact = tmp_path / "a"
    shutil.copytree(onnx_artifact, artifact)
    (artifact / "model.onnx").write_text("this is not a protobuf")
    _rehash(artifact)
    result = cli("eval", artifact, "--backend", "onnx")
    assert result.exit_code == 2
    _clean_failure(result)
