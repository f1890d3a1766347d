"""Hostile artifacts and data (issue 20, sections 3, 4 and the artifact-metadata cases of 7):
sizes that would exhaust memory, files that would hang a read, files the manifest does not vouch
for, and malformed metadata. Each ends in exactly one `error:` line and exit code 2.

The cases that would eat memory before the fix run in one subprocess under RLIMIT_AS, so a
regression fails (MemoryError, a kill) instead of taking the machine; the FIFO case runs in a
subprocess with a timeout, so a regression fails instead of hanging the suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line
from bigmodel_cli.artifact import MANIFEST_FILE, sha256_file

MEMORY_LIMIT = 3 << 30  # torch and onnxruntime map ~1.5 GB of address space on import


def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _rehash(artifact: Path, drop: tuple[str, ...] = ()) -> None:
    """Make the manifest agree with the files (as an attacker would), listing every file but ``drop``."""
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    files = {}
    for file in sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        name = file.relative_to(artifact).as_posix()
        if name not in drop:
            files[name] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    manifest["files"] = files
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))


def _edit_config(artifact: Path, edit) -> Path:
    config = json.loads((artifact / "config.json").read_text())
    edit(config)
    (artifact / "config.json").write_text(json.dumps(config))
    _rehash(artifact)
    return artifact


def _run_limited(cases: list[list[str]], timeout: int = 240) -> list[dict]:
    """Run each bigmodel command line in one subprocess under MEMORY_LIMIT (CliRunner inside, so
    torch is imported once); returns [{"code", "stderr"}] per case."""
    import resource

    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from bigmodel_cli.cli import app\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    out.append({'code': r.exit_code, 'stderr': r.stderr, 'output': r.output[-2000:]})\n"
        "print(json.dumps(out))\n"
    )

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([[str(a) for a in c] for c in cases])],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _one_error_line(result: dict, *fragments: str) -> None:
    assert result["code"] == 2, result["output"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result["stderr"]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ section 3: memory and hangs


def _npz_bomb(path: Path, rows: int, features: int = 64) -> None:
    """A small .npz whose x inflates to rows × features float32 zeros (written in chunks: the
    test itself never holds the array)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, features)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            chunk = bytes(64 << 20)
            left = rows * features * 4
            while left:
                member.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(rows, dtype=np.int64)[:0].reshape(0))


def test_hostile_sizes_are_refused_before_memory_is_spent(digits_mlp, tiny_gpt, tmp_path):
    wide = _edit_config(_copy(digits_mlp / "best", tmp_path / "wide"),
                        lambda c: c["model"].update(hidden_sizes=[20_000_000]))
    deep = _edit_config(_copy(tiny_gpt / "best", tmp_path / "deep"), lambda c: c["model"].update(n_layer=100_000))
    # Within bigmodel's layer limit, so only the weights' header can say it is wrong.
    deeper = _edit_config(_copy(tiny_gpt / "best", tmp_path / "deeper"), lambda c: c["model"].update(n_layer=5_000))
    wrong_shape = _edit_config(_copy(digits_mlp / "best", tmp_path / "shape"),
                               lambda c: c["model"].update(hidden_sizes=[64]))
    np.save(tmp_path / "rows.npy", np.zeros((2, 64), dtype=np.float32))
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((4, 3), dtype=np.float32), y=np.array([0, 300_000_000, 0, 300_000_000]))
    bomb = tmp_path / "bomb.npz"
    _npz_bomb(bomb, rows=4_000_000)  # 1 GB of float32 zeros in ~1 MB
    assert bomb.stat().st_size < 8 << 20

    results = _run_limited([
        ["eval", wide, "--limit", "8"],
        ["predict", wide, tmp_path / "rows.npy", "--backend", "torch"],
        ["export", wide, "--out", tmp_path / "wide-onnx"],
        ["eval", deep, "--limit", "2"],
        ["generate", deep, "--prompt", "a", "--max-new-tokens", "2"],
        ["info", deep],
        ["eval", deeper, "--limit", "2"],
        ["generate", deeper, "--prompt", "a", "--max-new-tokens", "2"],
        ["eval", wrong_shape, "--limit", "8"],
        ["estimate", "--model-args", '{"n_layer":1000000000,"n_embd":100000}'],
        ["estimate", "--model-args", '{"n_layer":10000,"n_embd":100000}'],
        ["train", "--data", f"npz:{labels}", "--epochs", "1", "--out", tmp_path / "labels-run"],
        ["train", "--data", f"npz:{bomb}", "--epochs", "1", "--out", tmp_path / "bomb-run"],
        ["distill", "--teacher", digits_mlp, "--student", wide, "--epochs", "1", "--out", tmp_path / "distilled"],
    ])
    wide_eval, wide_predict, wide_export, deep_eval, deep_gen, deep_info, deeper_eval, deeper_gen, shape, \
        est_layers, est_params, label_run, bomb_run, wide_student = results
    for result in (wide_eval, wide_predict, wide_export, wide_student):
        _one_error_line(result, "do not belong together")
    for result in (deep_eval, deep_gen):
        _one_error_line(result, "n_layer", "100,000 layers", "10,000")
    assert deep_info["code"] == 0, deep_info["output"]  # info reads the weights' header, builds nothing
    for result in (deeper_eval, deeper_gen):
        _one_error_line(result, "model.safetensors", "parameters", "do not belong together")
    _one_error_line(shape, "tensor net.0.bias has shape (128,)", "expects (64,)")
    _one_error_line(est_layers, "1,000,000,000 layers")
    _one_error_line(est_params, "parameters", "1e+15")
    _one_error_line(label_run, "300,000,000", "class")
    _one_error_line(bomb_run, "bomb.npz", "1,024,000,000 bytes once loaded")
    assert not (tmp_path / "wide-onnx").exists() and not (tmp_path / "labels-run").exists()


