"""Decoding with a KV cache (models/gpt.py, llama.py; engine/generate.py): the same tokens as the
cache-free path and as transformers' greedy generate, streaming, stop strings, sampling options,
their bad values, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_error_line


def tiny_model(arch: str, window: int):
    from bigmodel_cli.models.gpt import GPT, GPTConfig
    from bigmodel_cli.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt":
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=window))
    else:
        model = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=window))
    # random init is nearly uniform: sharpen it so greedy tokens are not decided by rounding
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model.eval()


def greedy(decoder, prompt: list[int], new: int) -> list[int]:
    from bigmodel_cli.engine.generate import GenerateConfig, decode_stream

    return list(decode_stream(decoder, prompt, GenerateConfig(prompt="x", max_new_tokens=new, temperature=0)))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_cache_gives_the_cache_free_tokens(arch, one_torch_thread):
    from bigmodel_cli.engine.core.tasks import torch_predict
    from bigmodel_cli.engine.decoders import CachedTorchDecoder, RecomputeDecoder

    window = 16
    model = tiny_model(arch, window)
    rng = np.random.default_rng(0)
    # a one-token prompt, a short one, one that fills the window, one longer than it; 24 new tokens
    # take every prompt past the window, where the cache re-prefills the slid window
    for length in (1, 5, 16, 21):
        prompt = rng.integers(0, 256, length).tolist()
        cached = CachedTorchDecoder(model, window, "cpu", "fp32", 256)
        assert greedy(cached, prompt, 24) == greedy(RecomputeDecoder(torch_predict(model), window), prompt, 24)
        assert cached.prefills > 1  # the window slid
    short = CachedTorchDecoder(model, window, "cpu", "fp32", 256)
    greedy(short, [1, 2], 5)
    assert short.prefills == 1 and short.cache_bytes == 2 * 2 * (2 + 4) * 32 * 4 * (1 if arch == "gpt" else 0.5)


@pytest.mark.parametrize("case", ["gpt2", "llama-untied-gqa"])
def test_greedy_tokens_match_transformers_generate(cli, tmp_path, one_torch_thread, case):
    transformers = pytest.importorskip("transformers")
    from test_pretrained import make_checkpoint

    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.decoders import CachedTorchDecoder

    source = make_checkpoint(tmp_path / "hf", case)
    result = cli("import", source, "--out", tmp_path / "art")
    assert result.exit_code == 0, result.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours = open_artifact(tmp_path / "art").build_model().eval()
    for seed in (1, 2):
        prompt = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = theirs.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                                       pad_token_id=0)[0, 7:].tolist()
        assert greedy(CachedTorchDecoder(ours, 64, "cpu", "fp32", 320), prompt[0].tolist(), 20) == expected


def run_json(cli, artifact, *args):
    result = cli("generate", artifact, "--prompt", "def wrap(text", "--max-new-tokens", "30", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_cache_no_cache_stream_and_json_agree(cli, tiny_gpt):
    cached = run_json(cli, tiny_gpt, "--backend", "torch", "--seed", "3")
    plain = run_json(cli, tiny_gpt, "--backend", "torch", "--seed", "3", "--no-cache")
    assert cached["tokens"] == plain["tokens"] and cached["cache"] and not plain["cache"]
    assert cached["cache_bytes"] > 0 and plain["cache_bytes"] == 0
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"):
        assert cached[key] > 0
    streamed = cli("generate", tiny_gpt, "--prompt", "def wrap(text", "--max-new-tokens", "30", "--seed", "3")
    scripted = cli("generate", tiny_gpt, "--prompt", "def wrap(text", "--max-new-tokens", "30", "--seed", "3",
                   "--no-stream")
    assert streamed.exit_code == scripted.exit_code == 0, streamed.output + scripted.output
    assert streamed.stdout == scripted.stdout == "def wrap(text" + cached["text"] + "\n"
    assert "decode" in streamed.stderr and "KV cache" in streamed.stderr


def test_same_seed_same_text_with_top_p_and_repetition_penalty(cli, tiny_gpt):
    args = ("--temperature", "1.2", "--top-p", "0.9", "--repetition-penalty", "1.3", "--seed", "11")
    first, second = run_json(cli, tiny_gpt, *args), run_json(cli, tiny_gpt, *args)
    assert first["tokens"] == second["tokens"] and first["top_p"] == 0.9
    assert run_json(cli, tiny_gpt, *args[:-1], "12")["tokens"] != first["tokens"]


def test_sampling_rules():
    from bigmodel_cli.engine.generate import sample_next

    logits = np.array([2.0, 1.9, -1.0, 0.5])
    rng = np.random.default_rng(0)
    # a tiny top-p keeps only the most likely token, whatever the draw
    assert {sample_next(logits, 1.0, None, rng, top_p=1e-6) for _ in range(20)} == {0}
    # the penalty divides a positive logit: token 0 (seen) falls below token 1
    assert sample_next(logits, 0, None, rng, repetition_penalty=1.5, seen=np.array([0])) == 1
    assert sample_next(logits, 0, None, rng, repetition_penalty=1.0, seen=np.array([0])) == 0


def test_stop_strings_end_the_text_and_are_held_back_while_streaming(cli, tiny_gpt):
    from bigmodel_cli.engine.generate import TextStream

    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ("END",))
    shown = [stream.push(b) for b in b"ab EN"]
    assert "".join(shown) == "ab " and not stream.stopped  # "EN" could begin "END": held back
    assert stream.push(ord("D")) == "" and stream.stopped and stream.text == "ab "
    utf8 = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ())
    assert [utf8.push(b) for b in "é!".encode()] == ["", "é", "!"]  # half a character waits

    full = run_json(cli, tiny_gpt, "--temperature", "0")["text"]
    stop = full[10:13]
    stopped = run_json(cli, tiny_gpt, "--temperature", "0", "--stop", "zzz-never", "--stop", stop)
    assert stopped["stopped"] and stopped["text"] == full[:full.index(stop)]


@pytest.mark.parametrize("args, fragment", [
    (["--stop", ""], "--stop"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
])
def test_bad_decoding_options_are_one_line(cli, tiny_gpt, args, fragment):
    result = cli("generate", tiny_gpt, "--prompt", "x", *args)
    assert_one_error_line(result, fragment)
    assert result.stdout == ""  # the streamed prompt waits for the first token


def test_no_truncate_refuses_a_context_beyond_the_window(cli, tiny_gpt):
    long = cli("generate", tiny_gpt, "--prompt", "x" * 70, "--no-truncate")  # a 64-token window
    assert_one_error_line(long, "70 tokens", "window of 64", "--no-truncate")
    assert_one_error_line(cli("generate", tiny_gpt, "--prompt", "x" * 60, "-n", "5", "--no-truncate"), "window of 64")
    assert run_json(cli, tiny_gpt, "--no-truncate")["new_tokens"] == 30


def test_ctrl_c_prints_the_text_so_far_and_exits_130(tiny_gpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bigmodel_cli", "generate", str(tiny_gpt), "--prompt", "def ",
                             "--max-new-tokens", "1000000", "--backend", "torch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        first = proc.stdout.read(12)  # the prompt and a few streamed bytes: generation is under way
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = (first + rest).decode("utf-8", errors="replace")
    assert proc.returncode == 130, err.decode()
    assert out.startswith("def ") and len(out) > 12 and out.endswith("\n")
    assert "interrupted after" in err.decode() and "Traceback" not in err.decode()
