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

Several prompts (``--prompts-file``, ``generate_batch``) are decoded together, ``batch_size`` at a
time. The cached decoders LEFT-pad them with an attention mask and per-row positions
(``onnx/decoder.PaddedCacheDecoder``), so every row's next token is in the same column; the
recomputing decoder RIGHT-pads instead and reads each row at its own last token, which causal
attention makes exact without a mask (and the cache-free model.onnx has no mask input). Each row
samples from its own generator, seeded as that prompt alone would be, and ends at a stop string
or the tokenizer's end-of-text token while the others go on: a row's text is the one that prompt
gives alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ..artifact import Artifact
from ..config import is_finite_number, seed_problem, threads_problem
from ..errors import ConfigErrors, UserError
from .decoders import RecomputeDecoder, context_limits, open_decoder

BYTE_VOCAB = 256
MAX_BATCH_SIZE = 256  # rows decoded together: the cache grows with it (batch × window × layers)


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
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 8  # prompts decoded together by generate_batch
    add_special_tokens: bool = True  # False: the prompt holds its own BOS (a rendered chat template)


def validate(cfg: GenerateConfig) -> None:
    problems = [] if cfg.prompt else ["--prompt must not be empty (the model needs at least one byte to continue)"]
    problems += option_problems(cfg)
    if problems:
        raise ConfigErrors(problems, "generation options")


def option_problems(cfg: GenerateConfig) -> list[str]:
    """Every problem with the decoding options (not the prompt)."""
    problems = []
    if not 1 <= cfg.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {cfg.batch_size}")
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
    return problems


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


@dataclass
class BatchPrompt:
    """One prompt of a batch: its text, its own sampling seed (None: --seed), and where it came
    from (for messages)."""
    text: str
    seed: int | None = None
    where: str = "the prompt"


@dataclass
class Decoding:
    """What a generation runs with: the tokenizer, the backend, its window, the vocabulary."""
    artifact: Artifact
    tokenizer: Any
    runner: Any
    context: int
    fixed: int | None
    vocab: int

    def encode(self, prompt: BatchPrompt, cfg: GenerateConfig) -> list[int]:
        """The prompt's tokens, or one line: none at all, or too long for --no-truncate."""
        ids = (self.tokenizer.encode(prompt.text) if cfg.add_special_tokens
               else self.tokenizer.encode_plain(prompt.text))
        if not ids:
            raise UserError(f"{prompt.where} encodes to no tokens; give some text")
        if not cfg.truncate and len(ids) + cfg.max_new_tokens > self.context:
            raise UserError(f"{prompt.where} ({len(ids)} tokens) and --max-new-tokens {cfg.max_new_tokens} exceed "
                            f"the model's window of {self.context} tokens; shorten the prompt, lower "
                            "--max-new-tokens, or drop --no-truncate to let the oldest tokens slide out")
        return ids

    def decoder(self, cfg: GenerateConfig):
        return open_decoder(self.runner, cfg.use_cache, self.context, self.fixed, self.tokenizer.vocab_size, self.artifact)


def open_decoding(artifact: Artifact, cfg: GenerateConfig, runner=None) -> Decoding:
    from .backends import open_backend

    if artifact.task != "language-modeling":
        raise UserError(f"{artifact.path}: is a classifier; use bigmodel predict {artifact.path} INPUT")
    tokenizer = artifact.tokenizer()  # the artifact's tokenizer.json, or bytes
    vocab = artifact.model_spec.get("vocab_size") or artifact.data_spec.get("vocab_size")
    if tokenizer.is_byte_level and vocab != BYTE_VOCAB:
        raise UserError(f"{artifact.path}: has a vocabulary of {vocab} but no tokenizer; generate needs a byte-level "
                        "model (trained on --data text:...) or one that carries its tokenizer (train --tokenizer DIR)")
    runner = runner or open_backend(artifact, cfg.backend, cfg.device, cfg.threads)
    context, fixed = context_limits(artifact, runner.detail)
    return Decoding(artifact, tokenizer, runner, context, fixed, vocab)


