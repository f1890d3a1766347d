"""``bigmodel import``: a local Hugging Face checkpoint directory → a bigmodel artifact.

Reads ``config.json``, ``model.safetensors`` (or the shards ``model.safetensors.index.json``
lists), ``tokenizer.json`` and the small JSON files that name its special tokens. Nothing is
downloaded and nothing is unpickled: ``.bin``/``.pt`` checkpoints are refused before they are
opened. Every check (model type, names, shapes, tokenizer size, output) runs before anything is
written, and the artifact is written through ``atomic_directory``, so a refusal leaves nothing.
The manifest's ``source`` records the directory and the sha256 of every file read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ... import artifact as art
from ...data.tokenizer import MAX_TOKENIZER_BYTES, TOKENIZER_FILE, section_problems, tokenizer_section as describe_tokenizer
from ...errors import UserError
from .hf_config import SUPPORTED, to_spec
from .hf_weights import FLAG_DTYPES, plan_tensors, read_headers, write_streamed

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Small JSON files of a checkpoint: a few KB, the index of a sharded 70B model under 100 KB.
MAX_JSON_BYTES = 16 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# owner/name, as the Hub spells repository ids
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Our own language models train on windows of this many tokens by default (engine/training/job.py)
DEFAULT_WINDOW = 256


@dataclass
class ImportResult:
    path: Path
    model_type: str
    spec: dict
    tensors: int
    dtypes: list[str]
    tokenizer: dict | None
    notes: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


def check_source(source: Path | str) -> Path:
    """The checkpoint directory, or one line saying what to give instead."""
    path = Path(source)
    if not path.exists():
        if _HUB_ID.fullmatch(str(source)):
            raise UserError(f"{source}: no such directory; it looks like a Hugging Face Hub id, and bigmodel does not "
                            f"download: run `huggingface-cli download {source} --local-dir DIR`, then `bigmodel import DIR`")
        raise UserError(f"{source}: no such directory; give a local Hugging Face checkpoint directory")
    if not path.is_dir():
        raise UserError(f"{source}: is a file; give the checkpoint's directory (with config.json and model.safetensors)")
    return path


def read_json(path: Path, required: bool = True) -> dict | None:
    """A small JSON object file of the checkpoint; None when it is optional and absent."""
    try:
        data = json.loads(art.read_regular_file(path, MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        if not required:
            return None
        raise UserError(f"{path.parent}: no {path.name}; this is not a Hugging Face checkpoint directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: is not valid JSON ({type(exc).__name__}); the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a JSON object; the checkpoint is damaged")
    return data


def weight_files(src: Path) -> tuple[list[Path], dict | None]:
    """(the safetensors files, the index's weight_map when sharded). Pickle checkpoints are refused
    unopened."""
    if (src / SINGLE_FILE).exists():
        return [_regular(src / SINGLE_FILE)], None
    if (src / INDEX_FILE).exists():
        index = read_json(src / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{src / INDEX_FILE}: has no weight_map of tensor → file; the checkpoint is damaged")
        names = list(dict.fromkeys(weight_map.values()))
        bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if bad:  # a shard is a file beside the index, never a path elsewhere
            raise UserError(f"{src / INDEX_FILE}: lists {bad[0]!r}, which is not a .safetensors file in this directory")
        return [_regular(src / n) for n in names], weight_map
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{src}: holds only pickle weights ({', '.join(pickles[:2])}), which bigmodel never loads (unpickling "
                        "runs code); convert them where you trust the file: in Python, transformers' "
                        "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")
    raise UserError(f"{src}: no {SINGLE_FILE} or {INDEX_FILE}; give a Hugging Face checkpoint directory")


def _regular(path: Path) -> Path:
    """A file we will read, checked to be a regular file (a FIFO would hang, a device never end)."""
    try:
        handle = art.open_regular(path)
    except FileNotFoundError:
        raise UserError(f"{path}: is missing; the checkpoint is incomplete (download it again)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    if handle is None:
        raise UserError(f"{path}: is not a regular file")
    handle.close()
    return path


def check_index(weight_map: dict, tensors: dict, where: str) -> None:
    """The index and the shards' own headers must agree tensor for tensor."""
    for name, tensor in tensors.items():
        if weight_map.get(name) != tensor.file.name:
            raise UserError(f"{where}: tensor {name} is in {tensor.file.name} but {INDEX_FILE} says "
                            f"{weight_map.get(name)!r}; the checkpoint is damaged")
    absent = [name for name in weight_map if name not in tensors]
    if absent:
        raise UserError(f"{where}: {INDEX_FILE} lists {absent[0]} but no shard holds it; the checkpoint is incomplete")


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(src: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is None and (src / "chat_template.jinja").exists():  # transformers ≥ 4.43 saves it apart
        template = art.read_regular_file(src / "chat_template.jinja", MAX_JSON_BYTES).decode("utf-8", "replace")
    return template if isinstance(template, str) else None


def tokenizer_section(src: Path, spec: dict) -> tuple[dict | None, list[str], bytes]:
    """config.json's "tokenizer" section (the contract in docs/pretrained.md), the files read for
    it and tokenizer.json's bytes (read once: the copy is what was checked); (None, [], b"") when
    the checkpoint has no tokenizer.json."""
    if not (src / TOKENIZER_FILE).exists():
        return None, [], b""
    raw = art.read_regular_file(src / TOKENIZER_FILE, MAX_TOKENIZER_BYTES)
    tokenizer = _parse_tokenizer(src / TOKENIZER_FILE, raw, spec["vocab_size"])
    read = [TOKENIZER_FILE]
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        found = read_json(src / name, required=False)
        if found is not None:
            config.update(found)
            read.append(name)
    generation = read_json(src / "generation_config.json", required=False) or {}
    if generation:
        read.append("generation_config.json")
    if (src / "chat_template.jinja").exists():
        read.append("chat_template.jinja")
    section = describe_tokenizer(tokenizer, **_special_tokens(config, generation, tokenizer),
                                 add_bos_token=bool(config.get("add_bos_token", False)),
                                 chat_template=_chat_template(src, config))
    problems = section_problems(section)  # the same checks every artifact's section gets when it is opened
    if problems:
        raise UserError(f"{src}: its tokenizer's description does not hold ({'; '.join(problems)}); "
                        "fix tokenizer_config.json or the special tokens")
    return section, read, raw


def _parse_tokenizer(path: Path, raw: bytes, model_vocab: int):
    """The tokenizer in ``raw`` (tokenizer.json), checked to fit the model's embedding."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the tokenizers library raises its own exception type
        raise UserError(f"{path}: is not a tokenizer the tokenizers library reads ({exc}); the checkpoint is damaged") from None
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model_vocab:
        raise UserError(f"{path}: has {vocab:,} tokens but the model embeds only {model_vocab:,}; "
                        "the tokenizer and the weights do not belong together")
    return tokenizer


def _special_tokens(config: dict, generation: dict, tokenizer) -> dict:
    """bos/eos/pad/unk as strings: from the tokenizer's config, else from generation_config's ids."""
    tokens = {key: _token(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    for key in ("bos_token", "eos_token", "pad_token"):
        token_id = generation.get(f"{key}_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id  # several eos: the first
        if tokens[key] is None and isinstance(token_id, int) and not isinstance(token_id, bool):
            tokens[key] = tokenizer.id_to_token(token_id)
    return tokens


def data_section(spec: dict) -> dict:
    """A language model's data section: no training data came with it, so evaluation defaults to
    this Python's own source (``--data`` names another), in windows no longer than the context."""
    return {"name": "text", "path": "stdlib", "split": {"val": 0.05, "test": 0.05},
            "block_size": min(spec["block_size"], DEFAULT_WINDOW)}


def import_checkpoint(source: Path | str, out: Path | str, dtype: str | None = None, overwrite: bool = False,
                      progress: Callable[..., None] | None = None) -> ImportResult:
    """Convert a Hugging Face checkpoint directory into an artifact at ``out``."""
    if dtype is not None and dtype not in FLAG_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(FLAG_DTYPES)} (default: keep each tensor's dtype)")
    src = check_source(source)
    hf = read_json(src / "config.json")
    where = str(src)
    spec, notes = to_spec(hf, where)
    files, weight_map = weight_files(src)
    tensors = read_headers(files, where)
    if weight_map is not None:
        check_index(weight_map, tensors, where)
    planned = plan_tensors(hf["model_type"], tensors, spec, FLAG_DTYPES.get(dtype), where)
    tokenizer, tokenizer_files, tokenizer_bytes = tokenizer_section(src, spec)
    if tokenizer is None:
        notes.append(f"no {TOKENIZER_FILE} in {src}: the artifact has no tokenizer, so text is fed to it as bytes; "
                     "save the tokenizer with transformers (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) and import again")
    art.check_output(out, overwrite, inputs=[src])
    read = ["config.json", *([INDEX_FILE] if weight_map is not None else []), *(f.name for f in files), *tokenizer_files]
    record = {"format": "huggingface", "path": str(src.resolve()), "model_type": hf["model_type"],
              "files": {name: {"bytes": (src / name).stat().st_size, "sha256": art.sha256_file(src / name)}
                        for name in dict.fromkeys(read)}}
    tied = {"tied": "lm_head.weight=tok_emb.weight"} if spec.get("tie_weights") else {}
    with art.atomic_directory(out, overwrite, inputs=[src]) as staging:
        write_streamed(staging / art.WEIGHTS_FILE, planned, {"format": "pt", **tied}, progress)
        extra = {}
        if tokenizer is not None:
            (staging / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
            extra["tokenizer"] = tokenizer
        config = art.new_config("language-modeling", spec, data_section(spec), **extra)
        manifest = art.write_metadata(staging, config=config, stage="import",
                                      options={"source": str(src.resolve()), "dtype": dtype or "as stored"},
                                      extra={"source": record})
    return ImportResult(Path(out), hf["model_type"], spec, len(planned), sorted({p.dtype for p in planned}),
                        tokenizer, notes, manifest)


__all__ = ["SUPPORTED", "ImportResult", "import_checkpoint"]
