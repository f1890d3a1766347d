"""A Hugging Face ``config.json`` → the ``"model"`` section of ours, or one line saying why not.

Each supported ``model_type`` maps onto one of our modules exactly (same maths, same logits):
``gpt2`` onto ``gpt`` (with GELU's tanh approximation), ``llama``, ``mistral`` and ``qwen2`` onto
``llama``. Anything the module cannot compute exactly is refused here, before a tensor is read,
rather than imported into a model that quietly gives other logits.
"""

from __future__ import annotations

from typing import Any

from ...errors import UserError
from ...models import ROPE_SCALING_KEYS, validate_spec

# model_type → our arch
SUPPORTED = {"gpt2": "gpt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
# transformers' names of GELU's tanh approximation, and of exact GELU
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GELU_EXACT = ("gelu",)
# our gpt's nn.LayerNorm uses torch's default eps; GPT-2 checkpoints use the same
GPT_LAYERNORM_EPS = 1e-5


def model_type(hf: dict, where: str) -> str:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise UserError(f"{where}: model_type {kind!r} is not supported; bigmodel imports "
                        f"{', '.join(SUPPORTED)} (see docs/pretrained.md)")
    return kind


def to_spec(hf: dict, where: str) -> tuple[dict, list[str]]:
    """(our model section, notes for the user) for a checkpoint's config.json."""
    kind = model_type(hf, where)
    spec, notes = (_gpt2 if kind == "gpt2" else _llama)(hf, kind, where)
    validate_spec(spec)  # sizes: positive ints, and the caps on layers and parameters
    return spec, notes


def _int(hf: dict, key: str, where: str, default: Any = None) -> int:
    value = default if hf.get(key) is None else hf[key]  # transformers writes null for "the default"
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: {key} must be a positive integer, got {value!r}; the checkpoint's config.json is damaged")
    return value


def _number(hf: dict, key: str, where: str, default: float | None) -> float:
    value = default if hf.get(key) is None else hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{where}: {key} must be a positive number, got {value!r}; the checkpoint's config.json is damaged")
    return float(value)


def _refuse(where: str, kind: str, what: str) -> UserError:
    return UserError(f"{where}: this {kind} checkpoint uses {what}, which bigmodel's model does not compute; "
                     "it cannot be imported exactly (see docs/pretrained.md)")


def _gpt2(hf: dict, kind: str, where: str) -> tuple[dict, list[str]]:
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_TANH + GELU_EXACT:
        raise _refuse(where, kind, f"activation_function {act!r}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise _refuse(where, kind, "a non-standard attention scale")
    if hf.get("add_cross_attention"):
        raise _refuse(where, kind, "cross-attention")
    if _number(hf, "layer_norm_epsilon", where, GPT_LAYERNORM_EPS) != GPT_LAYERNORM_EPS:
        raise _refuse(where, kind, f"layer_norm_epsilon {hf['layer_norm_epsilon']}")
    n_embd = _int(hf, "n_embd", where)
    spec = {
        "arch": "gpt", "vocab_size": _int(hf, "vocab_size", where), "block_size": _int(hf, "n_positions", where),
        "n_layer": _int(hf, "n_layer", where), "n_head": _int(hf, "n_head", where), "n_embd": n_embd,
        "head_dim": None, "mlp_hidden": _int(hf, "n_inner", where, 4 * n_embd),
        "dropout": 0.0, "bias": True, "tie_weights": bool(hf.get("tie_word_embeddings", True)),
        "activation": "gelu_tanh" if act in GELU_TANH else "gelu",
    }
    if n_embd % spec["n_head"]:
        raise UserError(f"{where}: n_embd {n_embd} is not divisible by n_head {spec['n_head']}; the checkpoint's config.json is damaged")
    spec["head_dim"] = n_embd // spec["n_head"]
    return spec, []


def _rope(hf: dict, kind: str, where: str) -> tuple[float, dict | None]:
    """rope_theta and our rope_scaling, from transformers 4's ``rope_theta`` + ``rope_scaling`` or
    transformers 5's ``rope_parameters`` (which holds both)."""
    params = hf.get("rope_parameters")
    scaling = params if isinstance(params, dict) else hf.get("rope_scaling")
    theta_source = params if isinstance(params, dict) and "rope_theta" in params else hf
    theta = _number(theta_source, "rope_theta", where, 10000.0)
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise UserError(f"{where}: rope_scaling must be an object, got {scaling!r}; the checkpoint's config.json is damaged")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise _refuse(where, kind, f"rope_type {rope_type!r} (supported: default, {', '.join(ROPE_SCALING_KEYS)})")
    ours = {"rope_type": rope_type}
    for key in ROPE_SCALING_KEYS[rope_type]:
        ours[key] = _number(scaling, key, where, None)
    if rope_type == "llama3":
        ours["original_max_position_embeddings"] = _int(scaling, "original_max_position_embeddings", where)
    return theta, ours


def _llama(hf: dict, kind: str, where: str) -> tuple[dict, list[str]]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(where, kind, f"hidden_act {act!r}")
    if kind == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise _refuse(where, kind, "biases on every attention or MLP projection (attention_bias/mlp_bias)")
    n_embd, n_head = _int(hf, "hidden_size", where), _int(hf, "num_attention_heads", where)
    theta, scaling = _rope(hf, kind, where)
    block_size = _int(hf, "max_position_embeddings", where, 2048)
    notes = []
    # Sliding-window attention equals full causal attention on sequences no longer than the window,
    # so the context is capped at the window rather than computing something else beyond it.
    uses_window = kind == "mistral" or (kind == "qwen2" and hf.get("use_sliding_window"))
    window = hf.get("sliding_window") if uses_window else None
    if window is not None:
        window = _int(hf, "sliding_window", where)
        if window < block_size:
            notes.append(f"sliding_window {window} < max_position_embeddings {block_size}: the context is "
                         f"capped at {window} tokens, where full attention equals the sliding window")
            block_size = window
    spec = {
        "arch": "llama", "vocab_size": _int(hf, "vocab_size", where), "block_size": block_size,
        "n_layer": _int(hf, "num_hidden_layers", where), "n_head": n_head,
        "n_kv_head": _int(hf, "num_key_value_heads", where, n_head), "n_embd": n_embd,
        "head_dim": _int(hf, "head_dim", where, n_embd // n_head if n_embd >= n_head else None),
        "mlp_hidden": _int(hf, "intermediate_size", where), "rope_theta": theta, "rope_scaling": scaling,
        "norm_eps": _number(hf, "rms_norm_eps", where, 1e-6), "qkv_bias": kind == "qwen2",
        "tie_weights": bool(hf.get("tie_word_embeddings", False)), "dropout": 0.0,
    }
    return spec, notes
