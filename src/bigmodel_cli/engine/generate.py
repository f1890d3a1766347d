"""``bigmodel generate``: text from a language model (its tokenizer, or bytes), on PyTorch or ONNX Runtime.

Every token recomputes the whole (cropped) context: there is no KV cache, on either backend, so
both run the same computation and, for the same seed, produce the same text. That costs
O(context) work per token — fine for the small models this tool trains, and stated in
docs/runtime.md. Sampling is numpy (temperature, top-k, a seeded generator), shared by both
backends, so it does not depend on torch's RNG.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..artifact import Artifact
from ..config import is_finite_number, seed_problem, threads_problem
from ..errors import ConfigErrors, UserError

BYTE_VOCAB = 256


@dataclass
class GenerateConfig:
    prompt: str
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy (always the most likely byte)
    top_k: int | None = 50  # None or 0 = the whole vocabulary
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None


def validate(cfg: GenerateConfig) -> None:
    problems = []
    if not cfg.prompt:
        problems.append("--prompt must not be empty (the model needs at least one byte to continue)")
    if cfg.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    if not (is_finite_number(cfg.temperature) and cfg.temperature >= 0):
        problems.append(f"--temperature must be 0 (greedy) or a finite positive number, got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k < 0:
        problems.append(f"--top-k must be 0 (all) or positive, got {cfg.top_k}")
    problems += [p for p in (seed_problem(cfg.seed), threads_problem(cfg.threads)) if p]
    if problems:
        raise ConfigErrors(problems, "generation options")


def sample_next(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token from the last position's logits. Ties in greedy decoding go to the lowest id."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    if top_k and top_k < len(logits):
        cutoff = np.sort(logits)[-top_k]
        logits = np.where(logits >= cutoff, logits, -np.inf)
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    # Inverse-CDF sampling with one uniform draw per token: the same seed gives the same draws on
    # every backend, so tiny float differences between runtimes rarely change a token.
    return int(min(np.searchsorted(np.cumsum(p), rng.random(), side="right"), len(p) - 1))


def context_limits(artifact: Artifact, backend_detail: dict) -> tuple[int, int | None]:
    """(longest context the model takes, fixed sequence length of an ONNX graph or None)."""
    model_ctx = artifact.model_spec.get("block_size") or artifact.data_spec.get("block_size")
    if not model_ctx:
        raise UserError(f"{artifact.path}: config.json gives no block_size for this language model; re-create the artifact")
    shape = backend_detail.get("input_shape") or []
    fixed = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
    return int(fixed or model_ctx), fixed


def generate_tokens(predict: Callable[[np.ndarray], np.ndarray], prompt: list[int], cfg: GenerateConfig, context: int,
                    fixed_seq: int | None = None, progress: Callable[..., Any] | None = None) -> list[int]:
    """Append ``cfg.max_new_tokens`` tokens to ``prompt``, recomputing the context each time.

    A graph with a fixed sequence length is fed the context right-padded to that length, and the
    logits are read at the last real position: causal attention means padding after a position
    cannot change it.
    """
    rng = np.random.default_rng(cfg.seed)
    tokens = list(prompt)
    for i in range(cfg.max_new_tokens):
        window = tokens[-context:]
        n = len(window)
        batch = np.zeros((1, fixed_seq or n), dtype=np.int64)
        batch[0, :n] = window
        logits = predict(batch)[0, n - 1]
        tokens.append(sample_next(logits, cfg.temperature, cfg.top_k, rng))
        if progress:
            progress("generate", done=i + 1, total=cfg.max_new_tokens)
    return tokens


def generate_text(artifact: Artifact, cfg: GenerateConfig, progress: Callable[..., Any] | None = None) -> dict:
    """Prompt (UTF-8 bytes) → continuation, plus where it ran and how fast."""
    from .backends import open_backend

    validate(cfg)
    if artifact.task != "language-modeling":
        raise UserError(f"{artifact.path}: is a classifier; use bigmodel predict {artifact.path} INPUT")
    tokenizer = artifact.tokenizer()  # the artifact's tokenizer.json, or bytes
    vocab = artifact.model_spec.get("vocab_size") or artifact.data_spec.get("vocab_size")
    if tokenizer.is_byte_level and vocab != BYTE_VOCAB:
        raise UserError(f"{artifact.path}: has a vocabulary of {vocab} but no tokenizer; generate needs a byte-level "
                        "model (trained on --data text:...) or one that carries its tokenizer (train --tokenizer DIR)")
    runner = open_backend(artifact, cfg.backend, cfg.device, cfg.threads)
    context, fixed = context_limits(artifact, runner.detail)
    prompt = tokenizer.encode(cfg.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no tokens; give some text")

    def predict(batch: np.ndarray) -> np.ndarray:
        # Embedding rows past the tokenizer (a padded vocabulary) are ids no text decodes from.
        return runner.predict(batch)[..., :tokenizer.vocab_size]

    start = time.perf_counter()
    tokens = generate_tokens(predict, prompt, cfg, context, fixed, progress)
    seconds = time.perf_counter() - start
    new = tokens[len(prompt):]
    return {
        "artifact": str(artifact.path), "prompt": cfg.prompt,
        "text": tokenizer.decode(new), "tokens": new,
        "new_tokens": len(new), "seconds": seconds, "tokens_per_s": len(new) / seconds if seconds else None,
        "context": context, "prompt_cropped": len(prompt) > context,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "seed": cfg.seed,
        "backend": runner.name, "device": runner.device, "threads": runner.threads,
        **({"provider": runner.detail["provider"]} if "provider" in runner.detail else {}),
    }
