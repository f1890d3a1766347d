"""bigmodel quantize: ONNX Runtime dynamic and static int8, the per-CPU scheme, the accuracy gate and
its node ranking, weight-only int8/int4 that loads back into torch, and bad input (exit 2, nothing
written, nothing left in the working directory)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import export_once

# Timing is not what these tests check: keep it short.
FAST = ("--iterations", "2", "--warmup", "0")


# mlp_onnx and gpt_onnx come from conftest (exported once per session, shared with other files);
# quantize only reads them.
@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory, digits_cnn):
    return export_once(tmp_path_factory, digits_cnn)


def _ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _ops(path: Path) -> dict[str, list]:
    """Nodes by op type, of an artifact directory's model.onnx or of an ONNX file."""
    import onnx

    nodes: dict[str, list] = {}
    for node in onnx.load(str(path / "model.onnx" if path.is_dir() else path)).graph.node:
        nodes.setdefault(node.op_type, []).append(node)
    return nodes


def _one_error_line(result, *needles: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- dynamic and static int8 -------------------------------------------------------------------------


def test_dynamic_mlp_is_smaller_keeps_accuracy_and_runs_in_eval(cli, mlp_onnx, tmp_path, monkeypatch):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.core.hardware import cpu_flags
    from bigmodel_cli.engine.compress.quantize.scheme import choose_scheme, detect_isa

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # ORT's tools and ours must leave nothing here
    out = tmp_path / "q"
    data = _ok(cli("quantize", mlp_onnx, "--out", out, "--json", *FAST))
    assert _leftovers(work) == [] and _leftovers(tmp_path) == ["cwd", "q"]

    q = open_artifact(out)  # every file's hash verified
    manifest = q.manifest
    assert q.stage == "quantize" and q.has_onnx and not q.has_weights
    assert manifest["parent"]["path"] == str(mlp_onnx.resolve())
    section = q.config["quantization"]
    expected = choose_scheme(detect_isa(cpu_flags()))
    assert section["mode"] == data["mode"] == "dynamic"
    assert section["scheme"]["weight_type"] == "int8" and section["scheme"]["reduce_range"] == expected.reduce_range
    assert section["scheme"]["isa"] == expected.isa and section["scheme"]["reason"]
    assert section["calibration"] is None and q.config["onnx"]["dtype"] == "int8"
    assert len(_ops(out)["MatMulInteger"]) == 2 == len(section["quantized_nodes"])

    report = manifest["report"]
    assert report["before"]["file_bytes"] > 2.5 * report["after"]["file_bytes"]
    assert report["after"]["file_bytes"] == (out / "model.onnx").stat().st_size
    assert report["metric"] == "accuracy" and report["metric_drop"] <= 1.0  # accuracy points
    assert report["before"]["latency_ms_p50"] > 0 and report["after"]["latency_ms_p50"] > 0
    assert report["latency"]["threads"] >= 1 and report["latency"]["input_shape"][1:] == [1, 8, 8]
    assert manifest["metrics"]["size_ratio"] == pytest.approx(report["size_ratio"])

    evaluated = _ok(cli("eval", out, "--json"))
    assert evaluated["backend"] == "onnx" and evaluated["accuracy"] == pytest.approx(report["after"]["accuracy"])


def test_static_is_the_default_for_cnn_and_writes_qdq(cli, cnn_onnx, tmp_path):
    from bigmodel_cli.artifact import open_artifact

    out = tmp_path / "q"
    _ok(cli("quantize", cnn_onnx, "--out", out, "--calib-samples", "64", "--no-bench", "--json"))
    q = open_artifact(out)
    section = q.config["quantization"]
    assert section["mode"] == "static" and section["format"] == "QDQ"
    assert section["calibration"]["method"] == "minmax" and section["calibration"]["samples"] == 64
    assert "training split" in section["calibration"]["source"]
    ops = _ops(out)
    assert ops.get("QuantizeLinear") and ops.get("DequantizeLinear") and len(ops["Conv"]) == 2
    assert q.manifest["report"]["metric_drop"] <= 2.0
    assert "latency_ms_p50" not in q.manifest["report"]["after"]  # --no-bench


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_static_with_users_calibration_inputs_and_other_methods(cli, mlp_onnx, tmp_path, method):
    from bigmodel_cli.data import load_dataset, parse_data_arg

    raw = load_dataset(parse_data_arg("digits")).x[:40]  # raw pixels: normalized like the training data
    np.save(tmp_path / "calib.npy", raw)
    data = _ok(cli("quantize", mlp_onnx, "--out", tmp_path / "q", "--mode", "static", "--method", method,
                   "--calib-data", tmp_path / "calib.npy", "--no-bench", "--json"))
    calibration = data["quantization"]["calibration"]
    assert calibration["method"] == method and calibration["samples"] == 40
    assert calibration["source"] == f"--calib-data {tmp_path / 'calib.npy'}" and calibration["sample_shape"] == [1, 8, 8]
    assert data["report"]["metric_drop"] <= 2.0


def test_calibration_inputs_are_fed_like_the_training_data(mlp_onnx, tmp_path):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.data import load_dataset
    from bigmodel_cli.engine.compress.quantize.calibration import calibration_set

    artifact = open_artifact(mlp_onnx)
    data = load_dataset(dict(artifact.data_spec))
    np.save(tmp_path / "raw.npy", data.x[data.splits["train"]])  # raw pixels, as a user has them
    own = calibration_set(artifact, None, samples=100_000, calib_data=str(tmp_path / "raw.npy"))
    default = calibration_set(artifact, None, samples=100_000)  # the artifact's own training split
    expected, _ = data.arrays("train")
    assert np.array_equal(np.concatenate(own.batches), expected)
    assert np.array_equal(np.concatenate(default.batches), expected)
    assert [len(b) for b in own.batches][:2] == [64, 64] and own.samples == len(expected)


def test_static_transformer_keeps_sensitive_ops_in_float(cli, gpt_onnx, tmp_path):
    from bigmodel_cli.artifact import open_artifact

    def fed_by_dequantize(out: Path, op: str) -> list[bool]:
        ops = _ops(out)
        dq_outputs = {o for n in ops.get("DequantizeLinear", []) for o in n.output}
        return [any(i in dq_outputs for i in n.input) for n in ops[op]]

    kept = tmp_path / "kept"
    _ok(cli("quantize", gpt_onnx, "--out", kept, "--mode", "static", "--calib-samples", "16", "--no-bench", "--json"))
    section = open_artifact(kept).config["quantization"]
    kinds = {s["kind"] for s in section["excluded_by"]["sensitive"]}
    assert {"LayerNormalization", "Softmax", "GELU", "residual Add"} <= kinds and section["transformer"]
    assert not any(fed_by_dequantize(kept, "LayerNormalization")) and not any(fed_by_dequantize(kept, "Softmax"))
    assert any(fed_by_dequantize(kept, "MatMul"))  # the projections are int8
    assert open_artifact(kept).manifest["report"]["metric_drop"] <= 5.0  # perplexity percent

    quantized = tmp_path / "all"
    _ok(cli("quantize", gpt_onnx, "--out", quantized, "--mode", "static", "--calib-samples", "16", "--no-bench",
            "--quantize-sensitive", "--json"))
    assert open_artifact(quantized).config["quantization"]["excluded_nodes"] == []
    assert any(fed_by_dequantize(quantized, "LayerNormalization"))  # what the default prevents


def test_dynamic_gpt_keeps_perplexity_and_times_the_requested_shape(cli, gpt_onnx, tmp_path):
    out = tmp_path / "q"
    data = _ok(cli("quantize", gpt_onnx, "--out", out, "--bench-batch", "2", "--seq-len", "16", "--json", *FAST))
    report = data["report"]
    assert data["mode"] == "dynamic" and report["metric"] == "perplexity"
    assert report["metric_drop"] <= 3.0  # the issue's +3% perplexity
    assert report["latency"]["input_shape"] == [2, 16]
    assert _ops(out).get("MatMulInteger")
    assert data["quantization"]["excluded_nodes"] == []  # dynamic leaves LayerNorm/Softmax/GELU alone anyway


def test_a_torch_artifact_needs_export_or_the_export_flag(cli, digits_mlp, tmp_path):
    from bigmodel_cli.artifact import open_artifact

    _one_error_line(cli("quantize", digits_mlp, "--out", tmp_path / "q"), "never exported", "bigmodel export", "--export")
    assert not (tmp_path / "q").exists()
    _ok(cli("quantize", digits_mlp, "--out", tmp_path / "q", "--export", "--no-bench", "--json"))
    q = open_artifact(tmp_path / "q")
    assert q.manifest["parent"]["path"] == str((digits_mlp / "best").resolve())
    assert q.config["quantization"]["exported_for_quantize"]["exporter"] in ("dynamo", "torchscript")
    _one_error_line(cli("quantize", tmp_path / "q", "--out", tmp_path / "again"), "already quantized")


def test_weight_and_isa_overrides_are_recorded(cli, mlp_onnx, tmp_path):
    data = _ok(cli("quantize", mlp_onnx, "--out", tmp_path / "q", "--scheme", "u8u8", "--no-reduce-range",
                   "--per-channel", "--no-bench", "--json"))
    scheme = data["quantization"]["scheme"]
    assert scheme["name"] == "u8u8" and scheme["weight_type"] == "uint8" and scheme["reduce_range"] is False
    assert "--scheme u8u8" in scheme["overridden"] and data["quantization"]["per_channel"] is True


# --- the scheme per CPU ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, machine, isa, name, reduce_range", [
    ({"avx", "avx2", "fma"}, "x86_64", "avx2", "u8s8", True),
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", "avx512", "u8s8", True),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "vnni", "s8s8", False),
    ({"avx2", "avx_vnni"}, "x86_64", "vnni", "s8s8", False),
    ({"asimd", "asimddp"}, "aarch64", "arm", "s8s8", False),
])
def test_scheme_is_chosen_per_cpu(flags, machine, isa, name, reduce_range):
    from bigmodel_cli.engine.compress.quantize.scheme import choose_scheme, detect_isa

    assert detect_isa(frozenset(flags), machine) == isa
    scheme = choose_scheme(isa)
    assert (scheme.name, scheme.reduce_range, scheme.overridden) == (name, reduce_range, [])
    assert scheme.weight_type == "int8" and scheme.activation_type == ("uint8" if name == "u8s8" else "int8")


