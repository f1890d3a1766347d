"""bigmodel export --format hf: the directory transformers loads gives our logits, import → export →
import is bit-identical in weights, and what Hugging Face cannot express is one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from conftest import assert_one_error_line  # noqa: E402
from test_pretrained import hf_logits, imported, make_checkpoint, our_logits  # noqa: E402

# case (test_pretrained.CASES) → the model_type the export must write
ROUND_TRIP = {"gpt2": "gpt2", "llama-untied-gqa": "llama", "llama-tied": "llama", "qwen2-qkv-bias": "qwen2",
              "mistral": "mistral"}


def with_tokenizer(source: Path) -> Path:
    """Give a tiny checkpoint a byte-level BPE tokenizer.json that fits its 320-token embedding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return source


@pytest.fixture(scope="module")
def artifacts(cli, tmp_path_factory):
    """case → the artifact `bigmodel import` made of its tiny checkpoint (with a tokenizer)."""
    root = tmp_path_factory.mktemp("hf-export")
    return {case: imported(cli, with_tokenizer(make_checkpoint(root / case, case)), root / f"{case}-art")
            for case in ROUND_TRIP}


def export_hf(cli, artifact: Path, out: Path, *args: str) -> Path:
    result = cli("export", artifact, "--format", "hf", "--out", out, *args)
    assert result.exit_code == 0, result.output
    return out


def payload(path: Path) -> bytes:
    """A safetensors file's tensor bytes (after its JSON header)."""
    data = path.read_bytes()
    return data[8 + struct.unpack("<Q", data[:8])[0]:]


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_transformers_loads_the_export_with_our_logits(cli, artifacts, tmp_path, one_torch_thread, case):
    out = export_hf(cli, artifacts[case], tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ROUND_TRIP[case]
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hf_logits(out, ids), our_logits(artifacts[case], ids), atol=1e-5, rtol=0)
    # not an artifact: no manifest, so no command takes it for one
    assert not (out / "manifest.json").exists()
    assert_one_error_line(cli("eval", out), "not a bigmodel artifact", "bigmodel import")
    # and back: bit-identical weights, the same model section
    again = imported(cli, out, tmp_path / "again")
    first, second = artifacts[case] / "model.safetensors", again / "model.safetensors"
    assert hashlib.sha256(payload(first)).digest() == hashlib.sha256(payload(second)).digest()
    assert all(torch.equal(a, tensors(second)[name]) for name, a in tensors(first).items())
    assert json.loads((again / "config.json").read_text())["model"] == json.loads(
        (artifacts[case] / "config.json").read_text())["model"]


def test_half_precision_stays_half_and_round_trips(cli, tmp_path, one_torch_thread):
    source = make_checkpoint(tmp_path / "bf16", "llama-tied", dtype=torch.bfloat16)
    art = imported(cli, source, tmp_path / "art")
    out = export_hf(cli, art, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in tensors(out / "model.safetensors").values()} == {torch.bfloat16}
    assert not (out / "tokenizer.json").exists()  # it came without one; ids 0-255 are not bytes to it
    again = imported(cli, out, tmp_path / "again")
    assert payload(art / "model.safetensors") == payload(again / "model.safetensors")


