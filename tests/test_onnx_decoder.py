"""The ONNX decoder with past key values (engine/onnx/decoder.py): exported beside model.onnx,
verified against PyTorch for prefill and decode steps, driven by generate on ONNX Runtime with the
cache kept in ORT (IO binding) — the same text as PyTorch for the same seed — and refused in one
line when it is of another version."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_one_error_line, export_once
from test_generate_cache import tiny_model


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_the_decoder_graph_matches_pytorch_for_prefill_and_decode_steps(arch, tmp_path):
    """One graph: an empty past (prefill of a 5-token prompt) and one-token steps after it, at batch
    1, 3 and 3 left-padded, with ORT's own present fed back; llama with grouped-query attention (2
    kv heads)."""
    from bigmodel_cli.engine.onnx.decoder import (INPUTS, export_decoder, left_pad, past_names, position_ids,
                                                  present_names, verify_decoder)
    from bigmodel_cli.engine.onnx.runtime import open_session

    model = tiny_model(arch, window=32)
    path = tmp_path / "decoder.onnx"
    export_decoder(model, path, 18, 256)
    session, _ = open_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past_names(2)]
    assert [o.name for o in session.get_outputs()] == ["logits", *present_names(2)]
    figures = verify_decoder(model, session, 256, 1e-4)
    assert figures["passed"] and figures["steps"] == 15 and "left-padded batch 3" in figures["batches"]
    # a prefill of several tokens after a non-empty past (a chunked prompt) is served too, padded or not
    ids = torch.randint(0, 256, (2, 7))
    rows = [ids[0].tolist(), ids[1, 3:].tolist()]  # 7 and 4 tokens, the second left-padded by 3
    padded, mask = left_pad(rows)
    with torch.inference_mode():
        alone = [model(torch.tensor([row])) for row in rows]
        _, past = model(torch.from_numpy(padded[:, :5]), use_cache=True, attention_mask=torch.from_numpy(mask[:, :5]))
    feed = dict(zip(INPUTS, [padded[:, 5:], mask, position_ids(mask, 2)]))
    feed.update({n: t.numpy() for n, t in zip(past_names(2), [x for p in past for x in p])})
    logits = session.run(["logits"], feed)[0]
    for i, full in enumerate(alone):
        np.testing.assert_allclose(logits[i], full[0, -2:].numpy(), atol=1e-4)


def test_export_of_a_language_model_writes_and_records_the_decoder(gpt_onnx):
    config = json.loads((gpt_onnx / "config.json").read_text())
    manifest = json.loads((gpt_onnx / "manifest.json").read_text())
    section = config["onnx"]["decoder"]
    assert section["file"] == "decoder.onnx" and (gpt_onnx / "decoder.onnx").is_file()
    assert section["version"] == 2 and section["positions"] == "position_ids" and section["attention_mask"]
    assert section["inputs"] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                 "past_key_values.0.value"]
    assert section["outputs"] == ["logits", "present.0.key", "present.0.value"]
    assert manifest["decoder_verification"]["passed"] and manifest["decoder_verification"]["decode_steps"] >= 3
    assert "decoder.onnx" in json.dumps(manifest["files"])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_on_onnx_runtime_uses_the_cache_and_gives_pytorchs_text(cli, gpt_onnx, temperature):
    """The same seed, the same text on both backends, across the window sliding (64 positions)."""
    runs = {}
    for backend in ("torch", "onnx"):
        result = cli("generate", gpt_onnx, "--backend", backend, "--prompt", "The ", "--max-new-tokens", "80",
                     "--temperature", str(temperature), "--seed", "3", "--json", "--threads", "1")
        assert result.exit_code == 0, result.output
        runs[backend] = json.loads(result.stdout)
    assert runs["onnx"]["cache"] and runs["onnx"]["cache_bytes"] > 0
    assert runs["onnx"]["tokens"] == runs["torch"]["tokens"]
    assert runs["onnx"]["decode_tokens_per_s"] and runs["onnx"]["time_to_first_token_s"] is not None
    no_cache = cli("generate", gpt_onnx, "--backend", "onnx", "--no-cache", "--prompt", "The ", "--max-new-tokens",
                   "80", "--temperature", str(temperature), "--seed", "3", "--json", "--threads", "1")
    assert json.loads(no_cache.stdout)["tokens"] == runs["torch"]["tokens"]
    assert not json.loads(no_cache.stdout)["cache"]


def test_dynamic_int8_quantizes_the_decoder_too_and_generate_keeps_its_cache(cli, gpt_onnx, tmp_path):
    """An int8 language model must still decode with its KV cache: decoder.onnx is quantized like
    model.onnx, measured with the same metric (close to model.onnx's, both int8), and recorded."""
    out = tmp_path / "int8"
    result = cli("quantize", gpt_onnx, "--mode", "dynamic", "--max-metric-drop", "5", "--no-bench", "--out", out,
                 "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    decoder = report["decoder"]
    assert decoder["kept"] and "decode_after" not in decoder  # --no-bench: not timed
    assert decoder["metrics"]["perplexity"] == pytest.approx(report["after"]["perplexity"], rel=0.02)
    from bigmodel_cli.artifact import open_artifact

    int8 = open_artifact(out)
    assert int8.config["onnx"]["decoder"] == open_artifact(gpt_onnx).config["onnx"]["decoder"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    generated = cli("generate", out, "--prompt", "The ", "--max-new-tokens", "12", "--temperature", "0", "--json")
    assert generated.exit_code == 0 and json.loads(generated.stdout)["cache"]
    # Names of model.onnx kept in float cannot be matched in the decoder: then it is not kept, and
    # the report says why (generate recomputes, as for any export without a decoder).
    node = next(n.name for n in onnx.load(str(gpt_onnx / "model.onnx")).graph.node if n.op_type == "MatMul")
    excluded = cli("quantize", gpt_onnx, "--mode", "dynamic", "--exclude", node, "--no-bench", "--out",
                   tmp_path / "excl", "--json", "--threads", "1")
    assert excluded.exit_code == 0, excluded.output
    assert not json.loads(excluded.stdout)["report"]["decoder"]["kept"]
    assert not (tmp_path / "excl" / "decoder.onnx").exists()
    assert "decoder" not in open_artifact(tmp_path / "excl").config["onnx"]


def test_no_decoder_exports_the_cache_free_graph_only_and_eval_is_unchanged(cli, tmp_path_factory, tiny_gpt):
    out = export_once(tmp_path_factory, tiny_gpt, "--no-decoder")
    assert not (out / "decoder.onnx").exists()
    assert "decoder" not in json.loads((out / "config.json").read_text())["onnx"]
    result = cli("generate", out, "--backend", "onnx", "--prompt", "ab", "--max-new-tokens", "3", "--json")
    assert result.exit_code == 0 and not json.loads(result.stdout)["cache"]
    assert cli("eval", out, "--backend", "onnx").exit_code == 0


@pytest.mark.parametrize("version", [1, 0, None])
def test_a_decoder_of_another_version_is_one_line_asking_for_a_re_export(cli, gpt_onnx, tmp_path, version):
    """Version 1 (no attention mask or positions: exported before batching) is refused, not fed
    inputs it does not have."""
    from bigmodel_cli.artifact import open_artifact, write_metadata

    artifact = tmp_path / "old"
    shutil.copytree(gpt_onnx, artifact)
    config = open_artifact(gpt_onnx).config
    if version is None:
        del config["onnx"]["decoder"]["version"]
    else:
        config["onnx"]["decoder"]["version"] = version
    (artifact / "manifest.json").unlink()
    write_metadata(artifact, config=config, stage="export")
    result = cli("generate", artifact, "--backend", "onnx", "--prompt", "ab", "--max-new-tokens", "3")
    assert_one_error_line(result, "decoder.onnx", f"format version {version}", "reads version 2", "re-export")
    if version == 1:  # quantizing it would write a decoder that generate then refuses: refused first
        quantized = cli("quantize", artifact, "--mode", "matmul-nbits", "--out", tmp_path / "q")
        assert_one_error_line(quantized, "format version 1", "re-export")
        assert not (tmp_path / "q").exists()
        # dynamic int8 quantizes model.onnx as ever and leaves the old decoder out, saying why
        dynamic = cli("quantize", artifact, "--mode", "dynamic", "--no-bench", "--out", tmp_path / "d", "--json")
        assert dynamic.exit_code == 0, dynamic.output
        decoder = json.loads(dynamic.stdout)["report"]["decoder"]
        assert not decoder["kept"] and "format version 1" in decoder["why"]
        assert not (tmp_path / "d" / "decoder.onnx").exists()


def test_the_documented_cached_decoder_snippet_runs_without_torch_and_matches_generate(cli, gpt_onnx, tmp_path):
    """docs/export.md's decode.py, in a process where torch and bigmodel cannot be imported, from
    decoder.onnx and config.json alone, gives generate's greedy text for each of two prompts of
    different lengths decoded as one left-padded batch (the longer across the window sliding)."""
    import re
    import subprocess
    import sys

    from test_deploy import DOC, GUARD

    code = re.search(r"<!-- cached-decoder-snippet -->\s*```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert code, "docs/export.md lost its cached-decoder snippet"
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    for name in ("decoder.onnx", "config.json"):
        shutil.copyfile(gpt_onnx / name, deploy / name)
    script = tmp_path / "decode.py"
    script.write_text(GUARD + code.group(1))
    prompts = ["The quick brown fox jumps over the lazy dog; ", "def "]  # 45 bytes + 40 new > the 64 window
    proc = subprocess.run([sys.executable, "-I", str(script), str(deploy), *prompts], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stderr.rsplit("IMPORTED:", 1)[1].strip().split(","))
    assert "onnxruntime" in imported and not imported & {"torch", "bigmodel_cli", "safetensors"}
    expected = []
    for prompt in prompts:
        result = cli("generate", gpt_onnx, "--backend", "torch", "--prompt", prompt, "--max-new-tokens", "40",
                     "--temperature", "0", "--json")
        expected.append(bytes(list(prompt.encode()) + json.loads(result.stdout)["tokens"]).decode("utf-8", errors="replace"))
    assert proc.stdout.rstrip("\n") == "\n".join(expected)


def test_a_recorded_decoder_whose_file_is_missing_is_one_line(cli, gpt_onnx, tmp_path):
    from bigmodel_cli.artifact import open_artifact, write_metadata

    artifact = tmp_path / "gone"
    shutil.copytree(gpt_onnx, artifact)
    (artifact / "decoder.onnx").unlink()
    (artifact / "manifest.json").unlink()
    write_metadata(artifact, config=open_artifact(gpt_onnx).config, stage="export")
    result = cli("generate", artifact, "--backend", "onnx", "--prompt", "ab", "--max-new-tokens", "3")
    assert_one_error_line(result, "decoder.onnx is missing", "re-export")
    # --no-cache does not need it
    assert cli("generate", artifact, "--backend", "onnx", "--no-cache", "--prompt", "ab", "--max-new-tokens", "3").exit_code == 0


def test_a_decoder_that_points_at_external_data_is_refused(cli, gpt_onnx, tmp_path):
    """Only decoder.onnx.data is verified for decoder.onnx; a decoder naming any other data file is
    refused (by the artifact's verification) before ONNX Runtime would read it."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from bigmodel_cli.artifact import open_artifact, write_metadata

    artifact = tmp_path / "ext"
    shutil.copytree(gpt_onnx, artifact)
    model = onnx.load(str(artifact / "decoder.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="decoder.bin", size_threshold=0)
    onnx.save(model, str(artifact / "decoder.onnx"))
    (artifact / "manifest.json").unlink()
    write_metadata(artifact, config=open_artifact(gpt_onnx).config, stage="export")
    result = cli("generate", artifact, "--backend", "onnx", "--prompt", "ab", "--max-new-tokens", "3")
    assert_one_error_line(result, "'decoder.bin'", "only decoder.onnx.data is verified", "re-export")
