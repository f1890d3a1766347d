"""``bigmodel generate``: text from a language model (its tokenizer, or bytes), on PyTorch or ONNX Runtime.

On PyTorch the ``gpt`` and ``llama`` modules keep a KV cache: the prompt is prefilled once, then
each step feeds one token and the cached keys/values (``CachedTorchDecoder``). Once the context
outgrows the model's window, every step re-prefills the last window, exactly as the cache-free
path crops it, so both give the same tokens. On ONNX Runtime an export's ``decoder.onnx`` (the
graph with past key values) does the same with the cache held in ORT (``onnx/decoder.py``); an
export without one, and ``--no-cache``, recompute the whole (cropped) context for every token
(``RecomputeDecoder``). Sampling is numpy (temperature,
top-k, top-p, repetition penalty, a seeded generator), shared by every decoder, so the same seed
gives the same text on both backends.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context (CTRL's rule)
    stop: tuple[str, ...] = field(default_factory=tuple)  # the text ends before the first of these
    use_cache: bool = True  # PyTorch's KV cache; False recomputes the context every token
    truncate: bool = True  # False: refuse a context that would not fit the window, rather than crop it
    add_special_tokens: bool = True  # False: the prompt holds its own BOS (a rendered chat template)
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
    if not (is_finite_number(cfg.top_p) and 0 < cfg.top_p <= 1):
        problems.append(f"--top-p must be in (0, 1] (1 keeps every token), got {cfg.top_p}")
    if not (is_finite_number(cfg.repetition_penalty) and cfg.repetition_penalty > 0):
        problems.append(f"--repetition-penalty must be a finite positive number (1 = none), got {cfg.repetition_penalty}")
    if any(not stop for stop in cfg.stop):
        problems.append("--stop must not be empty (it would stop before the first token); give the text to stop at")
    problems += [p for p in (seed_problem(cfg.seed), threads_problem(cfg.threads)) if p]
    if problems:
        raise ConfigErrors(problems, "generation options")


def sample_next(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator,
                top_p: float = 1.0, repetition_penalty: float = 1.0, seen: np.ndarray | None = None) -> int:
    """One token from the last position's logits. Ties in greedy decoding go to the lowest id.

    ``seen`` are the context's token ids, which ``repetition_penalty`` makes less likely (a positive
    logit divided by it, a negative one multiplied, as CTRL and transformers do).
    """
    logits = logits.astype(np.float64)
    if repetition_penalty != 1 and seen is not None and len(seen):
        ids = np.unique(seen[seen < len(logits)])
        logits[ids] = np.where(logits[ids] > 0, logits[ids] / repetition_penalty, logits[ids] * repetition_penalty)
    if temperature == 0:
        return int(np.argmax(logits))
    if top_k and top_k < len(logits):
        cutoff = np.sort(logits)[-top_k]
        logits = np.where(logits >= cutoff, logits, -np.inf)
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        # keep the most likely tokens until they hold top_p of the mass (the first always stays)
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        p[order[before >= top_p]] = 0
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


class RecomputeDecoder:
    """Next-token logits by recomputing the whole (cropped) context: ONNX Runtime and --no-cache.

    A graph with a fixed sequence length is fed the context right-padded to that length, and the
    logits are read at the last real position: causal attention means padding after a position
    cannot change it.
    """

    cache_bytes = 0

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], context: int, fixed_seq: int | None = None):
        self.predict, self.context, self.fixed_seq = predict, context, fixed_seq
        self.tokens: list[int] = []

    def start(self, prompt: list[int]) -> np.ndarray:
        self.tokens = list(prompt)
        return self.last_logits()

    def step(self, token: int) -> np.ndarray:
        self.tokens.append(token)
        return self.last_logits()

    def last_logits(self) -> np.ndarray:
        window = self.tokens[-self.context:]
        batch = np.zeros((1, self.fixed_seq or len(window)), dtype=np.int64)
        batch[0, :len(window)] = window
        return self.predict(batch)[0, len(window) - 1]


def supports_cache(model: object) -> bool:
    """Whether a torch module takes ``forward(idx, past, use_cache)`` (models/gpt.py, llama.py)."""
    forward = getattr(model, "forward", None)
    return forward is not None and "use_cache" in inspect.signature(forward).parameters


class CachedTorchDecoder:
    """Next-token logits from a PyTorch model with a KV cache: prefill once, then one token a step.

    When the context would outgrow the window, the step re-prefills the last ``context`` tokens:
    learned positions (gpt) must restart at 0 for the cropped window, as the cache-free path feeds
    it, and RoPE (llama) is re-prefilled the same way so that both paths compute the same numbers.
    """

    def __init__(self, model, context: int, device: str, precision: str, vocab: int):
        self.model, self.context, self.device, self.precision, self.vocab = model, context, device, precision, vocab
        self.tokens: list[int] = []
        self.past = None
        self.cache_bytes = 0  # the largest the cache has been
        self.prefills = 0

    def start(self, prompt: list[int]) -> np.ndarray:
        self.tokens = list(prompt)
        return self.run(self.tokens[-self.context:], past=None)

    def step(self, token: int) -> np.ndarray:
        self.tokens.append(token)
        if len(self.tokens) > self.context:  # the window slides: positions restart, re-prefill
            return self.run(self.tokens[-self.context:], past=None)
        return self.run([token], past=self.past)

    def run(self, ids: list[int], past) -> np.ndarray:
        """Feed ``ids`` after ``past``; keep the new cache; the last position's logits."""
        import torch

        from .core.hardware import autocast

        if past is None:
            self.prefills += 1
        with torch.inference_mode(), autocast(self.device, self.precision):
            batch = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits, self.past = self.model(batch, past=past, use_cache=True)
            last = logits[0, -1, :self.vocab].float().cpu().numpy()
        self.cache_bytes = max(self.cache_bytes, sum(k.nbytes + v.nbytes for k, v in self.past))
        return last


