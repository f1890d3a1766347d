"""A Hugging Face checkpoint's tensors → our module's names, written one tensor at a time.

``plan_tensors`` decides, from the safetensors headers alone (no tensor read), which source tensor
becomes which of ours and checks every name and shape against the model config.json describes;
``write_streamed`` then copies them into one ``model.safetensors``. safetensors' own writer
(``save_file``) needs every tensor in memory at once, which for a 16 GB checkpoint is 16 GB; the
format is a JSON header of shapes and byte offsets followed by the raw bytes, and every offset is
known from the headers, so the header is written first and each tensor is read, renamed,
transposed or cast, written and dropped. Peak memory is the largest tensor plus the pages of the
source file the OS keeps mapped, not the model (docs/benchmarks.md, "Import memory"). The result
is read back by safetensors like any artifact's weights.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...models import build_model, parameter_count

# (Hugging Face name, ours, transposed). {i} is a layer index. GPT-2's Conv1D stores its weight as
# (in, out), the transpose of nn.Linear's (out, in).
_LLAMA_RULES = [
    ("model.embed_tokens.weight", "tok_emb.weight", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head.weight", False),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight", False),
    *((f"model.layers.{{i}}.self_attn.{p}_proj.{kind}", f"blocks.{{i}}.attn.{p}_proj.{kind}", False)
      for p in "qkvo" for kind in ("weight", "bias")),
    *((f"model.layers.{{i}}.mlp.{p}_proj.weight", f"blocks.{{i}}.mlp.{p}_proj.weight", False)
      for p in ("gate", "up", "down")),
]
_GPT2_RULES = [
    ("wte.weight", "tok_emb.weight", False),
    ("wpe.weight", "pos_emb.weight", False),
    ("ln_f.weight", "ln_f.weight", False),
    ("ln_f.bias", "ln_f.bias", False),
    ("lm_head.weight", "lm_head.weight", False),
    *((f"h.{{i}}.{hf}.{kind}", f"blocks.{{i}}.{ours}.{kind}", kind == "weight" and hf not in ("ln_1", "ln_2"))
      for hf, ours in (("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                       ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj"))
      for kind in ("weight", "bias")),
]
RULES = {"gpt2": _GPT2_RULES, "llama": _LLAMA_RULES, "mistral": _LLAMA_RULES, "qwen2": _LLAMA_RULES}
# Buffers some checkpoints carry that are not weights: GPT-2's causal masks, older Llamas' RoPE table.
_IGNORED = {"gpt2": re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
            "llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")}
# safetensors dtype names of the float types a model can be imported in
DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
FLAG_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Planned:
    source: SourceTensor
    target: str
    shape: tuple[int, ...]  # ours (transposed where the source is)
    transpose: bool
    dtype: str  # what it is written as


@functools.lru_cache(maxsize=None)
def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


def our_name(model_type: str, name: str, where: str = "checkpoint") -> tuple[str, bool] | None:
    """(our name, transposed) for a source tensor name; None for a buffer that is not a weight.
    Raises UserError for a name no rule knows."""
    stripped = name.removeprefix("transformer.") if model_type == "gpt2" else name
    ignored = _IGNORED.get("gpt2" if model_type == "gpt2" else "llama")
    if ignored.fullmatch(stripped):
        return None
    for hf, ours, transpose in RULES[model_type]:
        match = _compile(hf).fullmatch(stripped)
        if match:
            return ours.replace("{i}", match.group(1)) if match.groups() else ours, transpose
    raise UserError(f"{where}: tensor {name} is not part of a {model_type} model; the checkpoint does not match its "
                    "config.json's model_type")


def read_headers(files: list[Path], where: str) -> dict[str, SourceTensor]:
    """Every tensor's name, shape and dtype from the safetensors headers (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, SourceTensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    if name in tensors:
                        raise UserError(f"{where}: tensor {name} is in both {tensors[name].file.name} and {file.name}; "
                                        "the checkpoint is damaged")
                    tensors[name] = SourceTensor(name, file, tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{file}: cannot read it as safetensors ({exc}); the checkpoint is damaged") from None
    return tensors


def plan_tensors(model_type: str, tensors: dict[str, SourceTensor], spec: dict, dtype: str | None,
                 where: str) -> list[Planned]:
    """What to write, in file order: every tensor of the model config.json describes, from exactly
    one source tensor of the right shape. ``dtype`` (F32/F16/BF16) casts; None keeps each as stored."""
    import torch

    for tensor in tensors.values():
        if tensor.dtype not in DTYPES:
            raise UserError(f"{where}: tensor {tensor.name} is {tensor.dtype}, not a float type bigmodel imports "
                            f"({', '.join(DTYPES)}); quantized checkpoints (GPTQ, AWQ, bitsandbytes) are not supported")
    stored = sum(math.prod(t.shape) for t in tensors.values())
    wanted = parameter_count(spec)
    # Before building even a meta model: one far bigger than the weights (a hostile or wrong config)
    # is refused from the headers alone. Within a factor of two, the tensor-by-tensor check below
    # names exactly what is missing or mis-shaped.
    if wanted > 2 * stored:
        raise UserError(f"{where}: config.json describes {wanted:,} parameters but the weights hold {stored:,}; "
                        "config.json and the weights do not belong together")
    with torch.device("meta"):
        model = build_model(spec)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if spec.get("tie_weights"):
        expected.pop("lm_head.weight")  # restored by the model's own tying on load
    planned: dict[str, Planned] = {}
    for tensor in tensors.values():
        mapped = our_name(model_type, tensor.name, where)
        if mapped is None:
            continue
        target, transpose = mapped
        if target == "lm_head.weight" and spec.get("tie_weights"):
            continue  # some tied checkpoints store the head too; the embedding is the one kept
        if target not in expected:
            raise UserError(f"{where}: tensor {tensor.name} has no place in the model config.json describes "
                            f"({target}); config.json and the weights do not belong together")
        shape = tensor.shape[::-1] if transpose else tensor.shape
        if len(tensor.shape) not in (1, 2) or shape != expected[target]:
            want = expected[target][::-1] if transpose else expected[target]
            raise UserError(f"{where}: tensor {tensor.name} has shape {list(tensor.shape)} but config.json implies "
                            f"{list(want)}; config.json and the weights do not belong together")
        planned[target] = Planned(tensor, target, shape, transpose, dtype or tensor.dtype)
    missing = [name for name in expected if name not in planned]
    if missing:
        raise UserError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the model needs ({', '.join(missing[:3])} "
                        "in bigmodel's names); it is incomplete or does not match its config.json")
    return sorted(planned.values(), key=lambda p: (str(p.source.file), p.source.name))


def write_streamed(path: Path, planned: list[Planned], metadata: dict[str, str], progress=None) -> None:
    """Write ``planned`` as one safetensors file, one tensor in memory at a time (see the module doc)."""
    import torch
    from safetensors import safe_open

    header: dict = {"__metadata__": metadata}
    offset = 0
    for item in planned:
        size = math.prod(item.shape) * DTYPES[item.dtype][1]
        header[item.target] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for file in dict.fromkeys(item.source.file for item in planned):  # one shard open at a time
            with safe_open(str(file), framework="pt") as handle:
                for item in (p for p in planned if p.source.file == file):
                    tensor = handle.get_tensor(item.source.name)
                    if item.transpose:
                        tensor = tensor.t()
                    tensor = tensor.to(getattr(torch, DTYPES[item.dtype][0])).contiguous()
                    out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                    del tensor
                    if progress:
                        progress("tensor", name=item.target)
