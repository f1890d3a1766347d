"""A decoder-only transformer language model in the Llama mould (also Mistral, Qwen2, SmolLM).

What differs from ``gpt.py``: RMSNorm instead of LayerNorm, rotary position embeddings (RoPE)
instead of learned positions, a SwiGLU MLP, grouped-query attention (``n_kv_head`` key/value heads
shared by ``n_head // n_kv_head`` query heads each), no biases except Qwen2's on q, k and v, and an
untied output head by default. The maths follows Hugging Face's ``modeling_llama.py`` step for step
(the same RoPE layout, the same order of casts in RMSNorm), so an imported checkpoint gives the
same logits (tests/test_pretrained.py checks it against ``transformers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .gpt import KVCache, cached_attention, gpt2_init, padded_positions

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    block_size: int = 256  # the longest sequence it is used with; RoPE itself has no table to size
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # defaults to n_head (plain multi-head attention)
    n_embd: int = 128
    head_dim: int | None = None  # defaults to n_embd // n_head
    mlp_hidden: int | None = None  # defaults to Llama's 8/3 * n_embd, rounded up to a multiple of 64
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2
    tie_weights: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """The rotation frequency of each pair of head dimensions, float32, on the CPU — computed as
    transformers does (``_compute_default_rope_parameters`` / ``_compute_llama3_parameters``) so
    imported models match it to the last bit."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are stretched by ``factor``, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RoPE layout: the first half of a head's dimensions pairs with the second."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32 whatever the compute dtype, as Llama does, then scaled
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.n_kv_head != self.n_head:  # GQA: each key/value head serves a group of query heads
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.n_head * self.head_dim))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       past: tuple[torch.Tensor, torch.Tensor] | None, key_mask: torch.Tensor | None = None):
        """``forward`` for the new positions (``cos``/``sin`` are theirs), attending over ``past``
        as well (``key_mask``: gpt.cached_attention). The cache holds the rotated keys of the ``n_kv_head`` heads, before GQA repeats
        them, as Hugging Face's does: n_head // n_kv_head times smaller."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        present = (k, v)
        if self.n_kv_head != self.n_head:
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = cached_attention(q, k, v, self.dropout if self.training else 0.0, key_mask)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.n_head * self.head_dim)), present


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       past: tuple[torch.Tensor, torch.Tensor] | None, key_mask: torch.Tensor | None = None):
        attended, present = self.attn.forward_cached(self.attn_norm(x), cos, sin, past, key_mask)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), present


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        # A plain attribute, not a buffer: it stays float32 when the weights are cast to fp16/bf16
        # (RoPE in half precision loses positions) and is not a weight to save or load.
        self.inv_freq = rope_inv_freq(config)
        gpt2_init(self, config.n_layer, ("o_proj.weight", "down_proj.weight"))

    def rope(self, seq: int, like: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotation of positions start..start+seq-1, (T, head_dim), in ``like``'s dtype."""
        positions = torch.arange(start, start + seq, device=like.device, dtype=torch.float32)
        return self.rope_at(positions, like)

    def rope_at(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotation of ``positions`` ((T,) → (T, head_dim); per row (B, T) →
        (B, 1, T, head_dim), which broadcasts over the heads), in ``like``'s dtype."""
        freqs = positions.float()[..., None] * self.inv_freq.to(like.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        if angles.dim() == 3:
            angles = angles[:, None]
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)

    def forward(self, idx: torch.Tensor, past: KVCache | None = None, use_cache: bool = False,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Token ids (B, T) → next-token logits (B, T, vocab).

        With ``use_cache`` (decoding): ``idx`` holds the positions after ``past``'s, and the result
        is (logits, present), present being ``past`` extended by them. A left-padded batch passes
        ``attention_mask`` (B, past + T; 0 = padding) and, optionally, ``position_ids`` (B, T;
        derived from the mask when omitted): each row's rotation counts from its first real token.
        """
        x = self.drop(self.tok_emb(idx))
        if not use_cache and past is None and attention_mask is None:
            cos, sin = self.rope(idx.shape[1], x)
            for block in self.blocks:
                x = block(x, cos, sin)
            return self.lm_head(self.norm(x))
        start = past[0][0].shape[2] if past else 0
        if position_ids is None and attention_mask is not None:
            position_ids = padded_positions(attention_mask, idx.shape[1])
        cos, sin = self.rope(idx.shape[1], x, start) if position_ids is None else self.rope_at(position_ids, x)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, layer = block.forward_cached(x, cos, sin, past[i] if past else None, attention_mask)
            present.append(layer)
        logits = self.lm_head(self.norm(x))
        return (logits, present) if use_cache else logits


# Presets as data. Parameter counts are for the byte vocabulary where vocab_size is 256.
PRESETS = {
    "tiny": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "block_size": 128, "tie_weights": True},  # ~0.12M
    "small": {"n_layer": 6, "n_head": 6, "n_kv_head": 2, "n_embd": 192, "block_size": 256, "tie_weights": True},  # ~2.4M
    # SmolLM-135M's shape (its 49,152-token vocabulary, tied head)
    "135m": {"n_layer": 30, "n_head": 9, "n_kv_head": 3, "n_embd": 576, "mlp_hidden": 1536, "block_size": 2048,
             "vocab_size": 49152, "tie_weights": True},
    # Llama-3.2-1B's shape
    "1b": {"n_layer": 16, "n_head": 32, "n_kv_head": 8, "n_embd": 2048, "mlp_hidden": 8192, "block_size": 8192,
           "vocab_size": 128256, "rope_theta": 500000.0, "tie_weights": True},
    # Llama-2-7B's shape
    "7b": {"n_layer": 32, "n_head": 32, "n_embd": 4096, "mlp_hidden": 11008, "block_size": 4096, "vocab_size": 32000},
    # Llama-3-8B's shape
    "8b": {"n_layer": 32, "n_head": 32, "n_kv_head": 8, "n_embd": 4096, "mlp_hidden": 14336, "block_size": 8192,
           "vocab_size": 128256, "rope_theta": 500000.0},
    # Llama-3-70B's shape
    "70b": {"n_layer": 80, "n_head": 64, "n_kv_head": 8, "n_embd": 8192, "mlp_hidden": 28672, "block_size": 8192,
            "vocab_size": 128256, "rope_theta": 500000.0},
}
DEFAULT_PRESET = "tiny"