def decode_stream(decoder, prompt: list[int], cfg: GenerateConfig, clock: dict | None = None) -> Iterator[int]:
    """Yield up to ``cfg.max_new_tokens`` sampled tokens, each as soon as it is known.

    ``clock`` (if given) receives the prefill's seconds and when the first token was ready.
    """
    rng = np.random.default_rng(cfg.seed)
    seen = np.asarray(prompt, dtype=np.int64)
    start = time.perf_counter()
    logits = decoder.start(prompt)
    if clock is not None:
        clock["prefill_s"] = time.perf_counter() - start
    for i in range(cfg.max_new_tokens):
        token = sample_next(logits, cfg.temperature, cfg.top_k, rng, cfg.top_p, cfg.repetition_penalty, seen)
        if cfg.repetition_penalty != 1:
            seen = np.append(seen, token)
        if clock is not None and i == 0:
            clock["first_token_s"] = time.perf_counter() - start
        yield token
        if i + 1 < cfg.max_new_tokens:
            logits = decoder.step(token)


def generate_tokens(predict: Callable[[np.ndarray], np.ndarray], prompt: list[int], cfg: GenerateConfig, context: int,
                    fixed_seq: int | None = None, progress: Callable[..., Any] | None = None) -> list[int]:
    """Append ``cfg.max_new_tokens`` tokens to ``prompt``, recomputing the context each time."""
    tokens = list(prompt)
    for i, token in enumerate(decode_stream(RecomputeDecoder(predict, context, fixed_seq), prompt, cfg)):
        tokens.append(token)
        if progress:
            progress("generate", done=i + 1, total=cfg.max_new_tokens)
    return tokens


