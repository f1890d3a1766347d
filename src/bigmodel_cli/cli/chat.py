"""bigmodel chat: a conversation with an instruct model through its chat template (engine.chat).

On a terminal it reads each message at a ``>`` prompt on stderr and streams the answer to stdout.
When stdin is not a terminal, every line of it is one user message (scripts, tests), answers go
to stdout one after another, and a message that cannot be answered ends the session with exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import console
from .options import ArtifactArg, BackendOpt, RepetitionPenaltyOpt, TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt

EXIT_WORDS = ("/exit", "/quit")


def chat(
    artifact: ArtifactArg,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt: kept at the start of the "
                                                  "conversation however long it gets.")] = None,
    template: Annotated[Optional[Path], typer.Option("--template", help="A Jinja chat template file to use instead "
                                                     "of the artifact's own (or for an artifact without one).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens in one answer.")] = 200,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed (turn i uses seed + i): the same seed and "
                                      "messages give the same answers.")] = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole context for every token.")] = False,
    backend: BackendOpt = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Answer without streaming and print the whole transcript "
                                           "as one JSON object at the end.")] = False,
) -> None:
    """Chat with a language model that has a chat template (an imported instruct model). Each message
    is answered with the whole conversation so far; the oldest turns are dropped when it outgrows
    the model's window. Ctrl-C stops the answer being written, not the session; Ctrl-C at the
    prompt, end of input (Ctrl-D) or /exit ends the session (exit 0). When stdin is not a terminal,
    each line is one message."""
    from ..artifact import open_artifact
    from ..engine.chat import ChatOptions, ChatSession
    from ..engine.generate import GenerateConfig

    cfg = GenerateConfig(prompt="", max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, use_cache=not no_cache, seed=seed, backend=backend,
                         device=device, threads=threads)
    session = ChatSession(open_artifact(artifact), ChatOptions(generate=cfg, system=system, template_file=template))
    try:
        converse(session, stdin_is_terminal(), json_out)
    finally:  # a script's message that cannot be answered (exit 2) keeps the turns answered before it
        if json_out:
            console.print_json(session.transcript())


def converse(session, interactive: bool, json_out: bool) -> None:
    """Answer every message read until the session ends; notes and errors on stderr."""
    if interactive:
        console.note(f"chatting with {session.artifact.path} (window {session.context:,} tokens); Ctrl-C stops an "
                     "answer, Ctrl-C at the prompt, Ctrl-D or /exit ends the session")
    told_dropped = False
    for message in read_messages(interactive):
        try:
            turn = session.ask(message, on_text=None if json_out else write_text)
        except UserError as exc:  # on a terminal one message's mistake does not end the conversation
            if not interactive:
                raise
            console.error(str(exc))
            continue
        except KeyboardInterrupt:  # before the answer began (the prompt being prepared): that message only
            console.note("stopped before the answer began")
            continue
        if not json_out:
            write_text("\n")
        if turn["dropped_turns"] and not told_dropped:  # once: every later turn would repeat it
            console.warn(f"the conversation outgrew the model's window of {session.context:,} tokens: its oldest "
                         "turns are dropped from what the model sees (the system prompt stays)")
            told_dropped = True
        if turn["interrupted"]:
            console.note(f"answer stopped after {turn['new_tokens']} tokens")


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def read_messages(interactive: bool):
    """The user's messages until EOF, /exit, or (on a terminal) Ctrl-C at the prompt; blank lines
    are skipped."""
    while True:
        try:
            if interactive:
                line = read_typed_line("> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    return
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C while no answer is being written
            if interactive:
                sys.stderr.write("\n")
            return
        line = line.rstrip("\r\n")
        if line.strip() in EXIT_WORDS:
            return
        if line.strip():
            yield line


def read_typed_line(prompt: str) -> str:
    """A line typed at the terminal, with line editing (readline) where Python has it. The prompt
    goes where input() puts it (stdout) only when stdout is the terminal too, else to stderr, so
    that a redirected stdout holds the answers alone."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:
        pass
    if sys.stdout.isatty():
        return input(prompt)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def write_text(chunk: str) -> None:
    """Plain writes, not rich: generated text must not be read as markup."""
    sys.stdout.write(chunk)
    sys.stdout.flush()
