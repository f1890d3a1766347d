"""bigmodel export: verified ONNX for mlp, cnn, gpt and a user's model; the ONNX Runtime backend;
bad inputs (exit 2) and failed verification (exit 1) leave nothing behind."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest



def user_artifact(tmp_path: Path, like: Path, code: str, entry: str) -> Path:
    """A classification artifact whose model is the user's Python file (built without training)."""
    import importlib.util

    from bigmodel_cli.artifact import new_config, open_artifact, save_torch_artifact

    source = tmp_path / f"{entry.lower()}_model.py"
    source.write_text(textwrap.dedent(code))
    spec = importlib.util.spec_from_file_location(f"user_{entry}", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, entry)()
    data = open_artifact(like).data_spec
    out = tmp_path / f"{entry.lower()}-artifact"
    save_torch_artifact(out, model, config=new_config("classification", {"arch": "user", "file": "model.py", "entry": entry, "args": {}}, data),
                        stage="train", extra_files={"model.py": source})
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_mlp_export_is_a_verified_artifact(mlp_onnx, digits_mlp):
    from bigmodel_cli.artifact import open_artifact

    a = open_artifact(mlp_onnx)  # hashes verified
    m = _manifest(mlp_onnx)
    assert a.stage == "export" and a.has_onnx and a.has_weights
    assert m["parent"]["path"] == str((digits_mlp / "best").resolve())
    onnx_meta = a.config["onnx"]
    assert onnx_meta["exporter"] == "dynamo" and onnx_meta["opset"] == 18 and onnx_meta["portable"]
    assert onnx_meta["inputs"][0]["name"] == "input" and onnx_meta["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert onnx_meta["outputs"][0]["shape"] == ["batch", 10] and onnx_meta["symbolic_dims"] == ["batch"]
    v = m["verification"]
    assert v["passed"] and v["checker"] == "full" and v["max_abs_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
    assert [s[0] for s in v["shapes"]] == [1, 7]  # batch sizes that differ from the tracing example (2)
    assert m["metrics"]["verify_max_abs_diff"] == v["max_abs_diff"]
    assert a.data_spec == open_artifact(digits_mlp).data_spec  # fed exactly like its parent


def test_onnx_backend_matches_torch_on_the_same_directory(cli, mlp_onnx):
    runs = {}
    for backend in ("onnx", "torch"):
        r = cli("eval", mlp_onnx, "--backend", backend, "--json")
        assert r.exit_code == 0, r.output
        runs[backend] = json.loads(r.stdout)
    assert runs["onnx"]["provider"] == "CPUExecutionProvider" and runs["onnx"]["backend"] == "onnx"
    assert runs["onnx"]["accuracy"] == runs["torch"]["accuracy"] > 0.8
    assert abs(runs["onnx"]["loss"] - runs["torch"]["loss"]) < 1e-5
    assert runs["onnx"]["params"] == runs["torch"]["params"]  # read from the ONNX initializers
    assert runs["onnx"]["file_bytes"] == (mlp_onnx / "model.onnx").stat().st_size


def test_eval_bench_reports_both_backends_side_by_side(cli, mlp_onnx):
    r = cli("eval", mlp_onnx, "--bench", "--iterations", "3", "--warmup", "1", "--bench-batch", "16", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    torch_r, onnx_r = report["backends"]["torch"], report["backends"]["onnx"]
    for res in (torch_r, onnx_r):
        assert res["latency_ms_p50"] > 0 and res["bench_batch"] == 16 and res["bench_iterations"] == 3
    assert torch_r["threads"] == onnx_r["threads"] and torch_r["accuracy"] == onnx_r["accuracy"]
    assert report["latency_ratio_onnx_over_torch"] == pytest.approx(onnx_r["latency_ms_p50"] / torch_r["latency_ms_p50"])
    single = cli("eval", mlp_onnx, "--bench", "--backend", "onnx", "--iterations", "2", "--json")
    assert single.exit_code == 0 and json.loads(single.stdout)["backend"] == "onnx"


def test_gpt_export_has_symbolic_batch_and_sequence(gpt_onnx, tiny_gpt):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.backends import open_backend

    a = open_artifact(gpt_onnx)
    assert a.config["onnx"]["inputs"][0]["shape"] == ["batch", "seq"] and a.config["onnx"]["inputs"][0]["dtype"] == "int64"
    shapes = _manifest(gpt_onnx)["verification"]["shapes"]
    assert {s[0] for s in shapes} == {1, 7} and len({s[1] for s in shapes}) == 2
    x = np.random.default_rng(5).integers(0, 256, size=(3, 11))  # a shape nobody checked
    onnx_out = open_backend(a, "onnx").predict(x)
    torch_out = open_backend(a, "torch").predict(x)
    assert onnx_out.shape == (3, 11, 256)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4)


def test_cnn_export_with_onnx_runtime_fusions(cli, tmp_path, digits_cnn):
    out = tmp_path / "cnn-onnx"
    r = cli("export", digits_cnn, "--out", out, "--optimize", "extended", "--no-weights", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # stdout is only the JSON: the exporters' chatter is kept off it
    assert summary["verification"]["passed"] and summary["optimize"] == "extended"
    assert not (out / "model.safetensors").exists()
    onnx_eval = cli("eval", out, "--json")
    torch_eval = cli("eval", digits_cnn, "--json")
    assert json.loads(onnx_eval.stdout)["accuracy"] == json.loads(torch_eval.stdout)["accuracy"]
    # an ONNX-only artifact cannot be exported again, nor run on torch: one line, exit 2
    again = cli("export", out, "--out", tmp_path / "again")
    assert again.exit_code == 2 and "ONNX-only" in again.stderr and not (tmp_path / "again").exists()
    assert cli("eval", out, "--backend", "torch").exit_code == 2


def test_fp16_export_keeps_float32_io(cli, tmp_path, digits_mlp):
    import onnx

    out = tmp_path / "fp16"
    r = cli("export", digits_mlp, "--out", out, "--dtype", "fp16", "--json")
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out / "model.onnx"))
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    summary = json.loads(r.stdout)
    assert summary["inputs"][0]["dtype"] == "float32" and summary["outputs"][0]["dtype"] == "float32"
    assert summary["verification"]["atol"] == 5e-2 and summary["verification"]["top1_agreement"] >= 0.9
    assert (out / "model.onnx").stat().st_size < 0.75 * (out / "model.safetensors").stat().st_size


def test_user_model_export_needs_trust_then_works(cli, tmp_path, digits_mlp, monkeypatch):
    code = """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Linear(64, 16)
                self.b = torch.nn.Linear(16, 10)
            def forward(self, x):
                return self.b(torch.tanh(self.a(x.reshape(x.shape[0], -1))))
    """
    source = user_artifact(tmp_path, digits_mlp / "best", code, "Net")
    refused = cli("export", source, "--out", tmp_path / "u1")
    assert refused.exit_code == 2 and "--trust-model-code" in refused.stderr and not (tmp_path / "u1").exists()
    monkeypatch.setenv("BIGMODEL_TRUST_MODEL_CODE", "1")
    r = cli("export", source, "--out", tmp_path / "u1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verification"]["passed"]
    assert (tmp_path / "u1" / "model.py").is_file()  # the torch backend of the export still rebuilds it


def test_unsupported_operator_is_one_line_exit_2(cli, tmp_path, digits_mlp, monkeypatch):
    code = """
        import torch
        class Zeta(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Linear(64, 10)
            def forward(self, x):
                return torch.special.zeta(self.a(x.flatten(1)).abs() + 2, torch.tensor(1.0))
    """
    source = user_artifact(tmp_path, digits_mlp / "best", code, "Zeta")
    monkeypatch.setenv("BIGMODEL_TRUST_MODEL_CODE", "1")
    r = cli("export", source, "--out", tmp_path / "z")
    assert r.exit_code == 2
    assert "cannot be exported to ONNX" in r.stderr and "zeta" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z.tmp-*"))


def test_torchscript_fallback_is_recorded(tmp_path, digits_mlp, monkeypatch):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.onnx import export as export_engine
    from bigmodel_cli.engine.onnx import exporters

    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(exporters, "_dynamo_export", broken)
    result = export_engine.export_artifact(open_artifact(digits_mlp), tmp_path / "ts")
    assert result.exporter == "torchscript" and "simulated dynamo failure" in result.fallback_reason
    m = _manifest(tmp_path / "ts")
    assert m["onnx"]["exporter"] == "torchscript" and "simulated" in m["exporter_fallback"]
    assert m["verification"]["passed"]


def test_failed_verification_exits_1_and_keeps_nothing(cli, tmp_path, digits_cnn):
    out = tmp_path / "strict"
    # TorchScript only to keep the test quick; the check after either exporter is the same
    r = cli("export", digits_cnn, "--out", out, "--atol", "1e-15", "--exporter", "torchscript")
    assert r.exit_code == 1
    assert "verification failed" in r.stderr and "nothing was written" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".strict.*"))