def test_scheme_overrides():
    from bigmodel_cli.engine.compress.quantize.scheme import choose_scheme

    s8 = choose_scheme("avx2", "s8s8")
    assert s8.name == "s8s8" and not s8.reduce_range and s8.overridden == ["--scheme s8s8"]
    full = choose_scheme("avx2", reduce_range=False)
    assert full.name == "u8s8" and not full.reduce_range and full.overridden == ["--no-reduce-range"]


# --- the accuracy gate ------------------------------------------------------------------------------


def _heavy_tailed_model(path: Path):
    """Three MatMuls; the last one's weights are Cauchy-distributed (a few huge, most tiny), which
    per-tensor int8 cannot represent well."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((16, 32)) * 0.3, "w2": rng.standard_normal((32, 32)) * 0.3,
               "w3": rng.standard_cauchy((32, 10)) * 0.05}
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h1"], name="first"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="second"), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["logits"], name="heavy_tailed")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return [rng.standard_normal((32, 16)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_ranking_puts_the_worst_quantized_tensor_first(tmp_path, mode):
    from bigmodel_cli.engine.compress.quantize import calibration, gate, onnx_int8, scheme

    model = tmp_path / "float.onnx"
    batches = _heavy_tailed_model(model)
    out = tmp_path / "int8.onnx"
    reader = calibration.make_reader("input", batches) if mode == "static" else None
    onnx_int8.quantize_file(model, out, onnx_int8.Int8Settings(mode, scheme.choose_scheme("avx2"), False), [], reader)
    graph = onnx_int8.load_graph(model)
    candidates = onnx_int8.quantized_nodes(graph, out, mode)
    assert sorted(candidates) == ["first", "heavy_tailed", "second"]
    errors = gate.tensor_errors(model, out, mode, "input", batches, tmp_path)
    assert {"w1", "w2", "w3", "input", "r1", "r2"} <= set(errors)
    ranking = gate.rank_nodes(graph, candidates, errors)
    assert [r["node"] for r in ranking][0] == "heavy_tailed" and ranking[0]["tensor"] == "w3"
    assert ranking[0]["sqnr_db"] < ranking[1]["sqnr_db"] - 5  # a clear margin, in dB
    assert all(25 < e < 60 for e in errors.values())  # plausible SQNRs for 7/8-bit quantization


@pytest.fixture
def int8_scores_badly(monkeypatch):
    """int8 models whose every MatMul is quantized answer with one constant class, so the gate must
    keep a node in float; ``always=True`` makes every int8 model answer that way."""
    from bigmodel_cli.engine.compress.quantize import int8_flow as engine

    real = engine.onnx_predict
    state = {"always": False}

    def fake(path: Path, threads):
        predict = real(path, threads)
        ops = _ops(path)
        quantized = len(ops.get("MatMulInteger", []))
        floats = len(ops.get("MatMul", [])) + len(ops.get("Gemm", []))
        if quantized and (state["always"] or not floats):
            return lambda x: np.tile(np.eye(10, dtype=np.float32)[3], (len(x), 1))
        return predict

    monkeypatch.setattr(engine, "onnx_predict", fake)
    return state


def test_gate_keeps_the_worst_node_in_float_and_passes(cli, mlp_onnx, tmp_path, int8_scores_badly):
    from bigmodel_cli.artifact import open_artifact

    data = _ok(cli("quantize", mlp_onnx, "--out", tmp_path / "q", "--max-metric-drop", "1", "--no-bench", "--json"))
    gate = data["gate"]
    assert gate["passed"] and len(gate["attempts"]) == 2
    assert gate["attempts"][0]["drop"] > 50 and gate["attempts"][1]["drop"] <= 1
    worst = gate["ranking"][0]["node"]
    assert gate["attempts"][1]["excluded"] == [worst] == gate["excluded"]
    assert [r["sqnr_db"] for r in gate["ranking"]] == sorted(r["sqnr_db"] for r in gate["ranking"])
    q = open_artifact(tmp_path / "q")
    assert q.config["quantization"]["excluded_by"]["gate"] == [worst]
    float_nodes = {n.name for n in _ops(tmp_path / "q").get("MatMul", [])}
    assert worst in float_nodes and len(_ops(tmp_path / "q")["MatMulInteger"]) == 1


def test_gate_that_still_fails_exits_1_and_names_the_nodes(cli, mlp_onnx, tmp_path, int8_scores_badly):
    int8_scores_badly["always"] = True
    r = cli("quantize", mlp_onnx, "--out", tmp_path / "q", "--max-metric-drop", "0.5", "--max-retries", "3", "--no-bench")
    # two quantized nodes: one retry (the worst in float); keeping both in float is not quantizing
    _one_error_line(r, "accuracy gate failed", "retries kept the worst nodes", "1 in float (node_linear",
                    "nothing was written", code=1)
    assert _leftovers(tmp_path) == []


def test_slower_int8_gets_a_loud_warning(cli, mlp_onnx, tmp_path, monkeypatch):
    from bigmodel_cli.engine.compress.quantize import measure

    def slow_after(predicts, example, cfg, progress=None):
        return {name: {"latency_ms_p50": 1.0 if name == "before" else 2.0, "latency_ms_p95": 3.0, "throughput": 1.0}
                for name in predicts}

    monkeypatch.setattr(measure, "benchmark_side_by_side", slow_after)
    r = cli("quantize", mlp_onnx, "--out", tmp_path / "q", *FAST)
    assert r.exit_code == 0, r.output
    assert "WARNING" in r.stderr and "SLOWER" in r.stderr
    report = json.loads((tmp_path / "q" / "manifest.json").read_text())["report"]
    assert report["latency_ratio"] == pytest.approx(2.0) and "SLOWER" in report["warnings"][0]


# --- weight-only ----------------------------------------------------------------------------------------


def test_weight_only_int8_tied_gpt_loads_back_into_torch(cli, tiny_gpt, tmp_path):
    import torch
    from safetensors import safe_open

    from bigmodel_cli.artifact import open_artifact

    out = tmp_path / "w8"
    data = _ok(cli("quantize", tiny_gpt, "--out", out, "--mode", "weight-only", "--json"))
    report = data["report"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("tok_emb.weight").dtype == torch.int8
        assert f.get_tensor("tok_emb.weight.scale").shape == (256,)
    assert "lm_head.weight" not in names  # tied to tok_emb.weight, stored once
    assert report["size_ratio"] > 3.0 and report["metric_drop"] <= 1.0

    q, parent = open_artifact(out), open_artifact(tiny_gpt)
    assert q.stage == "quantize" and q.manifest["parent"]["path"] == str(parent.path)
    model, reference = q.build_model(), parent.build_model()
    assert model.lm_head.weight is model.tok_emb.weight  # the tie survives dequantization
    # A fixed input: the global generator's state depends on which tests ran before this one.
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - reference(x)).abs().max().item()
    assert 0 < diff < 0.1 and diff <= 2 * report["output_error"]["max_abs_diff"] + 0.05
    assert _ok(cli("eval", out, "--json"))["perplexity"] == pytest.approx(report["after"]["perplexity"])


def test_weight_only_int4_packs_two_weights_per_byte(cli, digits_mlp, tmp_path):
    import torch
    from safetensors import safe_open

    from bigmodel_cli.artifact import open_artifact

    out = tmp_path / "w4"
    data = _ok(cli("quantize", digits_mlp, "--out", out, "--mode", "weight-only", "--bits", "4", "--group-size", "32", "--json"))
    with safe_open(out / "model.safetensors", framework="pt") as f:
        packed, scale = f.get_tensor("net.0.weight"), f.get_tensor("net.0.weight.scale")
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (128, 32)  # 64 inputs → 32 bytes
    assert scale.dtype == torch.float16 and tuple(scale.shape) == (128, 2)  # 64 inputs / group 32
    report = data["report"]
    assert report["size_ratio"] > 5.0 and report["metric_drop"] <= 3.0
    assert data["quantization"]["tensors"]["net.0.weight"] == [128, 64]
    assert open_artifact(out).build_model().net[0].weight.shape == (128, 64)


@pytest.mark.parametrize("shape, bits, group", [((5, 7), 8, 64), ((3, 5), 4, 4), ((4, 2, 3, 3), 4, 8), ((6, 64), 4, 64)])
def test_weight_only_round_trip_error_is_within_half_a_step(shape, bits, group):
    import torch

    from bigmodel_cli.engine.compress.quantize.weight_only import dequantize_tensor, quantize_tensor

    torch.manual_seed(0)
    w = torch.randn(shape)
    w[0] = 0  # an all-zero output channel must survive
    stored, scale = quantize_tensor(w, bits, group)
    back = dequantize_tensor(stored, scale, list(shape), bits)
    assert back.shape == w.shape and torch.all(back[0] == 0)
    rows = w.reshape(shape[0], -1)
    step = rows.abs().amax(dim=1, keepdim=True) / (127 if bits == 8 else 7)
    assert torch.all((back.reshape(shape[0], -1) - rows).abs() <= step / 2 + 1e-3 * step + 1e-6)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (("--mode", "int3"), ["--mode 'int3' is unknown"]),
    (("--mode", "static", "--method", "kl"), ["--method 'kl' is unknown"]),
    (("--method", "entropy"), ["--method is the calibration method of --mode static"]),
    (("--mode", "weight-only", "--bits", "3"), ["--bits 3 is not possible"]),
    (("--bits", "4"), ["--bits 4 is for --mode weight-only"]),
    (("--mode", "weight-only", "--bits", "4", "--group-size", "7"), ["--group-size must be an even number"]),
    (("--mode", "static", "--calib-data", "BAD_NPY"), ["samples are shaped 5", "1×8×8"]),
    (("--mode", "static", "--calib-data", "text:CORPUS"), ["is text", "classifier"]),
    (("--mode", "static", "--calib-data", "npz:/no/such.npz"), ["--calib-data npz:/no/such.npz"]),
    (("--exclude", "no_such_node"), ["--exclude no_such_node: no node of that name"]),
    (("--mode", "int3", "--bits", "5", "--calib-samples", "0"), ["3 problems"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, mlp_onnx, corpus, tmp_path, monkeypatch, args, needles):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 5), dtype=np.float32))
    args = [str(bad) if a == "BAD_NPY" else a.replace("CORPUS", str(corpus)) for a in args]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    _one_error_line(cli("quantize", mlp_onnx, "--out", tmp_path / "q", "--no-bench", *args), *needles)
    assert _leftovers(tmp_path) == ["bad.npy", "cwd"] and _leftovers(work) == []


def test_language_model_calibration_data_must_be_text(cli, gpt_onnx, tmp_path):
    _one_error_line(cli("quantize", gpt_onnx, "--out", tmp_path / "q", "--mode", "static", "--calib-data", "digits"),
                    "classification data", "language model")
    assert not (tmp_path / "q").exists()


def test_weight_only_needs_pytorch_weights(cli, mlp_onnx, tmp_path):
    import shutil

    from bigmodel_cli.artifact import open_artifact, write_metadata

    lean = tmp_path / "lean"  # an ONNX-only export (bigmodel export --no-weights)
    lean.mkdir()
    shutil.copyfile(mlp_onnx / "model.onnx", lean / "model.onnx")
    write_metadata(lean, config=open_artifact(mlp_onnx).config, stage="export")
    _one_error_line(cli("quantize", lean, "--out", tmp_path / "q", "--mode", "weight-only"), "no model.safetensors")
    assert not (tmp_path / "q").exists()
