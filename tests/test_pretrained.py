"""bigmodel import: tiny random Hugging Face checkpoints made here with transformers (no download)
must give transformers' own logits, and every bad checkpoint is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from conftest import assert_one_error_line  # noqa: E402

SMALL = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}
# name → (config class, model class, config arguments, save arguments)
CASES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": 320, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}, {}),
    "llama-untied-gqa": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}, {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "tie_word_embeddings": True}, {}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                    {**SMALL, "num_key_value_heads": 1, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, {}),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True}, {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**SMALL, "num_key_value_heads": 2, "sliding_window": None,
                                                        "rope_theta": 1e6}, {}),
    "llama-sharded": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "num_key_value_heads": 2}, {"max_shard_size": "40KB"}),
}


def make_checkpoint(directory: Path, case: str, dtype=None) -> Path:
    config_cls, model_cls, args, save = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**args))
    if case.startswith("qwen2"):  # transformers initialises biases to zero; make them count
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, **save)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: make_checkpoint(root / case, case) for case in CASES}


def hf_logits(directory: Path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(artifact_dir: Path, ids):
    from bigmodel_cli.artifact import open_artifact

    with torch.no_grad():
        return open_artifact(artifact_dir).build_model()(ids)


def imported(cli, source: Path, out: Path, *args: str) -> Path:
    result = cli("import", source, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(cli, checkpoints, tmp_path, one_torch_thread, case):
    out = imported(cli, checkpoints[case], tmp_path / "art")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(our_logits(out, ids), hf_logits(checkpoints[case], ids), atol=1e-4, rtol=0)


def test_import_records_architecture_and_source(cli, checkpoints, tmp_path):
    out = imported(cli, checkpoints["llama-sharded"], tmp_path / "art")
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert config["model"]["arch"] == "llama" and config["model"]["n_kv_head"] == 2
    assert manifest["stage"] == "import"
    source = manifest["source"]
    assert source["model_type"] == "llama" and source["path"] == str(checkpoints["llama-sharded"].resolve())
    shards = [name for name in source["files"] if name.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in source["files"]
    gpt = json.loads((imported(cli, checkpoints["gpt2"], tmp_path / "gpt") / "config.json").read_text())["model"]
    assert gpt["arch"] == "gpt" and gpt["activation"] == "gelu_tanh" and gpt["tie_weights"] is True


@pytest.mark.parametrize("dtype, stored", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_half_precision_weights_keep_their_dtype(cli, tmp_path, one_torch_thread, dtype, stored):
    from bigmodel_cli.weights import stored_shapes  # noqa: F401  (the artifact must read like any other)
    from safetensors import safe_open

    source = make_checkpoint(tmp_path / "hf", "llama-untied-gqa", dtype=dtype)
    out = imported(cli, source, tmp_path / "art")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {stored}
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))
    # computed in float32 from the same half-precision weights, as transformers does when asked for float32
    torch.testing.assert_close(our_logits(out, ids), hf_logits(source, ids), atol=1e-4, rtol=0)
    cast = imported(cli, source, tmp_path / "fp32", "--dtype", "fp32")
    with safe_open(str(cast / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"F32"}


def test_mistral_sliding_window_caps_the_context(cli, tmp_path):
    config_cls, model_cls, args, _ = CASES["mistral"]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**args, "sliding_window": 16}))
    model.save_pretrained(tmp_path / "hf")
    result = cli("import", tmp_path / "hf", "--out", tmp_path / "art")
    assert result.exit_code == 0, result.output
    assert "sliding_window 16" in result.stderr
    assert json.loads((tmp_path / "art" / "config.json").read_text())["model"]["block_size"] == 16


def test_tokenizer_is_copied_with_its_section(cli, checkpoints, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    source = tmp_path / "hf"
    shutil.copytree(checkpoints["llama-tied"], source)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True, "chat_template": "{{ x }}"}))
    out = imported(cli, source, tmp_path / "art")
    section = json.loads((out / "config.json").read_text())["tokenizer"]
    assert section == {"file": "tokenizer.json", "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
                       "bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": None,
                       "add_bos_token": True, "chat_template": "{{ x }}"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["files"] and "tokenizer_config.json" in manifest["source"]["files"]
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    # Every language-model command reads text through it (data/tokenizer.py): generate answers in text.
    from bigmodel_cli.artifact import open_artifact

    assert not open_artifact(out).tokenizer().is_byte_level
    generated = cli("generate", out, "--prompt", "def f(x):", "--max-new-tokens", "3", "--temperature", "0", "--json")
    assert generated.exit_code == 0, generated.output
    text = json.loads(generated.stdout)["text"]
    assert isinstance(text, str) and text.strip()  # decoded BPE tokens, not byte values

    big = tmp_path / "big"
    shutil.copytree(source, big)
    tokenizer.add_tokens([f"tok{i}" for i in range(400)])  # more tokens than the model embeds
    tokenizer.save(str(big / "tokenizer.json"))
    assert_one_error_line(cli("import", big, "--out", tmp_path / "no"), "tokens but the model embeds only 320")
    assert not (tmp_path / "no").exists()


def test_import_then_eval_export_quantize_eval(cli, checkpoints, tmp_path, one_torch_thread):
    out = imported(cli, checkpoints["llama-untied-gqa"], tmp_path / "art")
    data = ("--data", "text:stdlib")
    assert cli("eval", out, *data, "--json").exit_code == 0
    exported = cli("export", out, "--out", tmp_path / "onnx")
    assert exported.exit_code == 0, exported.output
    quantized = cli("quantize", tmp_path / "onnx", "--out", tmp_path / "int8")
    assert quantized.exit_code == 0, quantized.output
    result = cli("eval", tmp_path / "int8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"] > 0


def test_llama_from_scratch_trains_generates_and_estimates(cli, corpus, tmp_path, one_torch_thread):
    run = tmp_path / "run"
    trained = cli("train", "--model", "llama", "--preset", "tiny", "--data", f"text:{corpus}", "--block-size", "32",
                  "--batch-size", "8", "--max-steps", "10", "--eval-windows", "4", "--out", run)
    assert trained.exit_code == 0, trained.output
    assert cli("eval", run, "--json").exit_code == 0
    generated = cli("generate", run, "--prompt", "def ", "--max-new-tokens", "4", "--json")
    assert generated.exit_code == 0, generated.output
    # structured pruning and distillation of llama: tests/test_llama_compress.py
    estimate = cli("estimate", "--model", "llama", "--preset", "8b", "--json")
    assert estimate.exit_code == 0, estimate.output
    assert json.loads(estimate.stdout)["params"] == 8_030_261_248  # Llama-3-8B's published count


# --- refusals: one line, exit 2, nothing written --------------------------------------------------


def copy_checkpoint(checkpoints, tmp_path, case="llama-untied-gqa") -> Path:
    source = tmp_path / "hf"
    shutil.copytree(checkpoints[case], source)
    return source


def edit_config(source: Path, **changes) -> None:
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (source / "config.json").write_text(json.dumps(config))


def rewrite_weights(source: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(source / "model.safetensors")
    change(state)
    save_file(state, source / "model.safetensors")


def refused(cli, source, tmp_path, *fragments):
    out = tmp_path / "out"
    assert_one_error_line(cli("import", source, "--out", out), *fragments)
    assert not out.exists()


def test_hub_id_says_to_download_first(cli, tmp_path):
    refused(cli, "meta-llama/Llama-3-8B", tmp_path, "huggingface-cli download meta-llama/Llama-3-8B", "does not download")


def test_unsupported_model_type_lists_the_supported(cli, checkpoints, tmp_path):
    source = copy_checkpoint(checkpoints, tmp_path)
    edit_config(source, model_type="gemma")
    refused(cli, source, tmp_path, "model_type 'gemma' is not supported", "gpt2, llama, mistral, qwen2")


def test_pickle_checkpoint_is_refused_unopened(cli, checkpoints, tmp_path):
    source = copy_checkpoint(checkpoints, tmp_path)
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened, so never an error about it
    refused(cli, source, tmp_path, "pytorch_model.bin", "never loads", "safe_serialization=True")


def test_missing_tensor(cli, checkpoints, tmp_path):
    source = copy_checkpoint(checkpoints, tmp_path)
    rewrite_weights(source, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    refused(cli, source, tmp_path, "lacks 1 tensor", "blocks.1.mlp.up_proj.weight")


def test_unexpected_tensor(cli, checkpoints, tmp_path):
    source = copy_checkpoint(checkpoints, tmp_path)
    rewrite_weights(source, lambda state: state.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    refused(cli, source, tmp_path, "model.layers.0.extra.weight", "not part of a llama model")


def test_shape_contradicting_config(cli, checkpoints, tmp_path):
    source = copy_checkpoint(checkpoints, tmp_path)
    edit_config(source, intermediate_size=48)
    refused(cli, source, tmp_path, "model.layers.0.mlp.down_proj.weight has shape [32, 64]", "config.json implies [32, 48]")


def test_damaged_index(cli, checkpoints, tmp_path):
    source = copy_checkpoint(checkpoints, tmp_path, "llama-sharded")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(cli, source, tmp_path, "not a .safetensors file in this directory")


def test_unsupported_rope_scaling(cli, checkpoints, tmp_path):
    source = copy_checkpoint(checkpoints, tmp_path)
    edit_config(source, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    refused(cli, source, tmp_path, "rope_type 'yarn'")


def test_absurd_sizes_are_refused_before_allocation(checkpoints, tmp_path):
    """A config asking for a 7e13-parameter model next to small weights: refused from the headers,
    in a subprocess capped at 2 GB so a regression fails instead of eating the machine."""
    source = copy_checkpoint(checkpoints, tmp_path)
    edit_config(source, hidden_size=1 << 16, intermediate_size=1 << 18, num_hidden_layers=1000,
                num_attention_heads=1 << 10, head_dim=None)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    code = ("import sys; from bigmodel_cli.cli import main; sys.argv = ['bigmodel', 'import', sys.argv[1], "
            "'--out', sys.argv[2]]; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "do not belong together" in proc.stderr
    assert not (tmp_path / "out").exists()


# --- the llama spec and the gpt flag -----------------------------------------------------------


@pytest.mark.parametrize("overrides, fragment", [
    ({"n_head": 4, "n_kv_head": 3}, "multiple of n_kv_head 3"),
    ({"n_embd": 36, "n_head": 4}, "head_dim 9 must be even"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2}}, "rope_type linear or llama3"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8}}, "needs positive numbers for low_freq_factor"),
    ({"norm_eps": 0}, "norm_eps must be a positive number"),
])
def test_llama_spec_problems_are_one_line(overrides, fragment):
    from bigmodel_cli.errors import UserError
    from bigmodel_cli.models import resolve_spec

    with pytest.raises(UserError, match=re.escape(fragment)):
        resolve_spec("llama", "tiny", overrides)


def test_gpt_without_activation_key_keeps_exact_gelu():
    """Artifacts written before the flag existed have no "activation": they load as exact GELU."""
    from bigmodel_cli.models import build_model, resolve_spec

    spec = resolve_spec("gpt", "nano")
    assert spec.pop("activation") == "gelu"
    assert build_model(spec).blocks[0].mlp.approximate == "none"
    assert build_model({**spec, "activation": "gelu_tanh"}).blocks[0].mlp.approximate == "tanh"


def test_output_policy_is_every_command_s(cli, checkpoints, tmp_path):
    """An existing --out needs --overwrite; the checkpoint itself is never an output."""
    source = copy_checkpoint(checkpoints, tmp_path)
    out = imported(cli, source, tmp_path / "art")
    assert_one_error_line(cli("import", source, "--out", out), "--overwrite")
    imported(cli, source, out, "--overwrite")
    before = sorted(p.name for p in source.iterdir())
    result = cli("import", source, "--out", source, "--overwrite")
    assert result.exit_code == 2 and result.stderr.startswith("error:")
    assert sorted(p.name for p in source.iterdir()) == before


def test_runtime_never_imports_transformers():
    """transformers is the tests' reference only (dev extra); the package must not need it."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "bigmodel_cli"
    for file in src.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "transformers" for n in names), file
