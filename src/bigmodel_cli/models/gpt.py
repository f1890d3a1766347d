"""A decoder-only transformer language model in the GPT-2 mould.

Pre-LayerNorm blocks, causal ``scaled_dot_product_attention`` (fused kernels where PyTorch has
them), a GELU MLP, learned positions and, by default, an output head tied to the token embedding.
Widths that pruning changes (``n_head``, ``head_dim``, ``mlp_hidden``) are explicit in the config so
that a pruned model rebuilds from config.json alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# A KV cache: one (key, value) pair per layer, each (batch, kv_heads, past_length, head_dim) — the
# layout of Hugging Face's past_key_values and of the ONNX decoder's past/present tensors.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q`` (the last T positions) over ``k``/``v`` (past + those T).

    Without a past the fused causal kernel applies; one new query may see every key, so it needs no
    mask; several new queries after a past need the causal mask shifted by the past's length.
    ``key_mask`` (batch, past + T; nonzero = a real token) hides a left-padded batch's padding.
    """
    new, total = q.shape[-2], k.shape[-2]
    if key_mask is not None or torch.onnx.is_in_onnx_export():
        # One exported graph serves prefill (any past, even empty) and decode, so the branches
        # below cannot be baked in: the mask (query i sees keys up to past + i) is built from the
        # shapes, which the exporter keeps symbolic.
        rows = torch.arange(new, device=q.device)[:, None] + (total - new)
        cols = torch.arange(total, device=q.device)[None, :]
        mask = cols <= rows
        if key_mask is not None:
            # A padding query would see no key at all, and softmax over nothing is NaN, which its
            # value would then carry into every later layer's attention (0 * NaN): it sees itself.
            mask = mask & ((key_mask[:, None, None, :] != 0) | (cols == rows))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if new == total:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if new == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(diagonal=total - new)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def padded_positions(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Each row's positions of its last ``seq`` tokens, counted from its first real token (a
    left-padded row's first real token is position 0; padding gets 0): the position ids that
    transformers and Optimum derive from the attention mask."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 5
    n_head: int = 4
    n_embd: int = 128
    head_dim: int | None = None  # defaults to n_embd // n_head; head pruning keeps it and lowers n_head
    mlp_hidden: int | None = None  # defaults to 4 * n_embd; MLP pruning lowers it
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    # "gelu" (exact) for our own models; "gelu_tanh" is GPT-2's approximation ("gelu_new"), which an
    # imported GPT-2 needs to give its own logits. Artifacts without the key keep exact GELU.
    activation: str = "gelu"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=config.bias)
        self.proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_head * self.head_dim, dim=2)
        # (B, T, H*D) → (B, H, T, D)
        q, k, v = (t.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, seq, self.n_head * self.head_dim))

    def forward_cached(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``forward`` for the new positions only, attending over ``past`` keys/values as well;
        returns the output and the keys/values including the new positions (the ``present``)."""
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        y = cached_attention(q, k, v, self.dropout if self.training else 0.0, key_mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, self.n_head * self.head_dim)), (k, v)


class MLPBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLPBlock(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward_cached(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                       key_mask: torch.Tensor | None = None):
        attended, present = self.attn.forward_cached(self.ln1(x), past, key_mask)
        x = x + attended
        return x + self.mlp(self.ln2(x)), present


def gpt2_init(model: nn.Module, n_layer: int, residual_writers: tuple[str, ...]) -> None:
    """GPT-2's initialisation (shared by gpt and llama): N(0, 0.02) for Linear and Embedding
    weights, zero biases, and the projections that write into the residual stream (names ending in
    ``residual_writers``) scaled by 1/sqrt(2 * n_layer)."""
    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    model.apply(init)  # children first, as before: the same seed gives the same weights
    for name, param in model.named_parameters():
        if name.endswith(residual_writers):
            nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        gpt2_init(self, config.n_layer, ("proj.weight",))

    def forward(self, idx: torch.Tensor, past: KVCache | None = None, use_cache: bool = False,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Token ids (B, T) → next-token logits (B, T, vocab).

        With ``use_cache`` (decoding): ``idx`` holds the positions after ``past``'s, and the result
        is (logits, present), present being ``past`` extended by them. Learned positions end at
        ``block_size``: a caller whose context slides past it re-prefills the last window.
        A left-padded batch passes ``attention_mask`` (B, past + T; 0 = padding) and, optionally,
        ``position_ids`` (B, T; derived from the mask when omitted).
        """
        if not use_cache and past is None and attention_mask is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
            x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x))
        start = past[0][0].shape[2] if past else 0
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"{start + idx.shape[1]} positions exceed the model's {self.config.block_size}")
        if position_ids is None:
            position_ids = (padded_positions(attention_mask, idx.shape[1]) if attention_mask is not None
                            else torch.arange(start, start + idx.shape[1], device=idx.device))
        x = self.drop(self.tok_emb(idx) + self.pos_emb(position_ids))
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, layer = block.forward_cached(x, past[i] if past else None, attention_mask)
            present.append(layer)
        logits = self.lm_head(self.ln_f(x))
        return (logits, present) if use_cache else logits


# Presets as data. Parameter counts are for the byte vocabulary where vocab_size is 256.
PRESETS = {
    "nano": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128},  # ~0.12M
    "micro": {"n_layer": 5, "n_head": 4, "n_embd": 128, "block_size": 256},  # ~1.0M
    "milli": {"n_layer": 6, "n_head": 6, "n_embd": 192, "block_size": 256},  # ~2.8M
    "mini": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},  # ~10.8M
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257},  # 124M
    "1b": {"n_layer": 18, "n_head": 16, "n_embd": 2048, "block_size": 2048, "vocab_size": 32000, "tie_weights": False},
    "7b": {"n_layer": 32, "n_head": 32, "n_embd": 4096, "block_size": 4096, "vocab_size": 32000, "tie_weights": False},
    # 70b: Llama-2-70B's width and depth; a 4.5× GELU MLP gives its parameter count without SwiGLU.
    "70b": {"n_layer": 80, "n_head": 64, "n_embd": 8192, "mlp_hidden": 36864, "block_size": 4096, "vocab_size": 32000, "tie_weights": False},
}
DEFAULT_PRESET = "micro"
