"""quantize --mode matmul-nbits (engine/compress/quantize/onnx_nbits.py): ONNX Runtime's weight-only
int4/int8 (MatMulNBits) on both graphs of a language-model export, the perplexity gate, tokens/s
before and after, generate with the cache on the result, and the bad options."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_error_line, export_once


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory, corpus):
    from bigmodel_cli import TrainConfig, train

    run = tmp_path_factory.mktemp("runs") / "tiny-llama"
    train(TrainConfig(model="llama", preset="tiny", data=f"text:{corpus}", block_size=32, batch_size=8, max_steps=20,
                      lr=3e-3, eval_windows=8, out=str(run), seed=0,
                      model_args={"n_layer": 1, "n_embd": 32, "n_head": 4, "n_kv_head": 2, "block_size": 64}))
    return export_once(tmp_path_factory, run)


@pytest.mark.parametrize("arch, args", [("gpt", ["--bits", "4", "--group-size", "16"]),
                                        ("llama", ["--bits", "4", "--group-size", "16", "--accuracy-level", "4"]),
                                        ("gpt", ["--bits", "8", "--group-size", "32", "--asymmetric"])])
def test_matmul_nbits_quantizes_both_graphs_gates_and_times_decoding(cli, gpt_onnx, llama_onnx, tmp_path, arch, args):
    source = gpt_onnx if arch == "gpt" else llama_onnx
    out = tmp_path / "q"
    result = cli("quantize", source, "--mode", "matmul-nbits", *args, "--max-metric-drop", "5", "--threads", "1",
                 "--out", out, "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    q, report = body["quantization"], body["report"]
    assert q["bits"] == int(args[1]) and q["quantized_matmuls"]["model.onnx"] > 0
    assert q["quantized_matmuls"]["decoder.onnx"] == q["quantized_matmuls"]["model.onnx"]
    assert report["after"]["perplexity"] <= report["before"]["perplexity"] * 1.05
    for when in ("before", "after"):
        assert report[f"decode_{when}"]["decode_tokens_per_s"] > 0 and report[f"decode_{when}"]["prefill_tokens_per_s"] > 0
    config = json.loads((out / "config.json").read_text())
    assert "com.microsoft" in config["onnx"]["domains"] and config["onnx"]["decoder"]["version"] == 2
    gen = cli("generate", out, "--prompt", "ab", "--max-new-tokens", "5", "--json", "--threads", "1")
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.stdout)["cache"] and json.loads(gen.stdout)["backend"] == "onnx"
    assert cli("eval", out).exit_code == 0


def test_the_perplexity_gate_refuses_and_writes_nothing(cli, gpt_onnx, tmp_path, monkeypatch):
    """A quantized model 10 % worse than --max-metric-drop 5 allows: exit 1, nothing written."""
    from bigmodel_cli.engine.compress.quantize import measure

    real, calls = measure.Evaluator.__call__, []

    def worse_after(self, predict):
        metrics = real(self, predict)
        calls.append(metrics)
        if len(calls) == 2:  # the second evaluation is the quantized model's
            metrics = {**metrics, "perplexity": metrics["perplexity"] * 1.1}
        return metrics

    monkeypatch.setattr(measure.Evaluator, "__call__", worse_after)
    out = tmp_path / "q"
    result = cli("quantize", gpt_onnx, "--mode", "matmul-nbits", "--bits", "4", "--group-size", "16",
                 "--max-metric-drop", "5", "--out", out)
    assert result.exit_code == 1 and not out.exists()
    assert "perplexity" in result.stderr or "gate" in result.stderr or "metric" in result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["--bits", "3"], ("--bits 3", "4 or 8")),
    (["--group-size", "24"], ("--group-size 24", "power of two")),
    (["--group-size", "8"], ("--group-size 8", "at least 16")),
    (["--accuracy-level", "7"], ("--accuracy-level 7", "4 int8")),
    (["--export"], ("--export", "matmul-nbits")),
])
def test_bad_matmul_nbits_options_are_one_line(cli, gpt_onnx, tmp_path, args, fragments):
    result = cli("quantize", gpt_onnx, "--mode", "matmul-nbits", *args, "--out", tmp_path / "q")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "q").exists()


def test_matmul_nbits_of_a_pytorch_artifact_asks_for_an_export(cli, tiny_gpt, tmp_path):
    assert_one_error_line(cli("quantize", tiny_gpt, "--mode", "matmul-nbits", "--out", tmp_path / "q"),
                          "never exported", "bigmodel export")