def test_config_json_that_is_a_device_or_a_fifo_is_never_read(digits_mlp, tmp_path):
    zero = _copy(digits_mlp / "best", tmp_path / "zero")
    (zero / "config.json").unlink()
    (zero / "config.json").symlink_to("/dev/zero")
    _rehash(zero, drop=("config.json",))
    fifo = _copy(digits_mlp / "best", tmp_path / "fifo")
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    _rehash(fifo, drop=("config.json",))
    listed_fifo = _copy(digits_mlp / "best", tmp_path / "listed-fifo")  # the manifest still lists config.json
    (listed_fifo / "config.json").unlink()
    os.mkfifo(listed_fifo / "config.json")

    results = _run_limited([["info", zero], ["info", fifo], ["eval", listed_fifo]], timeout=120)
    _one_error_line(results[0], "does not list config.json")
    _one_error_line(results[1], "does not list config.json")
    _one_error_line(results[2], "config.json", "does not match the sha256")


def test_a_fifo_manifest_does_not_hang(cli, digits_mlp, tmp_path):
    fifo = _copy(digits_mlp / "best", tmp_path / "fifo")
    (fifo / MANIFEST_FILE).unlink()
    os.mkfifo(fifo / MANIFEST_FILE)
    assert_one_error_line(cli("info", fifo), "manifest.json")


def test_the_npz_header_is_checked_without_loading(tmp_path):
    from bigmodel_cli.data import load_dataset, parse_data_arg
    from bigmodel_cli.errors import UserError

    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("x.npy", b"not an array")
        archive.writestr("y.npy", b"nor this")
    with pytest.raises(UserError, match="x.npy is not a NumPy array"):
        load_dataset(parse_data_arg(f"npz:{bad}"))


# ------------------------------------------------------------------ section 4: every file listed and hashed


def test_weights_not_listed_in_the_manifest_are_refused(cli, digits_mlp, tmp_path):
    artifact = _copy(digits_mlp / "best", tmp_path / "swapped")
    data = bytearray((artifact / "model.safetensors").read_bytes())
    data[-4:] = b"\0\0\0\0"  # different weights
    (artifact / "model.safetensors").write_bytes(bytes(data))
    _rehash(artifact, drop=("model.safetensors",))
    assert_one_error_line(cli("eval", artifact, "--limit", "8"), "model.safetensors", "not listed in the manifest")


def test_a_stray_file_or_pycache_in_an_artifact_is_refused_but_private_files_are_not(cli, digits_mlp, tmp_path):
    artifact = _copy(digits_mlp / "best", tmp_path / "a")
    (artifact / ".bigmodel.lock").write_text("")  # bigmodel's own: not part of the artifact
    assert cli("info", artifact).exit_code == 0
    (artifact / "__pycache__").mkdir()
    (artifact / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"\0")
    assert_one_error_line(cli("info", artifact), "__pycache__/model.cpython-312.pyc", "not listed")


