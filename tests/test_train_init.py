"""bigmodel train --init ART: continue training an artifact (ours or imported) on the user's data,
keeping its architecture and tokenizer, recording it as the parent; resume stays bit-exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_error_line

torch = pytest.importorskip("torch")


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_language_model_continues_with_its_architecture(cli, tiny_gpt, corpus, tmp_path, one_torch_thread):
    run = tmp_path / "ft"
    result = cli("train", "--init", tiny_gpt, "--data", f"text:{corpus}", "--max-steps", "3", "--batch-size", "4",
                 "--block-size", "32", "--eval-windows", "2", "--out", run)
    assert result.exit_code == 0, result.output
    parent = tiny_gpt / "best"
    assert config(run / "last")["model"] == config(parent)["model"]
    record = manifest(run / "last")
    assert record["parent"]["path"] == str(parent.resolve())
    assert record["init"]["weights_sha256"] == manifest(parent)["files"]["model.safetensors"]["sha256"]
    stages = [entry["stage"] for entry in json.loads(cli("info", run / "last", "--json").stdout)["lineage"]]
    assert stages[:2] == ["train", "train"]
    # it started from the parent's weights: a few small steps move them only a little
    before, after = weights(parent), weights(run / "last")
    assert before.keys() == after.keys()
    assert all((before[k] - after[k]).abs().max() < 0.1 for k in before)


class _Interrupt(Exception):
    pass


def test_resume_is_bit_exact_and_checks_the_init_weights(digits_mlp, tmp_path, one_torch_thread):
    from bigmodel_cli import TrainConfig, train
    from bigmodel_cli.engine.training.job import prepare_training
    from bigmodel_cli.engine.training.loop import run_job

    init = tmp_path / "init"
    shutil.copytree(digits_mlp, init)
    common = dict(init=str(init), max_steps=6, checkpoint_every=3, eval_every=3, batch_size=16)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **common))

    def stop(event, **info):
        if event == "step" and info["step"] == 5:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        run_job(prepare_training(TrainConfig(out=str(tmp_path / "cut"), **common)), stop)
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **common))
    assert resumed.resumed_from == 3
    a, b = weights(whole.last_dir), weights(resumed.last_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same --init path now holds other weights: resuming from them would not be the same run
    with pytest.raises(_Interrupt):
        run_job(prepare_training(TrainConfig(out=str(tmp_path / "cut2"), **common)), stop)
    shutil.rmtree(init)
    shutil.copytree(whole.last_dir, init)
    from bigmodel_cli.errors import UserError

    with pytest.raises(UserError, match="--init artifact's weights"):
        train(TrainConfig(out=str(tmp_path / "cut2"), resume=True, **common))


def test_imported_model_keeps_its_tokenizer(cli, corpus, tmp_path, one_torch_thread):
    transformers = pytest.importorskip("transformers")
    from test_hf_export import with_tokenizer
    from test_pretrained import imported, make_checkpoint

    assert transformers
    art = imported(cli, with_tokenizer(make_checkpoint(tmp_path / "src", "llama-tied")), tmp_path / "art")
    run = tmp_path / "ft"
    result = cli("train", "--init", art, "--data", f"text:{corpus}", "--max-steps", "2", "--batch-size", "2",
                 "--block-size", "16", "--eval-windows", "2", "--out", run)
    assert result.exit_code == 0, result.output
    assert config(run / "last")["tokenizer"] == config(art)["tokenizer"]
    assert (run / "last" / "tokenizer.json").read_bytes() == (art / "tokenizer.json").read_bytes()
    assert config(run / "last")["model"] == config(art)["model"]
    # and the fine-tuned model goes back to the ecosystem as the type it came from
    exported = cli("export", run / "last", "--format", "hf", "--out", tmp_path / "hf")
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("flags, fragment", [
    (("--model", "gpt"), "--model"),
    (("--preset", "tiny"), "--preset"),
    (("--hidden-size", "8"), "--hidden-size"),
    (("--model-args", '{"hidden_sizes": [4]}'), "--model-args"),
])
def test_architecture_flags_are_refused(cli, digits_mlp, tmp_path, flags, fragment):
    assert_one_error_line(cli("train", "--init", digits_mlp, *flags, "--out", tmp_path / "o"), fragment, "from the artifact")
    assert not (tmp_path / "o").exists()


def test_tokenizer_conflicts_and_wrong_data(cli, tiny_gpt, digits_mlp, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    assert_one_error_line(cli("train", "--init", tiny_gpt, "--tokenizer", tok, "--out", tmp_path / "o"), "--tokenizer")
    assert_one_error_line(cli("train", "--init", digits_mlp, "--data", "text:stdlib", "--out", tmp_path / "o"),
                          "classification model")
    assert_one_error_line(cli("train", "--init", tmp_path / "missing", "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_recipe_step_initialised_from_an_earlier_step(cli, tmp_path):
    recipe = tmp_path / "ft.toml"
    recipe.write_text("""
[[steps]]
name = "base"
command = "train"
max-steps = 2

[[steps]]
name = "tuned"
command = "train"
init = "base"
max-steps = 2
lr = 1e-4
""")
    result = cli("run", recipe, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    parent = manifest(tmp_path / "r" / "tuned" / "best")["parent"]["path"]
    assert parent == str((tmp_path / "r" / "base" / "best").resolve())
    # a rerun skips both: the base's manifest is part of the tuned step's fingerprint
    again = cli("run", recipe, "--out", tmp_path / "r", "--json")
    assert again.exit_code == 0, again.output
    steps = json.loads(again.stdout)["steps"]
    assert [s["status"] for s in steps] == ["skipped", "skipped"]
    assert steps[1]["argv"][:3] == ["train", "--init", str(tmp_path / "r" / "base")]