def test_tokenizer_and_chat_template_travel(cli, tmp_path, one_torch_thread):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    source = make_checkpoint(tmp_path / "src", "llama-untied-gqa")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["def f(x): return x + 1"] * 20,
                                  trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.save(str(source / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template}))
    art = imported(cli, source, tmp_path / "art")
    out = export_hf(cli, art, tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.token_to_id("</s>")
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded.eos_token == "</s>" and loaded.chat_template == template
    assert loaded("def f")["input_ids"][-2:] == tokenizer.encode("def f").ids[-2:]
    again = imported(cli, out, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["tokenizer"] == json.loads(
        (art / "config.json").read_text())["tokenizer"]


def test_our_byte_level_gpt_gets_a_byte_tokenizer(cli, tiny_gpt, tmp_path, one_torch_thread):
    out = export_hf(cli, tiny_gpt, tmp_path / "hf")
    text = "héllo, wörld\n"
    ids = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    batch = torch.tensor([ids])
    assert torch.allclose(hf_logits(out, batch), our_logits(tiny_gpt / "best", batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama-untied-gqa", "gpt2", "qwen2-qkv-bias", "mistral"])
def test_import_eval_generate_quantize_export_eval(cli, artifacts, corpus, tmp_path, one_torch_thread, case):
    art = artifacts[case]
    data = ("--data", f"text:{corpus}", "--limit", "4")
    assert cli("eval", art, *data, "--json").exit_code == 0
    generated = cli("generate", art, "--prompt", "def ", "--max-new-tokens", "3", "--json")
    assert generated.exit_code == 0, generated.output
    onnx = cli("export", art, "--out", tmp_path / "onnx")
    assert onnx.exit_code == 0, onnx.output
    quantized = cli("quantize", tmp_path / "onnx", "--out", tmp_path / "int8")
    assert quantized.exit_code == 0, quantized.output
    assert cli("eval", tmp_path / "int8", *data, "--json").exit_code == 0
    hf = export_hf(cli, art, tmp_path / "hf")
    again = imported(cli, hf, tmp_path / "again")
    before, after = (json.loads(cli("eval", a, *data, "--json").stdout)["perplexity"] for a in (art, again))
    assert before == after


# --- refusals: one line, exit 2, nothing written --------------------------------------------------


def test_classifier_is_refused(cli, digits_mlp, tmp_path):
    assert_one_error_line(cli("export", digits_mlp, "--format", "hf", "--out", tmp_path / "hf"), "--format onnx")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args, fragment", [(("--format", "tf"), "--format 'tf'"),
                                            (("--format", "hf", "--opset", "18"), "--opset applies to --format onnx"),
                                            (("--format", "hf", "--dtype", "fp16"), "--dtype applies")])
def test_bad_flags(cli, artifacts, tmp_path, args, fragment):
    assert_one_error_line(cli("export", artifacts["llama-tied"], "--out", tmp_path / "hf", *args), fragment)
    assert not (tmp_path / "hf").exists()


def test_pruned_heads_gpt_is_refused(cli, tiny_gpt, tmp_path):
    pruned = cli("prune", tiny_gpt, "--method", "structured", "--sparsity", "0.25", "--head-sparsity", "0.5",
                 "--no-bench", "--out", tmp_path / "p")
    assert pruned.exit_code == 0, pruned.output
    spec = json.loads((tmp_path / "p" / "best" / "config.json").read_text())["model"]
    assert spec["n_head"] * spec["head_dim"] < spec["n_embd"]
    assert_one_error_line(cli("export", tmp_path / "p", "--format", "hf", "--out", tmp_path / "hf"), "cannot express")
    assert not (tmp_path / "hf").exists()


def test_output_policy(cli, artifacts, tmp_path):
    out = export_hf(cli, artifacts["llama-tied"], tmp_path / "hf")
    assert_one_error_line(cli("export", artifacts["llama-tied"], "--format", "hf", "--out", out), "--overwrite")
    # a directory it wrote may be replaced; one holding a stranger's file may not
    export_hf(cli, artifacts["llama-tied"], out, "--overwrite")
    (out / "notes.txt").write_text("mine")
    assert_one_error_line(cli("export", artifacts["llama-tied"], "--format", "hf", "--out", out, "--overwrite"),
                          "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    # never onto its own input
    copy = tmp_path / "copy"
    shutil.copytree(artifacts["llama-tied"], copy)
    assert_one_error_line(cli("export", copy, "--format", "hf", "--out", copy, "--overwrite"))
    assert (copy / "manifest.json").exists()


def test_weight_only_and_onnx_only_artifacts_are_refused(cli, tiny_gpt, tmp_path):
    quantized = cli("quantize", tiny_gpt, "--mode", "weight-only", "--out", tmp_path / "w8")
    assert quantized.exit_code == 0, quantized.output
    assert_one_error_line(cli("export", tmp_path / "w8", "--format", "hf", "--out", tmp_path / "hf"),
                          "weight-only quantized", "float parent")
    onnx = cli("export", tiny_gpt, "--no-weights", "--out", tmp_path / "onnx")
    assert onnx.exit_code == 0, onnx.output
    assert_one_error_line(cli("export", tmp_path / "onnx", "--format", "hf", "--out", tmp_path / "hf"), "ONNX-only")
    assert not (tmp_path / "hf").exists()


def test_our_own_llama_exports_as_llama(cli, corpus, tmp_path, one_torch_thread):
    run = tmp_path / "run"
    trained = cli("train", "--model", "llama", "--preset", "tiny", "--data", f"text:{corpus}", "--block-size", "16",
                  "--batch-size", "4", "--max-steps", "2", "--eval-windows", "2", "--out", run)
    assert trained.exit_code == 0, trained.output
    out = export_hf(cli, run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    ids = torch.tensor([list(b"def main():")])
    assert torch.allclose(hf_logits(out, ids), our_logits(run / "best", ids), atol=1e-5, rtol=0)


def test_per_layer_widths_are_refused():
    from bigmodel_cli.engine.pretrained.hf_export import check_expressible
    from bigmodel_cli.errors import UserError

    spec = {"arch": "llama", "n_layer": 2, "n_head": 4, "n_embd": 32, "head_dim": 8, "mlp_hidden": [64, 48]}
    with pytest.raises(UserError, match="mlp_hidden differ from layer to layer.*--format onnx"):
        check_expressible(spec, "llama", "ART")
    with pytest.raises(UserError, match="no biases"):
        check_expressible({"arch": "gpt", "bias": False, "n_head": 2, "head_dim": 16, "n_embd": 32}, "gpt2", "ART")