def _externalize(source: Path, dest: Path, location: str) -> Path:
    """A copy of an ONNX artifact whose model.onnx keeps its weights in ``location``, manifest re-hashed."""
    import onnx

    artifact = _copy(source, dest)
    model = onnx.load(str(artifact / "model.onnx"))
    onnx.save_model(model, str(artifact / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    if location != "model.onnx.data":
        model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(model, str(artifact / "model.onnx"))
    _rehash(artifact)
    return artifact


def test_external_data_only_from_the_listed_data_file(cli, mlp_onnx, tmp_path):
    canonical = _externalize(mlp_onnx, tmp_path / "canonical", "model.onnx.data")
    assert cli("eval", canonical, "--backend", "onnx", "--limit", "8").exit_code == 0

    other = _externalize(mlp_onnx, tmp_path / "other", "weights.bin")
    (other / "model.onnx.data").rename(other / "weights.bin")
    _rehash(other)  # weights.bin listed and hashed, but not the one data file bigmodel verifies by name
    assert_one_error_line(cli("eval", other, "--backend", "onnx", "--limit", "8"), "'weights.bin'", "model.onnx.data")

    outside = tmp_path / "secret"
    outside.write_bytes(b"s" * 12345)
    leak = _externalize(mlp_onnx, tmp_path / "leak", str(outside))
    result = cli("info", leak)
    assert_one_error_line(result, "model.onnx.data")
    assert "12345" not in result.output and "12,345" not in result.output


def test_external_data_outside_the_folder_is_not_looked_up(tmp_path, mlp_onnx):
    """A bare model.onnx (not an artifact) pointing at another file: refused without a word about it."""
    from bigmodel_cli.engine.onnx.files import check_external_data
    from bigmodel_cli.engine.onnx.runtime import open_session
    from bigmodel_cli.errors import UserError

    outside = tmp_path / "secret"
    outside.write_bytes(b"s" * 12345)
    leak = _externalize(mlp_onnx, tmp_path / "leak", str(outside))
    (leak / "model.onnx.data").unlink()  # nothing beside it: ONNX Runtime would read the outside file
    for load in (check_external_data, open_session):
        with pytest.raises(UserError, match="points outside") as info:
            load(leak / "model.onnx")
        assert "12345" not in str(info.value) and "12,345" not in str(info.value)


def test_external_data_offset_that_is_not_a_number(cli, mlp_onnx, tmp_path):
    import onnx

    artifact = _externalize(mlp_onnx, tmp_path / "abc", "model.onnx.data")
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = "abc"
    if not any(e.key == "offset" for e in model.graph.initializer[0].external_data):
        model.graph.initializer[0].external_data.add(key="offset", value="abc")
    onnx.save_model(model, str(artifact / "model.onnx"))
    _rehash(artifact)
    assert_one_error_line(cli("eval", artifact, "--backend", "onnx", "--limit", "8"), "offset 'abc'")


def test_a_data_path_in_config_json_is_read_only_if_it_holds_the_training_data(cli, tiny_gpt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not the training corpus\n" * 200)
    pointed = _edit_config(_copy(tiny_gpt / "best", tmp_path / "pointed"), lambda c: c["data"].update(path=str(secret)))
    assert_one_error_line(cli("eval", pointed, "--limit", "2"), "not the text data this artifact was trained on",
                          "--data")
    unrecorded = _edit_config(_copy(tiny_gpt / "best", tmp_path / "old"), lambda c: c["data"].pop("fingerprint"))
    assert_one_error_line(cli("eval", unrecorded, "--limit", "2"), "no matching fingerprint")
    # The user naming the file is another matter: it is read.
    assert cli("eval", pointed, "--data", f"text:{secret}", "--limit", "2").exit_code == 0
    assert cli("eval", tiny_gpt, "--limit", "2").exit_code == 0  # the recorded corpus itself


# ------------------------------------------------------------------ section 7: malformed metadata


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("edit, fragments", [
    (lambda c: c["data"].update(normalization="abc"), ('"data.normalization"',)),
    (lambda c: c["data"].update(normalization={"mean": 0.0, "std": 0}), ('"data.normalization.std" must be greater than 0',)),
    (lambda c: c["data"].update(normalization={"mean": [0.0], "std": [1.0, 0.0]}), ("std", "greater than 0")),
    (lambda c: c["data"].update(normalization={"mean": [0.0] * 3, "std": [1.0] * 3}), ("3 per-feature values",)),
    (lambda c: c["data"]["split"].update(seed="x"), ('"data.split.seed"',)),
    (lambda c: c["data"].update(split=[1]), ('"data.split"',)),
    (lambda c: c["data"].update(input_shape="64"), ('"data.input_shape"',)),
    (lambda c: c.update(deep=json.loads(_nested(500))), ()),  # deep but readable: only unknown keys
], ids=["normalization-string", "std-zero", "std-list-zero", "features", "seed-string", "split-list", "input-shape", "deep-ok"])
def test_malformed_config_is_one_line(cli, digits_mlp, tmp_path, edit, fragments):
    artifact = _edit_config(_copy(digits_mlp / "best", tmp_path / "a"), edit)
    result = cli("eval", artifact, "--limit", "8")
    if not fragments:
        assert result.exit_code == 0, result.output
    else:
        assert_one_error_line(result, "config.json", *fragments)


def test_config_nested_100000_deep(cli, digits_mlp, tmp_path):
    artifact = _copy(digits_mlp / "best", tmp_path / "a")
    (artifact / "config.json").write_text('{"a": ' + _nested(100_000) + "}")
    _rehash(artifact)
    assert_one_error_line(cli("info", artifact), "config.json", "nested too deeply")


def test_config_json_that_is_a_directory(cli, digits_mlp, tmp_path):
    artifact = _copy(digits_mlp / "best", tmp_path / "a")
    (artifact / "config.json").unlink()
    (artifact / "config.json").mkdir()
    assert_one_error_line(cli("info", artifact), "config.json")
    _rehash(artifact)  # no longer listed: it is not a file
    assert_one_error_line(cli("info", artifact), "does not list config.json")


@pytest.mark.parametrize("key, value, fragment", [
    ("files", ["config.json"], '"files" must be an object'),
    ("files", {"config.json": "abc"}, '"files.config.json"'),
    ("parent", 5, '"parent"'),
    ("parent", {"path": 7}, '"parent"'),
    ("stage", 7, '"stage"'),
    ("metrics", [], '"metrics"'),
    ("nested", None, "nested too deeply"),
])
def test_malformed_manifest_is_one_line(cli, digits_mlp, tmp_path, key, value, fragment):
    artifact = _copy(digits_mlp / "best", tmp_path / "a")
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    if key == "nested":
        text = json.dumps(manifest)[:-1] + ', "deep": ' + _nested(100_000) + "}"
    else:
        manifest[key] = value
        text = json.dumps(manifest)
    (artifact / MANIFEST_FILE).write_text(text)
    assert_one_error_line(cli("info", artifact), MANIFEST_FILE, fragment)


def test_all_manifest_problems_in_one_line(cli, digits_mlp, tmp_path):
    artifact = _copy(digits_mlp / "best", tmp_path / "a")
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest.update(stage=7, parent=5, metrics=[])
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert_one_error_line(cli("info", artifact), '"stage"', '"parent"', '"metrics"')


def test_weight_only_layout_that_does_not_fit_is_one_line(cli, digits_mlp, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", digits_mlp, "--out", out, "--mode", "weight-only").exit_code == 0
    for name, shape in (("net.0.weight", [20_000_000, 64]), ("net.0.weight", [128, 65])):
        artifact = _copy(out, tmp_path / f"q-{shape[0]}-{shape[1]}")
        _edit_config(artifact, lambda c: c["quantization"]["tensors"].update({name: shape}))
        assert_one_error_line(cli("eval", artifact, "--limit", "8"), f"quantized tensor {name}", str(tuple(shape)))


@pytest.mark.parametrize("arch, overrides", [
    ("mlp", {}), ("mlp", {"hidden_sizes": [5, 7], "input_size": 3}), ("cnn", {}),
    ("cnn", {"channels": [3, 5, 7], "height": 9, "width": 5, "hidden_sizes": []}), ("gpt", {}),
    ("gpt", {"n_head": 3, "head_dim": 8, "mlp_hidden": 100, "bias": False, "tie_weights": False}),
])
def test_parameter_formula_matches_the_built_model(arch, overrides):
    """The size check trusts the formula: it must count exactly what the model builds."""
    from bigmodel_cli.models import meta_parameter_count, parameter_count, resolve_spec

    spec = resolve_spec(arch, None, overrides)
    assert parameter_count(spec) == meta_parameter_count(spec)
