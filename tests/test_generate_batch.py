"""Batched generation (engine/generate.py, onnx/decoder.py; `generate --prompts-file`): several
prompts decoded together — left-padded with an attention mask and per-row positions on the cached
decoders (PyTorch and decoder.onnx), right-padded on the recomputing one — give each prompt the
tokens it gets alone, greedy and sampled; a stop string or EOS ends one row while the others go on;
the prompts file's mistakes are one line."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_error_line
from test_generate_cache import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WINDOW = 16
# a one-token prompt, a short one, one that fills the window, one longer than it: with 20 new tokens
# every row passes the window, the rows at different steps (so padded rows re-prefill early)
PROMPTS = [[7], [3, 1, 4, 1, 5], list(range(40, 56)), list(range(100, 121))]


class Bytes:
    """A byte-level tokenizer with an end-of-text id of our choosing."""
    vocab_size = 256

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def decode(self, ids):
        return bytes(ids).decode("latin-1")


def cfg(**options):
    from bigmodel_cli.engine.generate import GenerateConfig

    return GenerateConfig(prompt="x", **{"max_new_tokens": 20, "temperature": 0, **options})


def rows(decoder, prompts, seeds=None, tokenizer=None, **options):
    from bigmodel_cli.engine.generate import decode_rows

    results, _ = decode_rows(decoder, tokenizer or Bytes(), prompts, seeds or [0] * len(prompts), cfg(**options))
    return results


@pytest.fixture(scope="module", params=["gpt", "llama"])
def decoders(request, tmp_path_factory):
    """arch → (make(kind) → a fresh decoder of that kind over one tiny model): torch's cache, the
    recomputing path, and decoder.onnx on ONNX Runtime (exported once)."""
    from bigmodel_cli.engine.core.tasks import torch_predict
    from bigmodel_cli.engine.decoders import CachedTorchDecoder, RecomputeDecoder
    from bigmodel_cli.engine.onnx.decoder import OrtCachedDecoder, cache_shape, decoder_section, export_decoder
    from bigmodel_cli.engine.onnx.runtime import open_session

    model = tiny_model(request.param, WINDOW)
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    export_decoder(model, path, 18, 256)
    session, _ = open_session(path, threads=1)
    section = decoder_section(*cache_shape(model))
    return {
        "torch": lambda: CachedTorchDecoder(model, WINDOW, "cpu", "fp32", 256),
        "recompute": lambda: RecomputeDecoder(torch_predict(model), WINDOW),
        "onnx": lambda: OrtCachedDecoder(session, section, WINDOW, 256),
    }


@pytest.mark.parametrize("kind", ["torch", "recompute", "onnx"])
def test_each_row_of_a_padded_batch_gives_what_its_prompt_gives_alone(decoders, kind):
    alone = [rows(decoders["torch"](), [prompt])[0]["tokens"] for prompt in PROMPTS]
    decoder = decoders[kind]()
    batch = rows(decoder, PROMPTS)
    assert [row["tokens"] for row in batch] == alone
    assert all(len(tokens) == 20 for tokens in alone) and len({tuple(t) for t in alone}) == 4
    if kind != "recompute":
        assert decoder.prefills > 1 and decoder.cache_bytes > 0  # the window slid; the cache was used


def test_sampling_is_reproducible_per_row_with_each_rows_seed(decoders):
    """Each row draws from its own generator: its seed gives it the text that prompt gets alone with
    that seed, whatever else is in the batch; the same prompt with another seed differs."""
    options = {"temperature": 20.0, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.2}  # flat: every draw counts
    seeds = [5, 6, 7, 8]
    alone = [rows(decoders["torch"](), [p], [s], **options)[0]["tokens"] for p, s in zip(PROMPTS, seeds)]
    for kind in ("torch", "onnx"):
        assert [r["tokens"] for r in rows(decoders[kind](), PROMPTS, seeds, **options)] == alone
    twins = rows(decoders["torch"](), [PROMPTS[1], PROMPTS[1]], [1, 2], **options)
    assert twins[0]["tokens"] != twins[1]["tokens"]


def test_a_stop_string_or_eos_ends_one_row_while_the_others_continue(decoders):
    full = rows(decoders["onnx"](), PROMPTS)
    first = full[1]["tokens"]
    eos = first[6]  # row 1's seventh token is the end of text
    cut = first.index(eos)
    ended = rows(decoders["onnx"](), PROMPTS, tokenizer=Bytes(eos_id=eos))
    assert ended[1]["tokens"] == first[:cut] and ended[1]["finish_reason"] == "eos"
    for row, whole in zip(ended, full):
        if eos not in whole["tokens"]:
            assert row["tokens"] == whole["tokens"] and row["finish_reason"] == "length"
    stop = bytes(full[2]["tokens"][3:5]).decode("latin-1")
    stopped = rows(decoders["torch"](), PROMPTS, stop=(stop,))
    text = Bytes().decode(full[2]["tokens"])
    assert stopped[2]["text"] == text[:text.index(stop)] and stopped[2]["stopped"]
    for row, whole in zip(stopped, full):
        if stop not in Bytes().decode(whole["tokens"]):
            assert row["tokens"] == whole["tokens"] and not row["stopped"]


def test_the_model_positions_each_left_padded_row_from_its_first_token():
    """gpt (learned positions) and llama (RoPE), with the cache and without: a left-padded row's
    logits are its unpadded logits."""
    import torch

    from bigmodel_cli.engine.onnx.decoder import left_pad

    for arch in ("gpt", "llama"):
        model = tiny_model(arch, WINDOW)
        ids, mask = (torch.from_numpy(a) for a in left_pad([[1, 2, 3, 4, 5], [9, 8]]))
        with torch.inference_mode():
            padded = model(ids, attention_mask=mask)
            cached, _ = model(ids, use_cache=True, attention_mask=mask)
            alone = model(torch.tensor([[9, 8]]))
        assert torch.isfinite(padded).all()  # padding sees itself: no NaN to spread
        torch.testing.assert_close(padded[1, -2:], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(cached, padded, atol=1e-5, rtol=0)


# --- the command -----------------------------------------------------------------------------------

BATCH_PROMPTS = ["def wrap(text", "The ", "import numpy as np\nx = ", "a"]


def prompts_file(tmp_path, prompts=BATCH_PROMPTS, **extra) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, **extra}) + "\n" for p in prompts))
    return str(path)


def alone(cli, artifact, prompt, *args):
    result = cli("generate", artifact, "--prompt", prompt, "-n", "24", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("backend, args", [("torch", ()), ("torch", ("--no-cache",)), ("onnx", ())])
def test_prompts_file_gives_each_prompt_its_own_text_as_a_json_list(cli, gpt_onnx, tmp_path, backend, args):
    flags = ("--backend", backend, "--temperature", "0.8", "--seed", "4", "--threads", "1", *args)
    result = cli("generate", gpt_onnx, "--prompts-file", prompts_file(tmp_path), "-n", "24", "--batch-size", "3",
                 *flags, "--json")
    assert result.exit_code == 0, result.output
    batch = json.loads(result.stdout)
    assert [r["prompt"] for r in batch] == BATCH_PROMPTS and [r["index"] for r in batch] == [0, 1, 2, 3]
    assert [r["batch_size"] for r in batch] == [3, 3, 3, 1]  # batches of 3, the last of one
    assert all(r["batch_tokens_per_s"] > 0 and r["backend"] == backend for r in batch)
    assert batch[0]["cache"] == ("--no-cache" not in args)
    for row, prompt in zip(batch, BATCH_PROMPTS):
        assert row["tokens"] == alone(cli, gpt_onnx, prompt, *flags)["tokens"]


def test_a_rows_own_seed_and_the_streamed_output(cli, tiny_gpt, tmp_path):
    path = tmp_path / "seeded.jsonl"
    path.write_text(json.dumps({"prompt": "The ", "seed": 9}) + "\n" + json.dumps({"prompt": "The "}) + "\n\n")
    result = cli("generate", tiny_gpt, "--prompts-file", path, "-n", "20", "--seed", "2", "--json")
    assert result.exit_code == 0, result.output
    seeded, default = json.loads(result.stdout)
    assert seeded["seed"] == 9 and default["seed"] == 2
    assert seeded["tokens"] == alone(cli, tiny_gpt, "The ", "--seed", "9")["tokens"][:20]
    streamed = cli("generate", tiny_gpt, "--prompts-file", prompts_file(tmp_path), "-n", "12", "--seed", "1")
    assert streamed.exit_code == 0, streamed.output
    texts = [p + alone(cli, tiny_gpt, p, "-n", "12", "--seed", "1")["text"] for p in BATCH_PROMPTS]
    assert streamed.stdout == "\n".join(text + "\n" for text in texts)  # in order, a blank line between
    assert "4 prompts" in streamed.stderr and "tok/s over the batch" in streamed.stderr


@pytest.mark.parametrize("content, fragments", [
    (b"", ("holds no prompt",)),
    (b"\n\n", ("holds no prompt",)),
    (b'{"prompt": "a"}\n\n{"prompt": "b"}\n', ("line 2", "is empty")),
    (b'{"prompt": "a"}\nhello\n', ("line 2", "not JSON")),
    (b'["a"]\n', ("line 1", '"prompt" string')),
    (b'{"text": "a"}\n', ("line 1", '"prompt" string')),
    (b'{"prompt": "a", "sed": 3}\n', ("line 1", "unknown key 'sed'")),
    (b'{"prompt": ""}\n', ("line 1", "empty prompt")),
    (b'{"prompt": "a", "seed": -1}\n', ("line 1", '"seed"')),
    (b'{"prompt": "a", "seed": true}\n', ("line 1", '"seed"')),
    (b'\xff\xfe{"prompt": "a"}\n', ("not UTF-8",)),
    (b"[" * 100_000 + b"\n", ("line 1", "nested too deeply")),
])
def test_a_bad_prompts_file_is_one_line(cli, tiny_gpt, tmp_path, content, fragments):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    result = cli("generate", tiny_gpt, "--prompts-file", path)
    assert_one_error_line(result, *fragments)
    assert result.stdout == ""


def test_prompts_file_and_batch_mistakes_are_one_line(cli, tiny_gpt, tmp_path, monkeypatch):
    from bigmodel_cli.engine import prompts_file as prompts_module

    good = prompts_file(tmp_path)
    assert_one_error_line(cli("generate", tiny_gpt), "--prompt", "--prompts-file")
    assert_one_error_line(cli("generate", tiny_gpt, "--prompt", "a", "--prompts-file", good), "not both")
    assert_one_error_line(cli("generate", tiny_gpt, "--prompts-file", tmp_path / "none.jsonl"), "no such file")
    assert_one_error_line(cli("generate", tiny_gpt, "--prompts-file", tmp_path), "not a regular file")
    assert_one_error_line(cli("generate", tiny_gpt, "--prompts-file", good, "--batch-size", "0"), "--batch-size")
    assert_one_error_line(cli("generate", tiny_gpt, "--prompts-file", good, "--no-truncate", "-n", "60"),
                          "line 1", "window of 64", "--no-truncate")
    monkeypatch.setattr(prompts_module, "MAX_PROMPTS_FILE_BYTES", 64)  # the cap, checked before reading
    assert_one_error_line(cli("generate", tiny_gpt, "--prompts-file", good), "more than the 64", "split")


def test_a_fifo_or_device_is_refused_without_reading(cli, tiny_gpt, tmp_path):
    import os

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)  # nobody writes to it: a blocking read would hang
    assert_one_error_line(cli("generate", tiny_gpt, "--prompts-file", fifo), "not a regular file")
    assert_one_error_line(cli("generate", tiny_gpt, "--prompts-file", "/dev/zero"), "not a regular file")


def test_a_huge_prompts_file_is_refused_before_it_is_read(tiny_gpt, tmp_path):
    """A 4 GiB (sparse) file under a 3 GB address-space limit: refused by its size, one line, exit 2."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as handle:
        handle.truncate(4 * 1024**3)
    limit = 3 * 1024**3
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bigmodel_cli", "generate", str(tiny_gpt), "--prompts-file", str(huge)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "more than the" in lines[0]


def test_ctrl_c_keeps_every_rows_text_so_far(decoders):
    """A KeyboardInterrupt mid-batch ends every row as interrupted, each with its tokens so far
    (the CLI then prints them and exits 130, as for one prompt)."""
    decoder = decoders["torch"]()
    steps = {"n": 0}
    step_batch = decoder.step_batch

    def interrupted_at_the_fifth_step(tokens):
        steps["n"] += 1
        if steps["n"] == 5:
            raise KeyboardInterrupt
        return step_batch(tokens)

    decoder.step_batch = interrupted_at_the_fifth_step
    full = rows(decoders["torch"](), PROMPTS)
    cut = rows(decoder, PROMPTS)
    for row, whole in zip(cut, full):
        assert row["interrupted"] and row["finish_reason"] == "interrupted"
        assert row["tokens"] == whole["tokens"][:5]


def test_a_prompt_holding_a_unicode_line_separator_is_one_line_of_json(tmp_path):
    """JSON writers leave U+2028 / U+0085 unescaped inside strings: lines end at "\\n" only."""
    from bigmodel_cli.engine.prompts_file import read_prompts_file

    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b\u0085c"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert [p.text for p in read_prompts_file(path)] == ["a\u2028b\u0085c"]
