"""ONNX artifacts with external data (model.onnx + model.onnx.data), the layout of models whose
weights pass protobuf's 2 GB limit, end to end: export (both exporters, --optimize extended),
hashing and verification, eval, predict, generate, info, quantize (dynamic and static), the
deployment snippet without torch, and damaged data files.

The tiny test models are sent down the >2 GB path by lowering exporters.EXTERNAL_DATA_THRESHOLD_BYTES
(the CLI runs in-process, so the patched constant is the one it reads). A real model over 2 GB is
exported in ``test_a_real_model_over_2_gb`` (marked slow: ``pytest -m slow``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line, export_once

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ("--iterations", "2", "--warmup", "0")
BASE_FILES = {"config.json", "manifest.json", "model.onnx"}


def _ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def export_external(cli, tmp_path_factory):
    """export(run_dir, *args) → an export written with external data (threshold 0), once per args."""
    from bigmodel_cli.engine.onnx import exporters

    made: dict[tuple, Path] = {}

    def run(run_dir: Path, *args: str) -> Path:
        key = (str(run_dir), args)
        if key not in made:
            out = tmp_path_factory.mktemp("external") / "onnx"
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(exporters, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
                result = cli("export", run_dir, "--out", out, *args)
            assert result.exit_code == 0, result.output
            assert sorted(p.name for p in out.parent.iterdir()) == ["onnx"]  # no staging or scratch left
            made[key] = out
        return made[key]

    return run


@pytest.fixture
def threshold(monkeypatch):
    """set(bytes): the external-data threshold for this test only."""
    from bigmodel_cli.engine.onnx import exporters

    return lambda value: monkeypatch.setattr(exporters, "EXTERNAL_DATA_THRESHOLD_BYTES", value)


def _copy(artifact: Path, dest: Path) -> Path:
    shutil.copytree(artifact, dest)
    return dest


# --- the written layout --------------------------------------------------------------------------


@pytest.mark.parametrize("model, args", [("mlp", ()), ("mlp", ("--exporter", "torchscript")), ("cnn", ()),
                                         ("gpt", ()), ("mlp", ("--optimize", "extended", "--no-weights"))])
def test_export_writes_one_data_file_and_hashes_it(export_external, digits_mlp, digits_cnn, tiny_gpt, model, args):
    import onnx

    from bigmodel_cli.artifact import open_artifact, sha256_file
    from bigmodel_cli.engine.onnx.files import external_locations

    out = export_external({"mlp": digits_mlp, "cnn": digits_cnn, "gpt": tiny_gpt}[model], *args)
    files = {p.name for p in out.iterdir()}
    decoder = {"decoder.onnx", "decoder.onnx.data"} if model == "gpt" else set()  # the cached decoder too
    assert files == (BASE_FILES | {"model.onnx.data"} | decoder
                     | ({"model.safetensors"} if "--no-weights" not in args else set()))
    a = open_artifact(out)  # every hash checked, model.onnx.data included
    assert a.config["onnx"]["external_data"] is True and a.manifest["onnx"]["external_data"] is True
    assert a.manifest["verification"]["passed"]
    exporter = "torchscript" if "torchscript" in args else "dynamo"
    assert a.config["onnx"]["exporter"] == exporter and a.config["onnx"]["portable"] == ("extended" not in args)
    for name in ("model.onnx", "model.onnx.data"):
        entry = a.manifest["files"][name]
        assert entry == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    assert external_locations(out / "model.onnx") == {"model.onnx.data"}  # one data file, whichever exporter
    # the weights are in the data file; only small constants (shapes, scalars) stay in the graph
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inline = [i.name for i in graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL and i.ByteSize() > 1024]
    assert inline == [] and any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer)


def test_under_the_threshold_the_export_is_one_file(mlp_onnx):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx import exporters

    assert exporters.EXTERNAL_DATA_THRESHOLD_BYTES == 2 * 1024**3 - 128 * 1024**2
    a = open_artifact(mlp_onnx)
    assert not (mlp_onnx / "model.onnx.data").exists() and a.config["onnx"]["external_data"] is False


def test_the_decision_counts_parameters_and_buffers_once(digits_cnn, tiny_gpt):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx.export import io_layout
    from bigmodel_cli.engine.onnx.exporters import export_module, needs_external_data, weight_bytes

    gpt = open_artifact(tiny_gpt).build_model()
    stored = {t.data_ptr(): t.numel() * t.element_size() for t in gpt.state_dict().values()}
    assert weight_bytes(gpt) == sum(stored.values())  # the tied embedding/head once
    cnn = open_artifact(digits_cnn).build_model()
    # BatchNorm's running statistics are buffers: counted too
    assert weight_bytes(cnn) == sum(t.numel() * t.element_size() for t in cnn.state_dict().values())
    half = export_module(cnn, io_layout(open_artifact(digits_cnn)), "fp16")  # what an fp16 export stores
    assert weight_bytes(half) == weight_bytes(cnn) // 2
    assert not needs_external_data(2 * 1024**3 - 128 * 1024**2) and needs_external_data(2 * 1024**3)


def test_a_failed_export_leaves_nothing(cli, digits_mlp, tmp_path, threshold):
    threshold(0)
    r = cli("export", digits_mlp, "--out", tmp_path / "o", "--atol", "1e-30")
    assert r.exit_code == 1 and "verification failed" in r.stderr
    assert list(tmp_path.iterdir()) == []


# --- running it --------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [(), ("--exporter", "torchscript"), ("--optimize", "extended", "--no-weights")])
def test_eval_onnx_gives_the_single_file_metrics(cli, export_external, digits_mlp, mlp_onnx, args):
    external = _ok(cli("eval", export_external(digits_mlp, *args), "--backend", "onnx", "--json"))
    single = _ok(cli("eval", mlp_onnx, "--backend", "onnx", "--json"))
    assert external["accuracy"] == single["accuracy"] and external["loss"] == pytest.approx(single["loss"], abs=1e-6)
    assert external["params"] == single["params"]  # counted from the initializers in model.onnx.data
    out = export_external(digits_mlp, *args)
    assert external["file_bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size


def test_language_model_eval_and_generate(cli, export_external, tiny_gpt, gpt_onnx):
    out = export_external(tiny_gpt)
    external = _ok(cli("eval", out, "--backend", "onnx", "--json"))
    single = _ok(cli("eval", gpt_onnx, "--backend", "onnx", "--json"))
    assert external["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)
    prompt = ("--prompt", "def wrap(text", "--max-new-tokens", "16", "--temperature", "0", "--json")
    cached = _ok(cli("generate", out, *prompt))
    assert cached["cache"] and cached["tokens"] == _ok(cli("generate", gpt_onnx, *prompt))["tokens"]
    assert _ok(cli("generate", out, *prompt, "--no-cache"))["tokens"] == cached["tokens"]


def test_the_cached_decoder_keeps_its_weights_in_its_own_verified_data_file(cli, export_external, tiny_gpt,
                                                                            tmp_path):
    """Over the threshold decoder.onnx is written with decoder.onnx.data (not model.onnx's), both
    hashed; generate loads it; a damaged decoder.onnx.data is refused by the manifest check."""
    import onnx

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx.files import external_locations

    out = export_external(tiny_gpt)
    a = open_artifact(out)
    assert external_locations(out / "decoder.onnx") == {"decoder.onnx.data"}
    assert {"decoder.onnx", "decoder.onnx.data"} <= set(a.manifest["files"]) and a.config["onnx"]["decoder"]
    assert a.manifest["decoder_verification"]["passed"]
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer)
    damaged = _copy(out, tmp_path / "damaged")
    with open(damaged / "decoder.onnx.data", "r+b") as handle:
        handle.write(b"\0" * 16)
    result = cli("generate", damaged, "--backend", "onnx", "--prompt", "ab", "--max-new-tokens", "2")
    assert_one_error_line(result, "decoder.onnx.data", "sha256")


def test_predict_compare_and_info(cli, export_external, digits_mlp, mlp_onnx, tmp_path):
    from importlib import resources

    with resources.files("bigmodel_cli.data").joinpath("digits.npz").open("rb") as handle:
        np.save(tmp_path / "x.npy", np.load(handle, allow_pickle=False)["x"][:20].astype(np.float32))
    out = export_external(digits_mlp)
    external = _ok(cli("predict", out, tmp_path / "x.npy", "--json"))
    single = _ok(cli("predict", mlp_onnx, tmp_path / "x.npy", "--json"))
    assert external["backend"] == "onnx" and external["samples"] == 20
    assert [p["class_index"] for p in external["predictions"]] == [p["class_index"] for p in single["predictions"]]
    np.testing.assert_allclose([p["probability"] for p in external["predictions"]],
                               [p["probability"] for p in single["predictions"]], atol=1e-6)

    compared = _ok(cli("compare", out, mlp_onnx, "--backend", "onnx", "--rounds", "2", "--json"))
    external_row, single_row = compared["rows"]
    assert external_row["value"] == single_row["value"] and external_row["params"] == single_row["params"]
    assert external_row["file_bytes"] == sum((out / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))

    onnx_only = export_external(digits_mlp, "--optimize", "extended", "--no-weights")
    for artifact in (out, onnx_only):
        info = _ok(cli("info", artifact, "--json"))
        assert info["files"]["model.onnx.data"] == (artifact / "model.onnx.data").stat().st_size
    # an ONNX-only artifact is described from its initializers, which live in model.onnx.data
    assert _ok(cli("info", onnx_only, "--json"))["params"] == _ok(cli("info", digits_mlp, "--json"))["params"]


# --- quantize ------------------------------------------------------------------------------------


def test_dynamic_quantize_from_inside_the_export_directory(cli, export_external, digits_mlp, tmp_path, threshold,
                                                           monkeypatch):
    """Run from the export directory itself, where a model.onnx.data already exists: onnx.save_model
    refuses an external-data location that exists in the working directory, so the quantizer's
    files must not be called model.onnx. Nothing may be written there either."""
    from bigmodel_cli.artifact import open_artifact

    out = export_external(digits_mlp)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.chdir(out)
    threshold(0)  # the int8 model is laid out by its own size: here, external too
    external = _ok(cli("quantize", ".", "--out", tmp_path / "q-ext", "--no-bench", "--json"))
    threshold(20_000)  # 44 KB of float weights in, ~15 KB of int8 out: one file
    single = _ok(cli("quantize", ".", "--out", tmp_path / "q-one", "--no-bench", "--json"))
    assert sorted(p.name for p in out.iterdir()) == before

    q_ext, q_one = open_artifact(tmp_path / "q-ext"), open_artifact(tmp_path / "q-one")
    assert {p.name for p in q_ext.path.iterdir()} == BASE_FILES | {"model.onnx.data"}
    assert {p.name for p in q_one.path.iterdir()} == BASE_FILES
    assert q_ext.config["onnx"]["external_data"] and not q_one.config["onnx"]["external_data"]
    assert q_ext.config["onnx"]["dtype"] == "int8" and q_ext.config["quantization"]["mode"] == "dynamic"
    # the same int8 model either way
    assert external["report"]["after"]["accuracy"] == single["report"]["after"]["accuracy"]
    assert external["quantization"]["quantized_nodes"] == single["quantization"]["quantized_nodes"]
    assert external["report"]["after"]["file_bytes"] == q_ext.file_bytes("model.onnx")
    for q in (q_ext, q_one):
        evaluated = _ok(cli("eval", q.path, "--json"))
        assert evaluated["backend"] == "onnx" and evaluated["accuracy"] == external["report"]["after"]["accuracy"]


def test_static_quantize_cnn_and_no_preprocess(cli, export_external, digits_cnn, digits_mlp, tmp_path, threshold):
    from bigmodel_cli.artifact import open_artifact

    threshold(0)
    static = _ok(cli("quantize", export_external(digits_cnn), "--out", tmp_path / "cnn", "--calib-samples", "32",
                     "--no-bench", "--json"))
    q = open_artifact(tmp_path / "cnn")
    assert static["mode"] == "static" and q.config["quantization"]["format"] == "QDQ"
    assert q.config["onnx"]["external_data"] and (q.path / "model.onnx.data").is_file()
    assert static["report"]["metric_drop"] <= 3.0
    assert _ok(cli("eval", q.path, "--json"))["accuracy"] == pytest.approx(static["report"]["after"]["accuracy"])

    # without pre-processing the float model is copied, its tensors pointed at the copy's data file
    raw = _ok(cli("quantize", export_external(digits_mlp), "--out", tmp_path / "raw", "--no-preprocess",
                  "--no-bench", "--json"))
    assert raw["quantization"]["preprocess"]["applied"] is False and raw["quantization"]["quantized_nodes"]
    assert open_artifact(tmp_path / "raw").config["onnx"]["external_data"]


# --- deployment ----------------------------------------------------------------------------------


def test_deploy_snippet_runs_the_external_data_artifact_without_torch(export_external, tmp_path_factory,
                                                                     digits_mlp, tmp_path):
    from importlib import resources

    from test_deploy import run_client

    deploy = tmp_path / "deploy"
    deploy.mkdir()
    out = export_external(digits_mlp)
    for name in ("model.onnx", "model.onnx.data", "config.json"):  # what a client ships
        shutil.copyfile(out / name, deploy / name)
    single = tmp_path / "single"
    single.mkdir()
    for name in ("model.onnx", "config.json"):
        shutil.copyfile(export_once(tmp_path_factory, digits_mlp) / name, single / name)
    with resources.files("bigmodel_cli.data").joinpath("digits.npz").open("rb") as handle:
        np.save(tmp_path / "samples.npy", np.load(handle, allow_pickle=False)["x"][200:232].astype(np.float32))

    stdout, imported = run_client(deploy, str(tmp_path / "samples.npy"), tmp_path)
    assert "onnxruntime" in imported and not imported & {"torch", "bigmodel_cli", "safetensors"}
    expected, _ = run_client(single, str(tmp_path / "samples.npy"), tmp_path)
    got = [json.loads(line) for line in stdout.splitlines()]
    want = [json.loads(line) for line in expected.splitlines()]
    assert len(got) == 32 and [g["class"] for g in got] == [w["class"] for w in want]
    np.testing.assert_allclose([g["probability"] for g in got], [w["probability"] for w in want], atol=1e-6)


# --- damaged data files ----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [(_truncate, "does not match the sha256"),
                                             (_flip, "does not match the sha256"),
                                             (Path.unlink, "model.onnx.data is listed in the manifest but missing")])
def test_a_damaged_data_file_is_one_line_exit_2(cli, export_external, digits_mlp, tmp_path, damage, message):
    artifact = _copy(export_external(digits_mlp), tmp_path / "damaged")
    damage(artifact / "model.onnx.data")
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.float32))
    for command in (("eval", artifact), ("predict", artifact, tmp_path / "x.npy"), ("info", artifact),
                    ("quantize", artifact, "--out", tmp_path / "q"), ("export", artifact, "--out", tmp_path / "e")):
        assert_one_error_line(cli(*command), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "x.npy"]  # nothing written


def test_a_truncated_data_file_that_its_manifest_agrees_with_is_one_line_exit_2(cli, export_external, digits_mlp,
                                                                              tmp_path):
    """The hashes cannot catch a data file that was already short when the manifest was written;
    reading it must still be a clear user error, not an internal failure."""
    from bigmodel_cli.artifact import open_artifact, write_metadata

    source = export_external(digits_mlp, "--optimize", "extended", "--no-weights")
    artifact = tmp_path / "short"
    artifact.mkdir()
    shutil.copyfile(source / "model.onnx", artifact / "model.onnx")
    (artifact / "model.onnx.data").write_bytes((source / "model.onnx.data").read_bytes()[:1000])
    write_metadata(artifact, config=open_artifact(source).config, stage="export")
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.float32))
    for command in (("eval", artifact), ("predict", artifact, tmp_path / "x.npy"), ("info", artifact),
                    ("quantize", artifact, "--out", tmp_path / "q", "--no-bench")):
        assert_one_error_line(cli(*command), "model.onnx.data", "re-export")
    assert not (tmp_path / "q").exists()


def test_a_data_file_the_manifest_does_not_list_is_refused(cli, mlp_onnx, tmp_path):
    artifact = _copy(mlp_onnx, tmp_path / "extra")
    (artifact / "model.onnx.data").write_bytes(b"\0" * 64)
    assert_one_error_line(cli("eval", artifact), "model.onnx.data", "not listed in the manifest")


# --- the file layout helpers ---------------------------------------------------------------------


def _tiny_onnx(directory: Path, external: bool) -> Path:
    """One MatMul with an 8×4 weight, saved as one file or with model.onnx.data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(8, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    directory.mkdir()
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=external, location="model.onnx.data", size_threshold=0)
    return path


def test_opening_a_model_whose_data_file_is_gone_names_that_file(tmp_path):
    """Outside an artifact (no manifest to catch it first): ONNX Runtime's own error does not name
    the file, so the failed load is followed by the check that does."""
    from bigmodel_cli.engine.onnx.runtime import open_session
    from bigmodel_cli.errors import UserError

    path = _tiny_onnx(tmp_path / "external", external=True)
    session, _ = open_session(path, threads=1)
    assert session.run(None, {"x": np.ones((1, 8), np.float32)})[0].tolist() == [[112.0, 120.0, 128.0, 136.0]]
    (tmp_path / "external" / "model.onnx.data").unlink()
    with pytest.raises(UserError, match=r"model\.onnx\.data: missing"):
        open_session(path, threads=1)


def test_a_one_file_model_is_not_parsed_before_loading(tmp_path, monkeypatch):
    """Parsing a one-file model reads all its weights; the data-file check runs only when a data
    file sits beside the model."""
    from bigmodel_cli.engine.onnx import files as onnx_files
    from bigmodel_cli.engine.onnx.runtime import open_session

    parsed = []
    monkeypatch.setattr(onnx_files, "check_external_data", lambda path: parsed.append(path))
    open_session(_tiny_onnx(tmp_path / "one", external=False), threads=1)
    assert parsed == []
    open_session(_tiny_onnx(tmp_path / "two", external=True), threads=1)
    assert parsed == [tmp_path / "two" / "model.onnx"]


def test_place_packs_one_file_per_tensor_into_one_data_file(tmp_path, export_external, digits_mlp, monkeypatch):
    """The TorchScript exporter's layout above 2 GB (a file per tensor) becomes model.onnx.data, and
    back to one file; the model computes the same either way. The working directory holds a
    model.onnx.data, which onnx.save_model would trip over."""
    import onnx
    import onnxruntime as ort

    from bigmodel_cli.engine.onnx import files as onnx_files

    source = export_external(digits_mlp)
    monkeypatch.chdir(source)
    per_tensor = tmp_path / "per-tensor"
    per_tensor.mkdir()
    onnx.save_model(onnx.load(str(source / "model.onnx")), str(per_tensor / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(per_tensor.iterdir())) > 3

    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)

    def run(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    expected = run(source / "model.onnx")
    packed, single = tmp_path / "packed", tmp_path / "single"
    packed.mkdir()
    single.mkdir()
    onnx_files.place(per_tensor / "model.onnx", packed / "model.onnx", external=True)
    assert sorted(p.name for p in packed.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert onnx_files.external_locations(packed / "model.onnx") == {"model.onnx.data"}
    onnx_files.place(packed / "model.onnx", single / "model.onnx", external=False)
    assert sorted(p.name for p in single.iterdir()) == ["model.onnx"]
    assert not onnx_files.has_external_data(single / "model.onnx")
    np.testing.assert_array_equal(run(single / "model.onnx"), expected)
    copied = tmp_path / "copied.onnx"
    onnx_files.copy(source / "model.onnx", copied)  # another name: its tensors point at copied.onnx.data
    assert onnx_files.external_locations(copied) == {"copied.onnx.data"}
    np.testing.assert_array_equal(run(copied), expected)
    with pytest.raises(ValueError):
        onnx_files.place(copied, tmp_path / "again.onnx", external=True)  # same directory: refused


# --- a real model over 2 GB (pytest -m slow) -------------------------------------------------------
# Nothing is patched: the weights really are over protobuf's limit. Each command runs in its own
# process, as a user runs it, so each one's memory is its own (quantize alone peaks at 14–18 GB
# here; in one process with the others it reached 23 GB of this machine's 24). Together the tests
# need ~12 GB of disk under the temporary directory; figures in docs/export.md.

BIG_HIDDEN = [16384, 16384, 17408]  # 555M parameters: 2.22 GB of float32, 2.07 GiB


def _bigmodel(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bigmodel_cli", *map(str, args), "--json"], capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _big_params() -> int:
    sizes = [64, *BIG_HIDDEN, 10]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


@pytest.fixture(scope="module")
def big_artifact(tmp_path_factory) -> Path:
    """An untrained digits MLP over 2 GB, saved as a training artifact (as benchmarks/export.py
    makes its untrained GPT): export and ONNX Runtime do not care whether it learned anything."""
    import torch

    from bigmodel_cli.artifact import new_config, save_torch_artifact
    from bigmodel_cli.data import load_dataset, parse_data_arg
    from bigmodel_cli.models import build_model, resolve_spec

    torch.manual_seed(0)
    spec = resolve_spec("mlp", None, {"hidden_sizes": BIG_HIDDEN}, data_fit={"input_size": 64, "num_classes": 10})
    data = dict(load_dataset(parse_data_arg("digits")).spec)  # normalization, shapes, class names
    out = tmp_path_factory.mktemp("big") / "mlp"
    save_torch_artifact(out, build_model(spec), config=new_config("classification", spec, data), stage="train")
    return out


@pytest.fixture(scope="module")
def big_export(big_artifact) -> Path:
    out = big_artifact.parent / "onnx"
    _bigmodel("export", big_artifact, "--out", out)
    return out


@pytest.mark.slow
def test_a_real_model_over_2_gb_exports_to_model_onnx_data(big_export, tmp_path):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx.exporters import EXTERNAL_DATA_THRESHOLD_BYTES

    weight_bytes = 4 * _big_params()
    assert weight_bytes > 2 * 1024**3 > EXTERNAL_DATA_THRESHOLD_BYTES
    a = open_artifact(big_export)  # 2.2 GB of ONNX weights (and 2.2 GB of safetensors) hashed and verified
    assert {p.name for p in big_export.iterdir()} == BASE_FILES | {"model.onnx.data", "model.safetensors"}
    assert a.config["onnx"]["external_data"] and a.config["onnx"]["exporter"] == "dynamo"
    assert a.manifest["verification"]["passed"] and a.manifest["verification"]["top1_agreement"] == 1.0
    files = a.manifest["files"]
    assert files["model.onnx"]["bytes"] < 1024**2
    assert files["model.onnx.data"]["bytes"] > weight_bytes - 1024  # the 40-byte last bias stays in the graph

    evaluated = _bigmodel("eval", big_export, "--backend", "onnx", "--limit", "64")
    assert evaluated["backend"] == "onnx" and evaluated["samples"] == 64 and evaluated["params"] == _big_params()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 16, (4, 8, 8)).astype(np.float32))
    predicted = _bigmodel("predict", big_export, tmp_path / "x.npy")
    assert predicted["samples"] == 4 and predicted["backend"] == "onnx"
    assert _bigmodel("info", big_export)["params"] == _big_params()


@pytest.mark.slow
def test_a_real_model_over_2_gb_through_the_torchscript_exporter(big_artifact, tmp_path):
    """The legacy exporter writes one file per tensor above 2 GB; the artifact still has one data file."""
    from bigmodel_cli.artifact import open_artifact

    out = tmp_path / "ts"
    exported = _bigmodel("export", big_artifact, "--out", out, "--exporter", "torchscript", "--no-weights")
    assert exported["external_data"] and exported["verification"]["passed"]
    assert {p.name for p in out.iterdir()} == BASE_FILES | {"model.onnx.data"}
    assert open_artifact(out).config["onnx"]["exporter"] == "torchscript"
    assert _bigmodel("info", out)["params"] == _big_params()  # ONNX-only: read from model.onnx.data


@pytest.mark.slow
def test_a_real_model_over_2_gb_quantizes_to_one_int8_file(big_export, tmp_path):
    """Dynamic int8 of the 2.2 GB model is 0.56 GB: under the threshold, so one file again."""
    from bigmodel_cli.artifact import open_artifact

    out = tmp_path / "int8"
    report = _bigmodel("quantize", big_export, "--out", out, "--limit", "64", "--no-bench")
    q = open_artifact(out)
    assert {p.name for p in out.iterdir()} == BASE_FILES and not q.config["onnx"]["external_data"]
    assert report["report"]["size_ratio"] > 3.5
    assert _bigmodel("eval", out, "--limit", "64")["samples"] == 64


def test_a_llama_goes_down_the_external_data_path_and_evaluates_like_its_one_file_export(
        cli, export_external, tmp_path_factory, corpus):
    """The Llama family through the >2 GB layout: RoPE tables and GQA projections end up in the one
    data file, and ONNX Runtime reads the same model from it as from a single file."""
    from bigmodel_cli import TrainConfig, train
    from bigmodel_cli.engine.onnx.files import external_locations

    run = tmp_path_factory.mktemp("llama") / "run"
    train(TrainConfig(model="llama", model_args={"n_layer": 1, "n_embd": 16, "n_head": 4, "n_kv_head": 2,
                                                 "block_size": 32}, data=f"text:{corpus}", block_size=16,
                      batch_size=4, max_steps=3, eval_windows=4, out=str(run), seed=0))
    external = export_external(run)
    single = tmp_path_factory.mktemp("llama") / "onnx"
    assert cli("export", run, "--out", single).exit_code == 0
    assert external_locations(external / "model.onnx") == {"model.onnx.data"}
    assert not (single / "model.onnx.data").exists()
    losses = [_ok(cli("eval", path, "--backend", "onnx", "--limit", "4", "--json"))["loss"] for path in (external, single)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
