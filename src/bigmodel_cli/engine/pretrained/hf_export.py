"""``bigmodel export --format hf``: an artifact → a Hugging Face directory other tools load.

The inverse of ``hf_import``: our model section → their ``config.json`` (``gpt2`` for our ``gpt``,
``llama``/``mistral``/``qwen2`` for ``llama``), our tensor names → theirs (GPT-2's Conv1D weights
transposed back) in ``model.safetensors``, the tokenizer as ``tokenizer.json`` +
``tokenizer_config.json``, and ``generation_config.json`` when the special tokens are known. Tensors
are copied one at a time in the dtype they are stored in, so import → export → import is
bit-identical in weights.

The directory is not a bigmodel artifact (no ``manifest.json``, so no command loads it as one);
its files and their hashes are recorded in ``bigmodel-export.json`` so that ``--overwrite`` may
replace it as a directory bigmodel wrote (outputs.py). A model Hugging Face's config cannot express
(per-layer widths after pruning, a GPT without biases, ...) is refused before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ... import artifact as art
from ...data.tokenizer import BYTE_VOCAB, TOKENIZER_FILE, gpt2_byte_chars
from ...errors import UserError
from ...outputs import HF_EXPORT_FILE
from .hf_config import GPT_LAYERNORM_EPS, SUPPORTED
from .hf_weights import RULES, Planned, SourceTensor, read_headers, write_streamed

HF_WEIGHTS_FILE = "model.safetensors"
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class HFExportResult:
    path: Path
    model_type: str
    tensors: int
    dtypes: list[str]
    tokenizer: str  # "copied", "byte-level" (written for a byte-level model) or "none"
    files: dict = field(default_factory=dict)


def source_model_type(artifact: art.Artifact) -> str:
    """The Hugging Face model_type to write: the one the weights were imported from, found along the
    lineage, when it still describes the model; else the one our model section maps onto."""
    spec = artifact.model_spec
    if spec.get("arch") == "gpt":
        return "gpt2"
    imported = _imported_type(artifact)
    if imported in ("llama", "mistral") and not spec.get("qkv_bias"):
        return imported
    return "qwen2" if spec.get("qkv_bias") else "llama"


def _imported_type(artifact: art.Artifact) -> str | None:
    """model_type from the manifest of the nearest ancestor (or itself) made by ``bigmodel import``."""
    for entry in artifact.lineage():
        path = Path(entry.get("path") or "")
        if entry.get("stage") != "import" or not (path / art.MANIFEST_FILE).is_file():
            continue
        try:
            manifest = json.loads(art.read_regular_file(path / art.MANIFEST_FILE, 16 << 20).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        kind = (manifest.get("source") or {}).get("model_type") if isinstance(manifest, dict) else None
        return kind if kind in SUPPORTED else None
    return None


def check_expressible(spec: dict, kind: str, where: str) -> None:
    """Refuse what Hugging Face's config for ``kind`` has no way to say."""
    per_layer = sorted(key for key, value in spec.items() if isinstance(value, list))
    if per_layer:
        raise UserError(f"{where}: its {', '.join(per_layer)} differ from layer to layer (structured pruning), which a "
                        f"Hugging Face {kind} config.json cannot express; export it with --format onnx instead")
    if kind != "gpt2":
        return
    if not spec.get("bias", True):
        raise UserError(f"{where}: this gpt has no biases, and Hugging Face's GPT-2 always has them; "
                        "export it with --format onnx, or train with biases")
    if spec["head_dim"] * spec["n_head"] != spec["n_embd"]:
        raise UserError(f"{where}: its {spec['n_head']} heads of {spec['head_dim']} do not make n_embd "
                        f"{spec['n_embd']} (pruned heads), which Hugging Face's GPT-2 cannot express; "
                        "export it with --format onnx instead")


