"""The model registry: architecture name → config dataclass, module class and presets (as data).

``resolve_spec`` turns a name, a preset, user overrides and what the data says (input shape,
classes, vocabulary) into the plain dict stored under ``"model"`` in config.json;
``build_model`` turns that dict back into a module. Nothing else needs to know the architectures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigErrors, UserError


@dataclass(frozen=True)
class Arch:
    name: str
    task: str
    module: str  # submodule holding <Config>, <Model>, PRESETS, DEFAULT_PRESET
    config_cls: str
    model_cls: str
    summary: str

    def _mod(self):
        import importlib

        return importlib.import_module(f"{__name__}.{self.module}")

    @property
    def presets(self) -> dict[str, dict]:
        return self._mod().PRESETS

    @property
    def default_preset(self) -> str:
        return self._mod().DEFAULT_PRESET

    def config_type(self):
        return getattr(self._mod(), self.config_cls)

    def model_type(self):
        return getattr(self._mod(), self.model_cls)


ARCHS: dict[str, Arch] = {
    "mlp": Arch("mlp", "classification", "mlp", "MLPConfig", "MLP", "input → (Linear, ReLU)×N → classes"),
    "cnn": Arch("cnn", "classification", "cnn", "CNNConfig", "CNN", "(Conv3×3, ReLU, MaxPool)×N → Linear head"),
    "gpt": Arch("gpt", "language-modeling", "gpt", "GPTConfig", "GPT", "decoder-only transformer LM (pre-LN, causal SDPA, GELU)"),
    "llama": Arch("llama", "language-modeling", "llama", "LlamaConfig", "Llama",
                  "Llama-family LM (RMSNorm, RoPE, SwiGLU, grouped-query attention)"),
}
# The language models: token ids in, next-token logits out, a context of ``block_size``.
LM_ARCHS = ("gpt", "llama")
USER_ARCH = "user"


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(ARCHS)} or give path/to/file.py:Class (see `bigmodel models`)")
    return ARCHS[name]


def _fields(arch: Arch) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(arch.config_type())}


def _check_value(name: str, value: Any, problems: list[str]) -> None:
    """Widths and counts must be positive ints; rates in [0, 1)."""
    values = value if isinstance(value, list) else [value]
    if name in ("dropout",):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            problems.append(f"model {name} must be in [0, 1), got {value!r}")
        return
    if name in ("bias", "tie_weights", "qkv_bias"):
        if not isinstance(value, bool):
            problems.append(f"model {name} must be true or false, got {value!r}")
        return
    if name in ("rope_theta", "norm_eps"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            problems.append(f"model {name} must be a positive number, got {value!r}")
        return
    if name == "activation":
        if value not in GPT_ACTIVATIONS:
            problems.append(f"model activation must be one of {', '.join(GPT_ACTIVATIONS)}, got {value!r}")
        return
    if name == "rope_scaling":
        problems += rope_scaling_problems(value)
        return
    for item in values:
        if value is None and name in ("head_dim", "mlp_hidden", "n_kv_head"):
            continue
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            problems.append(f"model {name} must be a positive integer{' list' if isinstance(value, list) else ''}, got {value!r}")
            return


GPT_ACTIVATIONS = ("gelu", "gelu_tanh")  # exact GELU (ours), tanh approximation (GPT-2's "gelu_new")
# The keys each RoPE scaling needs (models/llama.py computes them as transformers does)
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling_problems(value: Any) -> list[str]:
    """What is wrong with a llama rope_scaling value (None, or an object naming a known type)."""
    if value is None:
        return []
    kind = value.get("rope_type") if isinstance(value, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        return [f"model rope_scaling must be null or an object with rope_type {' or '.join(ROPE_SCALING_KEYS)}, got {value!r}"]
    bad = [key for key in ROPE_SCALING_KEYS[kind] if isinstance(value.get(key), bool)
           or not isinstance(value.get(key), (int, float)) or not 0 < value[key] < math.inf]
    if kind == "llama3" and not bad and value["high_freq_factor"] == value["low_freq_factor"]:
        bad = ["high_freq_factor (must differ from low_freq_factor)"]
    return [f"model rope_scaling {kind} needs positive numbers for {', '.join(bad)}"] if bad else []


def resolve_spec(
    arch_name: str,
    preset: str | None = None,
    overrides: dict | None = None,
    data_fit: dict | None = None,
) -> dict:
    """Build the config.json "model" dict.

    ``overrides`` are what the user set explicitly (they win); ``data_fit`` are sizes the data
    implies (input size, classes, vocabulary), used where the user set nothing.
    """
    arch = get_arch(arch_name)
    overrides = dict(overrides or {})
    data_fit = dict(data_fit or {})
    preset = preset or arch.default_preset
    if preset not in arch.presets:
        raise UserError(f"unknown preset {preset!r} for {arch.name}; choose one of {', '.join(arch.presets)}")
    fields = _fields(arch)
    problems = [f"unknown {arch.name} argument {key!r} (known: {', '.join(fields)})" for key in overrides if key not in fields]
    if problems:
        raise ConfigErrors(problems, "model arguments")
    values = {**arch.presets[preset], **{k: v for k, v in data_fit.items() if k in fields}, **overrides}
    config = arch.config_type()(**values)
    spec = {"arch": arch.name, "preset": preset, **dataclasses.asdict(config)}
    validate_spec(spec)
    return spec


def validate_spec(spec: dict) -> None:
    arch = get_arch(spec["arch"])
    fields = _fields(arch)
    problems = []
    for key, value in spec.items():
        if key in ("arch", "preset"):
            continue
        if key not in fields:
            problems.append(f"unknown {arch.name} argument {key!r}")
        else:
            _check_value(key, value, problems)
    if arch.name == "gpt" and not problems:
        n_embd, n_head = (spec.get(k, fields[k].default) for k in ("n_embd", "n_head"))  # a missing size: its default
        if n_embd % n_head and spec.get("head_dim") is None:
            problems.append(f"gpt n_embd {n_embd} must be divisible by n_head {n_head}")
    if arch.name == "llama" and not problems:
        problems += _llama_problems(spec, fields)
    if not problems:
        problems += _size_problems(spec)
    if problems:
        raise ConfigErrors(problems, "model configuration")


def _llama_problems(spec: dict, fields: dict) -> list[str]:
    n_embd, n_head = (spec.get(k, fields[k].default) for k in ("n_embd", "n_head"))
    n_kv_head, head_dim = spec.get("n_kv_head") or n_head, spec.get("head_dim")
    problems = []
    if head_dim is None and n_embd % n_head:
        problems.append(f"llama n_embd {n_embd} must be divisible by n_head {n_head} (or give head_dim)")
    if n_head % n_kv_head:
        problems.append(f"llama n_head {n_head} must be a multiple of n_kv_head {n_kv_head} (each key/value head "
                        "serves a whole group of query heads)")
    if (head_dim or n_embd // n_head) % 2:
        problems.append(f"llama head_dim {head_dim or n_embd // n_head} must be even (RoPE rotates pairs of dimensions)")
    return problems


# Sane maxima, far above any real model (Llama-2-70B has 80 layers and 7e10 parameters): a config
# beyond them is a mistake or an attack, and building even its empty (meta) modules would take
# the machine's memory — one Python object per layer.
MAX_LAYERS = 10_000
MAX_PARAMETERS = 10**15


def _size_problems(spec: dict) -> list[str]:
    """Depth first (cheap to count), then parameters by formula; a missing size takes its default."""
    depth = {"gpt": ("n_layer", spec.get("n_layer") or 0), "llama": ("n_layer", spec.get("n_layer") or 0),
             "mlp": ("hidden_sizes", len(spec.get("hidden_sizes") or ())),
             "cnn": ("channels", len(spec.get("channels") or ()) + len(spec.get("hidden_sizes") or ()))}
    name, layers = depth[spec["arch"]]
    if layers > MAX_LAYERS:
        return [f"{spec['arch']} {name} asks for {layers:,} layers, more than the {MAX_LAYERS:,} bigmodel builds"]
    params = parameter_count(spec)
    if params > MAX_PARAMETERS:
        return [f"{spec['arch']} has {params:.3g} parameters, more than the {MAX_PARAMETERS:.0e} bigmodel builds; "
                "lower its sizes"]
    return []


def parameter_count(spec: dict) -> int:
    """Unique parameters of a built-in architecture's (validated) spec, by formula: nothing is
    built, so it is instant whatever the sizes (tied weights counted once, as count_parameters)."""
    arch = get_arch(spec["arch"])
    c = arch.config_type()(**{k: v for k, v in spec.items() if k not in ("arch", "preset")})  # with defaults
    if arch.name == "mlp":
        widths = [c.input_size, *c.hidden_sizes, c.num_classes]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))
    if arch.name == "cnn":
        from .cnn import feature_size

        channels = [c.in_channels, *c.channels]
        convs = sum(9 * a * b + b for a, b in zip(channels, channels[1:]))
        h, w = feature_size(c)
        widths = [channels[-1] * h * w, *c.hidden_sizes, c.num_classes]
        return convs + sum(a * b + b for a, b in zip(widths, widths[1:]))
    if arch.name == "llama":
        e, q, kv = c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        attention = e * (q + 2 * kv) + (q + 2 * kv) * c.qkv_bias + q * e
        block = 2 * e + attention + 3 * e * c.mlp_hidden
        return c.vocab_size * e * (1 if c.tie_weights else 2) + c.n_layer * block + e
    bias = 1 if c.bias else 0  # gpt
    inner, e = c.n_head * c.head_dim, c.n_embd
    norm = e * (1 + bias)
    attention = e * 3 * inner + 3 * inner * bias + inner * e + e * bias
    mlp = e * c.mlp_hidden + c.mlp_hidden * bias + c.mlp_hidden * e + e * bias
    head = 0 if c.tie_weights else e * c.vocab_size
    return (c.vocab_size + c.block_size) * e + c.n_layer * (2 * norm + attention + mlp) + norm + head


def build_model(spec: dict, base_dir: Path | None = None):
    """config.json "model" dict → an initialised nn.Module."""
    if spec.get("arch") == USER_ARCH:
        from .user import build_user_model

        model = build_user_model(spec, base_dir)
        if spec.get("pruned"):  # structured pruning changed its shapes (JSON record, no pickle)
            from .pruned_shapes import restore_pruned_shapes

            restore_pruned_shapes(model, spec["pruned"])
        return model
    validate_spec(spec)
    arch = get_arch(spec["arch"])
    values = {k: v for k, v in spec.items() if k not in ("arch", "preset")}
    return arch.model_type()(arch.config_type()(**values))


def count_parameters(model) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def meta_parameter_count(spec: dict) -> int:
    """Parameters of a spec without allocating them (the meta device)."""
    import torch

    with torch.device("meta"):
        return count_parameters(build_model(spec))


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{1 if n / scale < 100 else 0}f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0 if n <= 0 else min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024 ** i:.1f} {units[i]}" if i else f"{int(n)} B"
