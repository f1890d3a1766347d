"""``generate --prompts-file``: several prompts from one JSON Lines file.

One object per line, ``{"prompt": "..."}`` and optionally ``"seed": N``: JSON rather than plain
lines so that a prompt may hold newlines (code, dialogue) and a row may carry its own seed. The
file is read like every file a user names (input_file.read_capped: a regular file, size-capped).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import seed_problem
from ..errors import UserError
from ..input_file import read_capped
from .generate import BatchPrompt

MAX_PROMPTS_FILE_BYTES = 16 * 1024 * 1024  # far more text than any batch of prompts; read no more
FIX = "give --prompts-file a JSON Lines file (split a bigger one into several files)"


def read_prompts_file(path: Path | str) -> list[BatchPrompt]:
    """``--prompts-file``: JSON Lines, one object per line, ``{"prompt": "..."}`` and optionally
    ``"seed": N``. JSON rather than plain lines so that a prompt may hold newlines (code, dialogue)
    and a row may carry its own seed. Refused in one line: a file over MAX_PROMPTS_FILE_BYTES (before
    reading it), not UTF-8, no prompt, an empty line, a line that is not such an object."""
    path = Path(path)
    try:
        data = read_capped(path, MAX_PROMPTS_FILE_BYTES, FIX)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; give --prompts-file an existing file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: is not UTF-8 text (byte {exc.start}); --prompts-file takes JSON Lines, "
                        '{"prompt": "..."} on each line') from None
    # Lines end at "\n" only: str.splitlines would also split at U+2028, U+0085 …, which JSON
    # writers leave unescaped inside strings.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():  # a file may end with a blank line
        lines.pop()
    if not lines:
        raise UserError(f'{path}: holds no prompt; write one JSON object per line, {{"prompt": "..."}}')
    return [prompt_line(line, f"{path}, line {number}") for number, line in enumerate(lines, 1)]


def prompt_line(line: str, where: str) -> BatchPrompt:
    """One line of a prompts file → its prompt, or one line saying what is wrong with it."""
    shape = '{"prompt": "text"} (optionally with "seed": N)'
    if not line.strip():
        raise UserError(f"{where}: is empty; every line must be {shape} — remove the blank line")
    try:
        entry = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{where}: is not JSON ({exc.msg}); every line must be {shape}") from None
    except RecursionError:  # json recurses per nesting level
        raise UserError(f"{where}: is nested too deeply to read; every line must be {shape}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise UserError(f"{where}: has no \"prompt\" string; every line must be {shape}")
    unknown = sorted(set(entry) - {"prompt", "seed"})
    if unknown:
        raise UserError(f"{where}: has unknown key {unknown[0]!r}; a line may hold only \"prompt\" and \"seed\"")
    if not entry["prompt"]:
        raise UserError(f"{where}: has an empty prompt; the model needs at least one token to continue")
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed_problem(seed)):
        raise UserError(f"{where}: \"seed\" must be an integer from 0 to 2**32 - 1, got {json.dumps(seed)}")
    return BatchPrompt(entry["prompt"], seed, where)