@pytest.mark.parametrize("opset", ["17", "99"])
def test_opset_outside_the_range_exits_2(cli, tmp_path, digits_mlp, opset):
    r = cli("export", digits_mlp, "--out", tmp_path / "o", "--opset", opset)
    assert r.exit_code == 2 and "outside the supported range 18" in r.stderr and not (tmp_path / "o").exists()


def test_bad_options_are_reported_together(cli, tmp_path, digits_mlp):
    r = cli("export", digits_mlp, "--out", tmp_path / "o", "--dtype", "int3", "--dynamic", "batch,seq", "--optimize", "max")
    assert r.exit_code == 2
    assert "--dtype" in r.stderr and "--dynamic seq" in r.stderr and "--optimize" in r.stderr
    exists = cli("export", digits_mlp, "--out", tmp_path)  # an existing output is refused before any work
    assert exists.exit_code == 2 and "--overwrite" in exists.stderr


def test_corrupt_artifact_exits_2(cli, tmp_path, digits_mlp):
    copy = tmp_path / "corrupt"
    shutil.copytree(digits_mlp / "best", copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = cli("export", copy, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "sha256" in r.stderr and not (tmp_path / "o").exists()


def test_a_file_that_is_not_onnx_exits_2(cli, tmp_path, mlp_onnx):
    from bigmodel_cli.artifact import open_artifact, write_metadata

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.onnx").write_bytes(b"this is not a protobuf")
    write_metadata(fake, config=open_artifact(mlp_onnx).config, stage="export")  # hashes match: only the content is wrong
    r = cli("eval", fake)
    assert r.exit_code == 2 and "not a valid ONNX model" in r.stderr and "Traceback" not in r.output
    info = cli("info", fake)
    assert info.exit_code == 2 and "not a readable ONNX file" in info.stderr