def decode_rows(decoder, tokenizer, prompts: list[list[int]], seeds: list[int], cfg: GenerateConfig,
                on_text: Callable[[int, str], None] | None = None,
                on_done: Callable[[int, dict], None] | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[list[dict], bool]:
    """Decode ``prompts`` together; (one dict per row, interrupted).

    Each row samples from its own generator (``seeds``) and ends at a stop string or the end-of-text
    token; a finished row is fed token 0 until the others end (its outputs are not read), so the
    batch keeps one shape and one cache. ``on_text(row, chunk)`` receives a row's text as it becomes
    safe to show, ``on_done(row, result)`` a row's result as soon as it ends, ``progress(step)``
    each step. A Ctrl-C stops every row and keeps what was made.
    """
    count = len(prompts)
    streams = [TextStream(tokenizer.decode, tuple(cfg.stop)) for _ in range(count)]
    rngs = [np.random.default_rng(seed) for seed in seeds]
    seen = [np.asarray(prompt, dtype=np.int64) for prompt in prompts]
    eos = getattr(tokenizer, "eos_id", None)
    results: list[dict | None] = [None] * count
    clock: dict = {}
    start = time.perf_counter()

    def finish(row: int, reason: str) -> None:
        rest = streams[row].flush()
        if on_text and rest:
            on_text(row, rest)
        seconds, stream = time.perf_counter() - start, streams[row]
        results[row] = {
            "text": stream.text, "tokens": stream.tokens, "new_tokens": len(stream.tokens), "seconds": seconds,
            "tokens_per_s": len(stream.tokens) / seconds if seconds else None,
            **decode_timing(clock, len(prompts[row]), len(stream.tokens), seconds),
            "stopped": reason == "stop", "finish_reason": reason, "interrupted": reason == "interrupted",
        }
        if on_done:
            on_done(row, results[row])

    interrupted = False
    try:
        logits = decoder.start_batch(prompts)
        clock["prefill_s"] = time.perf_counter() - start
        for i in range(cfg.max_new_tokens):
            tokens = [0] * count
            for row in (r for r in range(count) if results[r] is None):
                token = sample_next(logits[row], cfg.temperature, cfg.top_k, rngs[row], cfg.top_p,
                                    cfg.repetition_penalty, seen[row])
                tokens[row] = token
                if cfg.repetition_penalty != 1:
                    seen[row] = np.append(seen[row], token)
                if token == eos:  # the model's own end: the token is not text
                    finish(row, "eos")
                    continue
                chunk = streams[row].push(token)
                if on_text and chunk:
                    on_text(row, chunk)
                if streams[row].stopped:
                    finish(row, "stop")
            if i == 0:
                clock["first_token_s"] = time.perf_counter() - start
            if progress:
                progress(i + 1)
            if all(results):
                break
            if i + 1 < cfg.max_new_tokens:
                logits = decoder.step_batch(tokens)
    except KeyboardInterrupt:  # Ctrl-C ends the answer; what was generated is still the result
        interrupted = True
    for row in range(count):
        if results[row] is None:
            finish(row, "interrupted" if interrupted else "length")
    return results, interrupted


def run_facts(decoding: Decoding, decoder, cfg: GenerateConfig) -> dict:
    """What every result records of how it was made."""
    runner = decoding.runner
    return {
        "cache": not isinstance(decoder, RecomputeDecoder), "cache_bytes": decoder.cache_bytes,
        "context": decoding.context,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
        "repetition_penalty": cfg.repetition_penalty, "truncate": cfg.truncate,
        "backend": runner.name, "device": runner.device, "threads": runner.threads,
        **({"provider": runner.detail["provider"]} if "provider" in runner.detail else {}),
    }


def generate_text(artifact: Artifact, cfg: GenerateConfig, progress: Callable[..., Any] | None = None,
                  on_text: Callable[[str], None] | None = None, runner=None) -> dict:
    """Prompt → continuation, plus where it ran and how fast.

    ``on_text`` receives the text as it becomes safe to show (streaming). A Ctrl-C stops the
    generation and returns what was made so far, with ``interrupted`` set. ``runner`` is a backend
    already opened for ``artifact`` (chat reuses one for every turn rather than reload the weights).
    """
    validate(cfg)
    decoding = open_decoding(artifact, cfg, runner)
    prompt = decoding.encode(BatchPrompt(cfg.prompt, where="--prompt"), cfg)
    decoder = decoding.decoder(cfg)
    rows, _ = decode_rows(decoder, decoding.tokenizer, [prompt], [cfg.seed], cfg,
                          on_text=(lambda row, chunk: on_text(chunk)) if on_text else None,
                          progress=(lambda done: progress("generate", done=done, total=cfg.max_new_tokens))
                          if progress else None)
    return {"artifact": str(artifact.path), "prompt": cfg.prompt, **rows[0], **run_facts(decoding, decoder, cfg),
            "prompt_cropped": len(prompt) > decoding.context, "seed": cfg.seed}


def generate_batch(artifact: Artifact, cfg: GenerateConfig, prompts: list[BatchPrompt],
                   progress: Callable[..., Any] | None = None,
                   on_done: Callable[[int, dict], None] | None = None) -> dict:
    """Several prompts, ``cfg.batch_size`` decoded together (``cfg.prompt`` is not used).

    Returns ``results`` (one dict per prompt, in order, each as ``generate_text`` gives it plus the
    batch it ran in) and the whole run's figures: new tokens over wall time is the batch
    throughput. ``on_done(index, result)`` receives each prompt's result as soon as its row ends.
    Every prompt is encoded and checked before any decoding. A Ctrl-C stops the batch running; the
    prompts decoded so far (the running batch's cut short) are the result, with ``interrupted``.
    """
    problems = option_problems(cfg)
    if problems:
        raise ConfigErrors(problems, "generation options")
    if not prompts:
        raise UserError("no prompts to generate from; give --prompt or a --prompts-file with one per line")
    decoding = open_decoding(artifact, cfg)
    encoded = [decoding.encode(prompt, cfg) for prompt in prompts]
    decoder = decoding.decoder(cfg)
    seeds = [cfg.seed if prompt.seed is None else prompt.seed for prompt in prompts]
    chunks = range(0, len(prompts), cfg.batch_size)
    total_steps = len(chunks) * cfg.max_new_tokens
    results: list[dict] = []
    interrupted = False
    start = time.perf_counter()
    for n, first in enumerate(chunks):
        batch = list(range(first, min(first + cfg.batch_size, len(prompts))))

        def head(index: int) -> dict:
            return {"index": index, "prompt": prompts[index].text, "seed": seeds[index],
                    "prompt_cropped": len(encoded[index]) > decoding.context}

        def done(row: int, figures: dict, batch=batch) -> None:
            if on_done:
                on_done(batch[row], {**head(batch[row]), **figures})

        def step(done_steps: int, n=n) -> None:
            progress("generate", done=n * cfg.max_new_tokens + done_steps, total=total_steps)

        chunk_start = time.perf_counter()
        rows, interrupted = decode_rows(decoder, decoding.tokenizer, [encoded[i] for i in batch],
                                        [seeds[i] for i in batch], cfg, on_done=done,
                                        progress=step if progress else None)
        seconds = time.perf_counter() - chunk_start
        batch_tokens = sum(row["new_tokens"] for row in rows)
        results += [{**head(index), **row, "batch_size": len(batch),
                     "batch_tokens_per_s": batch_tokens / seconds if seconds else None,
                     **run_facts(decoding, decoder, cfg)} for index, row in zip(batch, rows)]
        if interrupted:
            break
    seconds = time.perf_counter() - start
    new_tokens = sum(result["new_tokens"] for result in results)
    return {"artifact": str(artifact.path), "results": results, "prompts": len(prompts), "batch_size": cfg.batch_size,
            "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds else None,
            "interrupted": interrupted, **run_facts(decoding, decoder, cfg)}


def decode_timing(clock: dict, prompt_tokens: int, new_tokens: int, seconds: float) -> dict:
    """Prefill tokens/s (the prompt), time to first token, decode tokens/s (the tokens after it)."""
    prefill, first = clock.get("prefill_s"), clock.get("first_token_s")
    decode_s = seconds - first if first is not None else None
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill if prefill else None,
        "time_to_first_token_s": first,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s if decode_s and new_tokens > 1 else None,
    }
