"""Tokenizers: `bigmodel tokenizer train`, `train --tokenizer`, the token cache, bits per byte, and
every LM command reading text through the artifact's tokenizer."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bigmodel_cli import TrainConfig, train
from bigmodel_cli.data.text import cache_dir
from bigmodel_cli.engine.training.job import prepare_training
from bigmodel_cli.engine.training.loop import run_job

from conftest import assert_one_error_line

VOCAB = 400


@pytest.fixture(scope="module", autouse=True)
def token_cache(tmp_path_factory):
    """The token cache in a test directory, never the user's ~/.cache (module-wide, before the
    module's trained fixtures)."""
    path = tmp_path_factory.mktemp("token-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIGMODEL_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, corpus, token_cache):
    from typer.testing import CliRunner

    from bigmodel_cli.cli import app

    out = tmp_path_factory.mktemp("tok") / "bpe"
    result = CliRunner().invoke(app, ["tokenizer", "train", f"text:{corpus}", "--vocab-size", str(VOCAB),
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["vocab_size"] == VOCAB
    return out


def _lm(**extra) -> dict:
    return dict(model="gpt", preset="nano", block_size=16, batch_size=4, eval_windows=4, seed=1,
                model_args={"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}, **extra)


@pytest.fixture(scope="module")
def bpe_gpt(tmp_path_factory, corpus, bpe):
    out = tmp_path_factory.mktemp("runs") / "bpe-gpt"
    train(TrainConfig(data=f"text:{corpus}", tokenizer=str(bpe), max_steps=8, out=str(out), **_lm()))
    return out


def test_trained_model_carries_its_tokenizer_and_sizes_its_vocabulary(bpe_gpt, bpe):
    config = json.loads((bpe_gpt / "best" / "config.json").read_text())
    assert config["model"]["vocab_size"] == VOCAB
    assert config["tokenizer"]["vocab_size"] == VOCAB and config["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert (bpe_gpt / "best" / "tokenizer.json").read_bytes() == (bpe / "tokenizer.json").read_bytes()
    manifest = json.loads((bpe_gpt / "best" / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["files"]


def test_eval_reports_perplexity_and_bits_per_byte(cli, bpe_gpt):
    result = cli("eval", bpe_gpt, "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    # BPE tokens stand for more than one byte each: bits per byte divides by the text's bytes
    assert r["text_bytes"] > r["tokens"] > 0
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["text_bytes"])
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    table = cli("eval", bpe_gpt)
    assert "bits_per_byte" in table.stdout


def test_generate_returns_text_decoded_by_the_tokenizer(cli, bpe_gpt):
    result = cli("generate", bpe_gpt, "--prompt", "def parse", "--max-new-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["new_tokens"] == 6 and all(0 <= t < VOCAB for t in r["tokens"])
    assert any(t >= 256 for t in r["tokens"]) or isinstance(r["text"], str)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str((bpe_gpt / "best" / "tokenizer.json").read_text())
    assert r["text"] == tok.decode(r["tokens"], skip_special_tokens=False)


def test_byte_level_bits_per_byte_is_nll_over_ln2(cli, tiny_gpt):
    r = json.loads(cli("eval", tiny_gpt, "--json").stdout)
    assert r["tokens"] == r["text_bytes"]
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-12)


class _Interrupt(Exception):
    pass


def test_resume_with_a_tokenizer_is_bit_exact(tmp_path, corpus, bpe):
    common = dict(data=f"text:{corpus}", tokenizer=str(bpe), max_steps=8, checkpoint_every=4, eval_every=4, **_lm())
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **common))

    def stop(event, **info):
        if event == "step" and info["step"] == 6:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        run_job(prepare_training(TrainConfig(out=str(tmp_path / "cut"), **common)), stop)
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **common))
    assert resumed.resumed_from == 4
    a, b = load_file(whole.last_dir / "model.safetensors"), load_file(resumed.last_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_is_reused_and_invalidated_when_the_corpus_changes(tmp_path, corpus, bpe):
    from bigmodel_cli.data import load_dataset, parse_data_arg
    from bigmodel_cli.data.tokenizer import open_tokenizer_dir

    text = tmp_path / "text.txt"
    shutil.copyfile(corpus, text)
    tokenizer, _ = open_tokenizer_dir(bpe)
    first = load_dataset(parse_data_arg(f"text:{text}"), tokenizer)
    cached = first.corpus.path
    assert cached.parent == cache_dir() and cached.suffix == ".uint16"
    stamp = cached.stat().st_mtime_ns
    again = load_dataset(parse_data_arg(f"text:{text}"), tokenizer)
    assert again.corpus.path == cached and cached.stat().st_mtime_ns == stamp  # not re-tokenized
    assert again.split_size("train") == first.split_size("train")
    with open(text, "a", encoding="utf-8") as handle:
        handle.write("\nanother line of text\n")
    changed = load_dataset(parse_data_arg(f"text:{text}"), tokenizer)
    assert changed.corpus.path != cached and len(changed.corpus) > len(first.corpus)
    assert cached.exists()  # the old entry is left alone


def test_derived_artifacts_keep_the_tokenizer(cli, bpe_gpt, tmp_path):
    result = cli("prune", bpe_gpt, "--method", "structured", "--sparsity", "0.25", "--max-steps", "2",
                 "--no-bench", "--out", tmp_path / "pruned", "--json")
    assert result.exit_code == 0, result.output
    pruned = tmp_path / "pruned" / "best"
    assert (pruned / "tokenizer.json").read_bytes() == (bpe_gpt / "best" / "tokenizer.json").read_bytes()
    assert json.loads((pruned / "config.json").read_text())["tokenizer"]["vocab_size"] == VOCAB
    assert cli("generate", pruned, "--prompt", "x", "--max-new-tokens", "2").exit_code == 0
    exported, quantized = tmp_path / "onnx", tmp_path / "int8"
    assert cli("export", bpe_gpt, "--out", exported).exit_code == 0
    assert cli("quantize", pruned, "--mode", "weight-only", "--out", quantized).exit_code == 0
    for derived in (exported, quantized):
        assert (derived / "tokenizer.json").read_bytes() == (bpe_gpt / "best" / "tokenizer.json").read_bytes()
        r = json.loads(cli("eval", derived, "--json").stdout)
        assert r["text_bytes"] > r["tokens"]  # read through the tokenizer, not as bytes


# ------------------------------------------------------------------ every bad input: one line, exit 2


@pytest.mark.parametrize("size", ["256", "5000000"])
def test_vocab_size_out_of_range(cli, corpus, tmp_path, size):
    result = cli("tokenizer", "train", f"text:{corpus}", "--vocab-size", size, "--out", tmp_path / "t")
    assert_one_error_line(result, "--vocab-size", "257")
    assert not (tmp_path / "t").exists()


def test_tokenizer_train_refuses_an_existing_output(cli, corpus, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "mine.txt").write_text("keep")
    result = cli("tokenizer", "train", f"text:{corpus}", "--vocab-size", "300", "--out", tmp_path / "t")
    assert_one_error_line(result, "--overwrite")
    assert (tmp_path / "t" / "mine.txt").read_text() == "keep"


def test_overwrite_replaces_a_tokenizer_directory_but_not_one_with_other_files(cli, corpus, tmp_path):
    args = ("tokenizer", "train", f"text:{corpus}", "--vocab-size", "300", "--out", tmp_path / "t")
    assert cli(*args).exit_code == 0
    replaced = cli(*args[:4], "301", *args[5:], "--overwrite", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["requested_vocab_size"] == 301
    (tmp_path / "t" / "mine.txt").write_text("keep")
    assert_one_error_line(cli(*args, "--overwrite"), "mine.txt")
    assert (tmp_path / "t" / "mine.txt").read_text() == "keep"


def test_tokenizer_dir_without_tokenizer_json(cli, corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("train", "--model", "gpt", "--data", f"text:{corpus}", "--tokenizer", tmp_path / "empty",
                 "--out", tmp_path / "run")
    assert_one_error_line(result, "tokenizer.json")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["edited", "garbage"])
def test_damaged_tokenizer(cli, corpus, bpe, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(bpe, broken)
    if damage == "edited":  # the description's sha256 no longer matches
        data = (broken / "tokenizer.json").read_bytes()
        (broken / "tokenizer.json").write_bytes(data.replace(b'"merges"', b'"merges" ', 1))
        fragment = "sha256"
    else:  # a bare tokenizer.json that is not one
        (broken / "bigmodel-tokenizer.json").unlink()
        (broken / "tokenizer.json").write_bytes(b"{not json")
        fragment = "not a valid tokenizer"
    result = cli("train", "--model", "gpt", "--data", f"text:{corpus}", "--tokenizer", broken, "--out", tmp_path / "run")
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "run").exists()


def test_damaged_tokenizer_in_an_artifact(cli, bpe_gpt, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(bpe_gpt / "best", copy)
    (copy / "tokenizer.json").write_bytes(b"{}" + (copy / "tokenizer.json").read_bytes()[2:])
    assert_one_error_line(cli("eval", copy), "tokenizer.json", "sha256")


def test_tokenizer_larger_than_the_model_vocabulary(cli, corpus, bpe, tmp_path):
    result = cli("train", "--model", "gpt", "--preset", "nano", "--data", f"text:{corpus}", "--tokenizer", bpe,
                 "--model-args", '{"vocab_size": 300}', "--out", tmp_path / "run")
    assert_one_error_line(result, f"{VOCAB}", "300", "vocab_size")
    assert not (tmp_path / "run").exists()


def test_tokenizer_on_a_classifier(cli, bpe, tmp_path):
    result = cli("train", "--model", "mlp", "--tokenizer", bpe, "--out", tmp_path / "run")
    assert_one_error_line(result, "--tokenizer", "language models")
    assert not (tmp_path / "run").exists()


def test_tokenizer_from_a_toml_config(cli, corpus, bpe, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(f'[train]\nmodel = "gpt"\npreset = "nano"\ndata = "text:{corpus}"\ntokenizer = "{bpe}"\n'
                      'max-steps = 1\nblock-size = 16\nbatch-size = 2\neval-windows = 2\n'
                      'model-args = {n_layer = 1, n_embd = 32, n_head = 2, block_size = 32}\n')
    result = cli("train", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["tokenizer"]["vocab_size"] == VOCAB


def test_explain_shows_the_tokenizers_tokens(cli, bpe_gpt):
    prompt = "def parse_args(self"
    result = cli("explain", bpe_gpt, "--prompt", prompt, "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    texts = [t["text"] for t in r["tokens"]]
    assert "".join(texts) == prompt and len(texts) < len(prompt.encode())  # BPE tokens, not bytes
    assert_one_error_line(cli("explain", bpe_gpt, "--prompt", prompt, "--target", "zzqqxxjj"), "--target", "tokens")


def test_bytes_per_token_are_exact_even_across_a_cut_character(bpe):
    from bigmodel_cli.data.tokenizer import open_tokenizer_dir

    tokenizer, _ = open_tokenizer_dir(bpe)
    text = "naïve café ✓ déjà vu"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.byte_count(ids) == len(text.encode("utf-8"))
    # a window boundary inside a multi-byte character still counts that character's bytes once
    assert sum(tokenizer.byte_count([i]) for i in ids) == len(text.encode("utf-8"))


def test_resume_refuses_a_changed_tokenizer(cli, tmp_path, corpus, bpe):
    tok = tmp_path / "tok"
    shutil.copytree(bpe, tok)
    common = dict(data=f"text:{corpus}", tokenizer=str(tok), max_steps=2, checkpoint_every=1, eval_every=1, **_lm())
    train(TrainConfig(out=str(tmp_path / "run"), **common))
    shutil.rmtree(tok)  # the same path now holds another tokenizer (other merges)
    other = tmp_path / "other.txt"
    other.write_text("completely different text " * 2000)
    assert cli("tokenizer", "train", f"text:{other}", "--vocab-size", str(VOCAB), "--out", tok).exit_code == 0
    args = ["train", "--model", "gpt", "--preset", "nano", "--data", f"text:{corpus}", "--tokenizer", tok,
            "--max-steps", "2", "--checkpoint-every", "1", "--eval-every", "1", "--block-size", "16",
            "--batch-size", "4", "--eval-windows", "4", "--seed", "1",
            "--model-args", json.dumps(common["model_args"]), "--out", tmp_path / "run", "--resume"]
    assert_one_error_line(cli(*args), "--resume", "tokenizer")


@pytest.mark.parametrize("hostile", ["device", "huge"])
def test_hostile_tokenizer_file_is_refused_unread(cli, corpus, tmp_path, hostile):
    directory = tmp_path / "tok"
    directory.mkdir()
    if hostile == "device":  # would read forever
        (directory / "tokenizer.json").symlink_to("/dev/zero")
        fragment = "not a regular file"
    else:  # sparse: 1 GiB on paper, nothing on disk
        with open(directory / "tokenizer.json", "wb") as handle:
            handle.truncate(1 << 30)
        fragment = "more than"
    result = cli("train", "--model", "gpt", "--data", f"text:{corpus}", "--tokenizer", directory, "--out", tmp_path / "run")
    assert_one_error_line(result, fragment)
