"""``bigmodel chat``: a conversation with a language model through its chat template.

The template is the one ``bigmodel import`` stored from the checkpoint's tokenizer (config.json's
``tokenizer.chat_template``), or a Jinja file given with ``--template``. It is rendered the way
``transformers``' ``apply_chat_template`` renders it (jinja2's ``ImmutableSandboxedEnvironment``,
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension and the ``generation`` tag, ``raise_exception``, ``tojson``,
``strftime_now``; ``messages``, ``add_generation_prompt``, the special tokens), so the model sees
the text it was tuned on. Templates come with downloaded checkpoints and are untrusted code: the
sandbox refuses attribute tricks, and ``ChatSandbox`` also bounds what a render may build and
how long it may run, so a hostile template cannot eat the machine's memory or hang the session.

Every turn re-renders the whole conversation (system prompt, the turns kept so far, the new user
message, the generation prompt) and generates from it with ``engine/generate.py``; the answer
stops at the tokenizer's EOS token or the template's end-of-turn string. When the conversation
outgrows the model's window, the oldest turns are dropped (the system prompt stays).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from ..artifact import Artifact
from ..errors import UserError
from ..input_file import read_capped
from .decoders import context_limits
from .generate import GenerateConfig, generate_text, validate

# Chat templates are a few KB (the longest on the Hub, with tool calling, are ~20 KB).
MAX_TEMPLATE_BYTES = 1 << 20
# A rendered prompt must fit the model's window; a million characters is beyond any window we run,
# and stops a template that loops to build an endless prompt.
MAX_RENDER_CHARS = 1 << 20
# A real template renders in milliseconds; one that loops for longer is refused.
RENDER_SECONDS = 5.0
# What a render may allocate beyond what the process holds: a prompt is at most MAX_RENDER_CHARS
# characters (4 bytes each), plus jinja's own objects.
RENDER_MEMORY_BYTES = 256 << 20
# `a ** b` with a larger exponent than this could take minutes (big integers) in one operation.
MAX_EXPONENT = 1024
END_OF_TURN_PROBE = "\u2063bigmodel-end-of-turn-probe\u2063"  # text no template adds by itself
TEMPLATE_FIX = "fix the template (or give another with --template FILE)"


class TemplateTimeout(Exception):
    """A render ran past RENDER_SECONDS."""


def _too_big(value) -> bool:
    try:
        return len(value) > MAX_RENDER_CHARS
    except TypeError:
        return False


def make_sandbox():
    """A jinja2 sandbox that also bounds what ``*``, ``**`` and ``+`` may build, and has the globals
    and filters transformers gives chat templates."""
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class ChatSandbox(ImmutableSandboxedEnvironment):
        # The sandbox bounds range() but not `'x' * 10**9` or `10 ** 10**9`: check them before computing.
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"an exponent of {right} (the sandbox allows up to {MAX_EXPONENT})")
            if operator == "*":
                count, sized = (right, left) if isinstance(right, int) else (left, right)
                if isinstance(count, int) and hasattr(sized, "__len__") and len(sized) * count > MAX_RENDER_CHARS:
                    raise SecurityError(f"a repetition of more than {MAX_RENDER_CHARS:,} items")
            result = super().call_binop(context, operator, left, right)
            if operator == "+" and _too_big(result):
                raise SecurityError(f"a value of more than {MAX_RENDER_CHARS:,} items")
            return result

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks the assistant's text for transformers'
        # training masks; rendering a prompt keeps the body as it is, as transformers does.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: jinja's own tojson escapes HTML characters, which a prompt must keep
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TemplateTimeout in the block after ``seconds`` (SIGALRM: only the main thread can take
    it, so elsewhere the block runs unbounded, as the output cap still holds)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def memory_limit(headroom: int) -> Iterator[None]:
    """Let the block allocate at most ``headroom`` more bytes of address space (RLIMIT_AS, soft
    limit, restored after): a template that builds a giant string gets MemoryError, not the
    machine's memory. Only the render runs meanwhile (the backend's threads are idle between
    answers). Without /proc (not Linux) the block runs unbounded, as the other caps still hold."""
    try:
        import resource

        with open("/proc/self/statm") as handle:
            in_use = int(handle.read().split()[0]) * resource.getpagesize()
    except (ImportError, OSError, ValueError, IndexError):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = in_use + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, where: str, special_tokens: dict[str, str], origin: str):
        import jinja2

        self.where, self.special_tokens = where, special_tokens
        self.origin = origin  # for the transcript: "artifact" or the --template file
        try:
            self.template = make_sandbox().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(f"{where}: the chat template has a syntax error on line {exc.lineno} ({exc.message}); "
                            f"{TEMPLATE_FIX}") from None
        except Exception as exc:  # anything else jinja's compiler rejects (e.g. an unknown extension tag)
            raise UserError(f"{where}: the chat template does not compile ({type(exc).__name__}: {exc}); "
                            f"{TEMPLATE_FIX}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text, as transformers' apply_chat_template(..., tokenize=False) gives it."""
        from jinja2.sandbox import SecurityError
        from jinja2 import TemplateError

        context = {**self.special_tokens, "messages": [dict(m) for m in messages], "tools": None,
                   "documents": None, "add_generation_prompt": add_generation_prompt}
        pieces, size = [], 0
        try:
            with time_limit(RENDER_SECONDS), memory_limit(RENDER_MEMORY_BYTES):
                for piece in self.template.generate(**context):
                    size += len(piece)
                    if size > MAX_RENDER_CHARS:
                        raise SecurityError(f"a prompt of more than {MAX_RENDER_CHARS:,} characters")
                    pieces.append(piece)
        except SecurityError as exc:
            raise UserError(f"{self.where}: the chat template was stopped by the sandbox ({exc}); it is not safe to "
                            f"run; {TEMPLATE_FIX}") from None
        except TemplateTimeout:
            raise UserError(f"{self.where}: the chat template ran for more than {RENDER_SECONDS:g} s without finishing; "
                            f"{TEMPLATE_FIX}") from None
        except TemplateError as exc:
            if type(exc) is TemplateError:  # what raise_exception(...) raises: the template's own verdict
                raise UserError(f"{self.where}: the chat template refused the conversation ({exc}); "
                                f"{TEMPLATE_FIX}") from None
            raise UserError(f"{self.where}: the chat template failed to render ({type(exc).__name__}: {exc}); "
                            f"{TEMPLATE_FIX}") from None
        except MemoryError:
            raise UserError(f"{self.where}: the chat template tried to use more than {RENDER_MEMORY_BYTES >> 20:,} MiB "
                            f"of memory; {TEMPLATE_FIX}") from None
        except RecursionError:
            raise UserError(f"{self.where}: the chat template recursed without end; {TEMPLATE_FIX}") from None
        except Exception as exc:  # the template's own mistakes: a bad operand, a missing key
            raise UserError(f"{self.where}: the chat template failed to render ({type(exc).__name__}: {exc}); "
                            f"{TEMPLATE_FIX}") from None
        return "".join(pieces)

    def end_of_turn(self, before: list[dict]) -> str | None:
        """What the template writes after an assistant message (ChatML's ``<|im_end|>``, Llama 3's
        ``<|eot_id|>``), found by rendering a probe answer; None when it writes nothing there."""
        messages = [*before, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
        try:
            text = self.render(messages, add_generation_prompt=False)
        except UserError:  # a template that rejects the probe: the EOS token alone ends answers
            return None
        if text.count(END_OF_TURN_PROBE) != 1:
            return None
        return text.split(END_OF_TURN_PROBE)[1].strip() or None


def read_template_file(path: Path) -> str:
    """A --template file: a regular file of at most MAX_TEMPLATE_BYTES, UTF-8 text."""
    fix = "give --template a Jinja chat template file"
    try:
        data = read_capped(path, MAX_TEMPLATE_BYTES, fix)
    except FileNotFoundError:
        raise UserError(f"--template {path}: no such file; {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--template {path}: is not UTF-8 text; {fix}") from None


def load_template(artifact: Artifact, template_file: Path | None) -> ChatTemplate:
    """--template FILE if given, else the artifact's own chat template; the special tokens come
    from the artifact's tokenizer section either way."""
    section = artifact.config.get("tokenizer") or {}
    special = {key: section[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
               if isinstance(section.get(key), str)}  # an absent token stays undefined, as in transformers
    if template_file is not None:
        return ChatTemplate(read_template_file(template_file), f"--template {template_file}", special,
                            str(template_file))
    source = section.get("chat_template")
    if not source:
        raise UserError(f"{artifact.path}: has no chat template (only imported instruct models carry one); use "
                        f"bigmodel generate {artifact.path} --prompt TEXT, or give a template with --template FILE")
    return ChatTemplate(source, f"{artifact.path}", special, "artifact")


@dataclass
class ChatOptions:
    generate: GenerateConfig  # sampling, backend, device, threads; its prompt is set per turn
    system: str | None = None
    template_file: Path | None = None


def check_chat_request(artifact: Artifact, options: ChatOptions) -> None:
    """Problems with the options or the artifact that need no template or model to see."""
    validate(replace(options.generate, prompt="-"))  # every sampling problem now, before the first turn
    if artifact.task != "language-modeling":
        raise UserError(f"{artifact.path}: is a classifier, not a language model; chat needs a language model "
                        f"(use bigmodel predict {artifact.path} INPUT)")
    if options.system is not None and not options.system.strip():
        raise UserError("--system must not be empty; give the system prompt's text, or leave the option out")


class ChatSession:
    """One conversation: the messages kept for the model, the transcript of every turn, and the
    backend opened once for all turns."""

    def __init__(self, artifact: Artifact, options: ChatOptions):
        from .backends import open_backend

        check_chat_request(artifact, options)
        self.artifact, self.options, self.base = artifact, options, options.generate
        self.template = load_template(artifact, options.template_file)
        self.tokenizer = artifact.tokenizer()
        self.system = [{"role": "system", "content": options.system}] if options.system is not None else []
        self.template.render([*self.system, {"role": "user", "content": "Hi"}])  # a broken template fails now
        self.runner = open_backend(artifact, self.base.backend, self.base.device, self.base.threads)
        self.context = context_limits(artifact, self.runner.detail)[0]
        # Room kept for the answer: the prompt may take the rest of the window (the answer slides
        # the window beyond that, as generate does).
        self.budget = self.context - min(self.base.max_new_tokens, self.context // 2)
        eos = self.template.special_tokens.get("eos_token")
        end = self.template.end_of_turn(self.system)
        self.stops = tuple(dict.fromkeys(s for s in (eos, end, *self.base.stop) if s))
        self.history: list[dict] = []  # user and assistant messages the model still sees
        self.turns: list[dict] = []  # the transcript: every turn, including dropped ones

    def encode(self, prompt: str) -> list[int]:
        # The template writes BOS itself where the model wants one, as apply_chat_template(tokenize=True)
        # assumes (it encodes with add_special_tokens=False).
        return self.tokenizer.encode_plain(prompt)

    def fit(self, user: dict) -> tuple[str, int, int]:
        """The prompt for ``user`` after the kept history, dropping the oldest turns until it fits:
        (prompt, its tokens, turns dropped). A turn that does not fit alone is refused, and then
        the history is left as it was."""
        history, dropped = self.history, 0
        while True:
            prompt = self.template.render([*self.system, *history, user])
            tokens = len(self.encode(prompt))
            if not tokens:
                raise UserError(f"{self.template.where}: the chat template rendered no text for this conversation; "
                                f"{TEMPLATE_FIX}")
            if tokens <= self.budget:
                self.history = history
                return prompt, tokens, dropped
            if not history:
                raise UserError(f"this message is {tokens:,} tokens with the chat template"
                                f"{' and the system prompt' if self.system else ''}, more than the "
                                f"{self.budget:,} the model's window of {self.context:,} leaves beside the answer "
                                f"(--max-new-tokens {self.base.max_new_tokens}); shorten it")
            history = self.drop_oldest_turn(history)
            dropped += 1

    @staticmethod
    def drop_oldest_turn(history: list[dict]) -> list[dict]:
        """History without its first user message and the answers up to the next user message."""
        rest = history[1:]
        while rest and rest[0]["role"] != "user":
            rest = rest[1:]
        return rest

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> dict:
        """One turn: ``text`` from the user, the answer streamed to ``on_text``. A Ctrl-C (or a
        KeyboardInterrupt from ``on_text``) ends the answer, which is kept as far as it got."""
        user = {"role": "user", "content": text}
        prompt, prompt_tokens, dropped = self.fit(user)
        cfg = replace(self.base, prompt=prompt, stop=self.stops, add_special_tokens=False,
                      seed=self.base.seed + len(self.turns))  # each turn its own draws, reproducibly
        result = generate_text(self.artifact, cfg, on_text=on_text, runner=self.runner)
        self.history += [user, {"role": "assistant", "content": result["text"]}]
        turn = {"user": text, "assistant": result["text"], "prompt_tokens": prompt_tokens,
                "new_tokens": result["new_tokens"], "stopped": result["stopped"],
                "interrupted": result["interrupted"], "dropped_turns": dropped, "seconds": result["seconds"],
                "decode_tokens_per_s": result["decode_tokens_per_s"]}
        self.turns.append(turn)
        return turn

    def transcript(self) -> dict:
        """The whole session as one JSON-able object (``--json``)."""
        base = self.base
        return {
            "artifact": str(self.artifact.path), "template": self.template.origin, "system": self.options.system,
            "turns": self.turns, "context": self.context, "stops": list(self.stops),
            "max_new_tokens": base.max_new_tokens, "temperature": base.temperature, "top_k": base.top_k,
            "top_p": base.top_p, "repetition_penalty": base.repetition_penalty, "seed": base.seed,
            "backend": self.runner.name, "device": self.runner.device, "threads": self.runner.threads,
        }