class TextStream:
    """Generated tokens → the text that is safe to show so far, and where a stop string ends it.

    Text is held back while it may still change: a trailing incomplete UTF-8 character (decoded as
    U+FFFD) or a tail that could be the start of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        self.tokens: list[int] = []
        self.text = ""  # everything decoded, cut before a stop string
        self.shown = 0  # characters of it already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly safe text (possibly empty)."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        cuts = [self.text.find(s) for s in self.stop if s in self.text]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
            return self.flush()
        safe = len(self.text.rstrip("\ufffd"))
        held = 0
        for s in self.stop:  # the longest tail that could begin a stop string waits
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - n:safe] == s[:n]:
                    held = max(held, n)
                    break
        return self.take(safe - held)

    def flush(self) -> str:
        """Everything not yet handed out (the generation is over)."""
        return self.take(len(self.text))

    def take(self, end: int) -> str:
        if end <= self.shown:
            return ""
        chunk, self.shown = self.text[self.shown:end], end
        return chunk


def open_decoder(runner, cfg: GenerateConfig, context: int, fixed: int | None, vocab: int,
                 artifact: Artifact | None = None):
    """The cached decoder where the model has one and it is wanted (PyTorch's KV cache, or an
    export's decoder.onnx on ONNX Runtime); else recompute."""
    if runner.name == "torch" and cfg.use_cache and supports_cache(runner.model):
        return CachedTorchDecoder(runner.model, context, runner.device, runner.detail.get("precision", "fp32"), vocab)
    onnx_meta = (artifact.config.get("onnx") or {}) if artifact is not None else {}
    if runner.name == "onnx" and cfg.use_cache and "decoder" in onnx_meta:
        from .onnx.decoder import open_ort_decoder

        return open_ort_decoder(artifact.path, onnx_meta["decoder"], context, vocab, runner.device, runner.threads)

    def predict(batch: np.ndarray) -> np.ndarray:
        # Embedding rows past the tokenizer (a padded vocabulary) are ids no text decodes from.
        return runner.predict(batch)[..., :vocab]

    return RecomputeDecoder(predict, context, fixed)


def generate_text(artifact: Artifact, cfg: GenerateConfig, progress: Callable[..., Any] | None = None,
                  on_text: Callable[[str], None] | None = None, runner=None) -> dict:
    """Prompt → continuation, plus where it ran and how fast.

    ``on_text`` receives the text as it becomes safe to show (streaming). A Ctrl-C stops the
    generation and returns what was made so far, with ``interrupted`` set. ``runner`` is a backend
    already opened for ``artifact`` (chat reuses one for every turn rather than reload the weights).
    """
    from .backends import open_backend

    validate(cfg)
    if artifact.task != "language-modeling":
        raise UserError(f"{artifact.path}: is a classifier; use bigmodel predict {artifact.path} INPUT")
    tokenizer = artifact.tokenizer()  # the artifact's tokenizer.json, or bytes
    vocab = artifact.model_spec.get("vocab_size") or artifact.data_spec.get("vocab_size")
    if tokenizer.is_byte_level and vocab != BYTE_VOCAB:
        raise UserError(f"{artifact.path}: has a vocabulary of {vocab} but no tokenizer; generate needs a byte-level "
                        "model (trained on --data text:...) or one that carries its tokenizer (train --tokenizer DIR)")
    runner = runner or open_backend(artifact, cfg.backend, cfg.device, cfg.threads)
    context, fixed = context_limits(artifact, runner.detail)
    prompt = tokenizer.encode(cfg.prompt) if cfg.add_special_tokens else tokenizer.encode_plain(cfg.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no tokens; give some text")
    if not cfg.truncate and len(prompt) + cfg.max_new_tokens > context:
        raise UserError(f"the prompt ({len(prompt)} tokens) and --max-new-tokens {cfg.max_new_tokens} exceed the "
                        f"model's window of {context} tokens; shorten the prompt, lower --max-new-tokens, or drop "
                        "--no-truncate to let the oldest tokens slide out")
    decoder = open_decoder(runner, cfg, context, fixed, tokenizer.vocab_size, artifact)
    stream = TextStream(tokenizer.decode, tuple(cfg.stop))
    clock: dict = {}
    interrupted = False
    start = time.perf_counter()
    try:
        for i, token in enumerate(decode_stream(decoder, prompt, cfg, clock)):
            chunk = stream.push(token)
            if on_text and chunk:
                on_text(chunk)
            if progress:
                progress("generate", done=i + 1, total=cfg.max_new_tokens)
            if stream.stopped:
                break
    except KeyboardInterrupt:  # Ctrl-C ends the answer; what was generated is still the result
        interrupted = True
    seconds = time.perf_counter() - start
    rest = stream.flush()
    if on_text and rest:
        on_text(rest)
    return {
        "artifact": str(artifact.path), "prompt": cfg.prompt,
        "text": stream.text, "tokens": stream.tokens,
        "new_tokens": len(stream.tokens), "seconds": seconds,
        "tokens_per_s": len(stream.tokens) / seconds if seconds else None,
        **decode_timing(clock, len(prompt), len(stream.tokens), seconds),
        "cache": not isinstance(decoder, RecomputeDecoder), "cache_bytes": decoder.cache_bytes,
        "stopped": stream.stopped, "interrupted": interrupted,
        "context": context, "prompt_cropped": len(prompt) > context,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
        "repetition_penalty": cfg.repetition_penalty, "seed": cfg.seed, "truncate": cfg.truncate,
        "backend": runner.name, "device": runner.device, "threads": runner.threads,
        **({"provider": runner.detail["provider"]} if "provider" in runner.detail else {}),
    }


def decode_timing(clock: dict, prompt_tokens: int, new_tokens: int, seconds: float) -> dict:
    """Prefill tokens/s (the prompt), time to first token, decode tokens/s (the tokens after it)."""
    prefill, first = clock.get("prefill_s"), clock.get("first_token_s")
    decode_s = seconds - first if first is not None else None
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill if prefill else None,
        "time_to_first_token_s": first,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s if decode_s and new_tokens > 1 else None,
    }