def hf_config(spec: dict, kind: str, dtype: str, tokens: dict[str, int | None]) -> dict:
    """Hugging Face's config.json for our model section (the inverse of hf_config.to_spec)."""
    common = {"architectures": [_ARCHITECTURES[kind]], "model_type": kind, "vocab_size": spec["vocab_size"],
              "tie_word_embeddings": bool(spec.get("tie_weights")), "dtype": _TORCH_DTYPES[dtype],
              "bos_token_id": tokens.get("bos"), "eos_token_id": tokens.get("eos"), "use_cache": True}
    if kind == "gpt2":
        return {**common, "n_positions": spec["block_size"], "n_embd": spec["n_embd"], "n_layer": spec["n_layer"],
                "n_head": spec["n_head"], "n_inner": spec["mlp_hidden"],
                "activation_function": "gelu_new" if spec.get("activation") == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": GPT_LAYERNORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True}
    config = {**common, "hidden_size": spec["n_embd"], "intermediate_size": spec["mlp_hidden"],
              "num_hidden_layers": spec["n_layer"], "num_attention_heads": spec["n_head"],
              "num_key_value_heads": spec.get("n_kv_head") or spec["n_head"], "head_dim": spec["head_dim"],
              "max_position_embeddings": spec["block_size"], "rms_norm_eps": spec["norm_eps"],
              "rope_theta": spec["rope_theta"], "rope_scaling": spec.get("rope_scaling"), "hidden_act": "silu",
              "attention_dropout": 0.0}
    if kind == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:  # the window never binds: our context (block_size) is at most the window it was imported with
        config.update(sliding_window=None, use_sliding_window=False)
    return config


def planned_tensors(artifact: art.Artifact, kind: str) -> list[Planned]:
    """Every stored tensor of ours → its Hugging Face name, read from the header (nothing loaded)."""
    source = artifact.path / art.WEIGHTS_FILE
    tensors = read_headers([source], str(artifact.path))
    inverse = {}
    for theirs, ours, transpose in RULES[kind]:
        inverse[ours] = (("transformer." + theirs) if kind == "gpt2" and theirs != "lm_head.weight" else theirs, transpose)
    planned = []
    for name, tensor in tensors.items():
        target = _their_name(inverse, name)
        if target is None:
            raise UserError(f"{source}: tensor {name} has no Hugging Face {kind} name; re-create the artifact")
        theirs, transpose = target
        if name == "lm_head.weight" and artifact.model_spec.get("tie_weights"):
            continue  # tied: the embedding is the head, as transformers saves it
        shape = tensor.shape[::-1] if transpose else tensor.shape
        planned.append(Planned(tensor, theirs, shape, transpose, tensor.dtype))
    return sorted(planned, key=lambda p: p.target)


def _their_name(inverse: dict, ours: str) -> tuple[str, bool] | None:
    parts = ours.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        template = ".".join(["blocks", "{i}", *parts[2:]])
        found = inverse.get(template)
        return (found[0].replace("{i}", parts[1]), found[1]) if found else None
    return inverse.get(ours)


def byte_level_tokenizer_json() -> str:
    """A tokenizer.json that encodes text as its UTF-8 bytes, id = byte value: what our byte-level
    models read, in the form other tools load (GPT-2's byte alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for char, byte in gpt2_byte_chars().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


def _tokenizer_files(artifact: art.Artifact, staging: Path, spec: dict) -> tuple[str, dict[str, int | None]]:
    """Write tokenizer.json and tokenizer_config.json; (how: copied, byte-level or none; the
    bos/eos/pad ids). A model without a tokenizer whose vocabulary is not the 256 bytes (an import
    of a checkpoint that came without one) gets none: ids 0-255 are not bytes to it."""
    section = artifact.config.get("tokenizer")
    if section is None and spec["vocab_size"] != BYTE_VOCAB:
        return "none", {}
    if section is None:
        (staging / TOKENIZER_FILE).write_text(byte_level_tokenizer_json(), encoding="utf-8")
        section, how, tokenizer = {}, "byte-level", None
    else:
        artifact.copy_tokenizer(staging)
        how, tokenizer = "copied", artifact.tokenizer().tokenizer
    ids = {}
    for key in ("bos", "eos", "pad"):
        token = section.get(f"{key}_token")
        ids[key] = tokenizer.token_to_id(token) if token is not None and tokenizer is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec["block_size"],
              "clean_up_tokenization_spaces": False, "add_bos_token": bool(section.get("add_bos_token", False)),
              **{key: section.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
                 if section.get(key) is not None}}
    if section.get("chat_template") is not None:
        config["chat_template"] = section["chat_template"]
    _write_json(staging / "tokenizer_config.json", config)
    return how, ids


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_hf(artifact: art.Artifact, out: Path | str, overwrite: bool = False, progress=None) -> HFExportResult:
    """Write ``artifact`` as a Hugging Face directory at ``out`` (checked before any work)."""
    where = str(artifact.path)
    spec = artifact.model_spec
    if artifact.task != "language-modeling" or spec.get("arch") not in ("gpt", "llama"):
        raise UserError(f"{where}: is a {spec.get('arch')!r} {artifact.task} model; --format hf exports the language "
                        "models gpt and llama (use --format onnx for the others)")
    artifact.require_weights()
    if artifact.config.get("quantization") is not None:
        raise UserError(f"{where}: holds weight-only quantized tensors, which Hugging Face's model classes do not "
                        "read; export its float parent with --format hf")
    kind = source_model_type(artifact)
    check_expressible(spec, kind, where)
    planned = planned_tensors(artifact, kind)
    dtypes = sorted({p.dtype for p in planned})
    art.check_output(out, overwrite, inputs=[artifact.path])
    with art.atomic_directory(out, overwrite, inputs=[artifact.path]) as staging:
        write_streamed(staging / HF_WEIGHTS_FILE, planned, {"format": "pt"}, progress)
        how, ids = _tokenizer_files(artifact, staging, spec)
        # the dtype most of the weights are stored in (bf16/fp16 imports stay so)
        main = max(dtypes, key=lambda d: sum(1 for p in planned if p.dtype == d))
        _write_json(staging / "config.json", hf_config(spec, kind, main, ids))
        if ids.get("bos") is not None or ids.get("eos") is not None:
            _write_json(staging / "generation_config.json",
                        {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
                         **({"pad_token_id": ids["pad"]} if ids.get("pad") is not None else {})})
        files = art.file_entries(staging)
        _write_json(staging / HF_EXPORT_FILE, {
            "format": "bigmodel-hf-export", "note": "a Hugging Face directory written by bigmodel export --format hf; "
            "not a bigmodel artifact (import it with bigmodel import)", "model_type": kind,
            "parent": art.parent_ref(artifact), "files": files})
    return HFExportResult(Path(out), kind, len(planned), dtypes, how, files)


__all__ = ["HFExportResult", "export_hf", "check_expressible", "byte_level_tokenizer_json", "hf_config", "source_model_type",
           "planned_tensors"]
