"""Recipes (`bigmodel run`), `bigmodel compare` and `bigmodel plot`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_error_line

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"

# Fast mode for each example recipe: the same steps, far fewer of them.
FAST = {
    "digits-mlp.toml": ["train.epochs=2", "prune.finetune-epochs=1", "distill.epochs=2"],
    "digits-cnn.toml": ["train.epochs=1", "prune.finetune-epochs=1", "quantize.calib-samples=32"],
    "tiny-gpt.toml": ["train.max-steps=8", "train.data='text:{corpus}'", "train.warmup-steps=0",
                      "distill.max-steps=4", "sample.max-new-tokens=8"],
    "tiny-llama.toml": ["tokenizer.data='text:{corpus}'", "tokenizer.vocab-size=300", "train.data='text:{corpus}'",
                        "train.max-steps=6", "train.warmup-steps=0", "prune.max-steps=2", "distill.max-steps=2",
                        # short windows and batches, 2 layers distilled into 1: about half the CPU of the
                        # recipe's own sizes with the same few steps
                        "train.block-size=32", "distill.block-size=32", "train.batch-size=4", "prune.batch-size=4",
                        "distill.batch-size=4", "train.model-args={n_layer=2}", "distill.student-config={n_layer=1}"],
}


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_example_recipe_has_a_fast_mode_test():
    assert {p.name for p in RECIPES.glob("*.toml")} == set(FAST)


@pytest.mark.parametrize("recipe", sorted(FAST))
def test_example_recipe_runs_end_to_end(cli, tmp_path, corpus, recipe):
    sets = [s.replace("{corpus}", str(corpus)) for s in FAST[recipe]]
    args = ["run", RECIPES / recipe, "--out", tmp_path / "run", "--compare-rounds", "3", "--json"]
    for item in sets:
        args += ["--set", item]
    data = _json(cli(*args))
    assert all(step["status"] == "ran" for step in data["steps"])
    rows = data["compare"]
    assert rows[0]["name"] == "train" and rows[0]["params_ratio"] == 1.0
    assert all(r["latency_ms_p50"] > 0 and r["value"] is not None for r in rows)
    assert (tmp_path / "run" / "compare.md").is_file() and (tmp_path / "run" / "compare.png").is_file()


def _small_recipe(tmp_path: Path, export_opset: int = 18) -> Path:
    recipe = tmp_path / "small.toml"
    recipe.write_text(f"""
[[steps]]
name = "train"
command = "train"
max-steps = 12
checkpoint-every = 4
eval-every = 4

[[steps]]
name = "export"
command = "export"
from = "train"
opset = {export_opset}

[[steps]]
name = "check"
command = "eval"
from = "export"
split = "test"
""")
    return recipe


def test_rerun_skips_what_is_done_resumes_a_crash_and_reruns_what_changed(cli, tmp_path):
    recipe, run = _small_recipe(tmp_path), tmp_path / "run"
    first = _json(cli("run", recipe, "--out", run, "--json", "--compare-rounds", "2"))
    assert [s["status"] for s in first["steps"]] == ["ran", "ran", "ran"]
    assert json.loads((run / "check.json").read_text())["accuracy"] > 0.3

    again = _json(cli("run", recipe, "--out", run, "--json", "--compare-rounds", "2"))
    assert [s["status"] for s in again["steps"]] == ["skipped", "skipped", "skipped"]

    # A training step that crashed (no last/ yet) continues from its checkpoint.
    shutil.rmtree(run / "train" / "last")
    crashed = _json(cli("run", recipe, "--out", run, "--json", "--compare-rounds", "2"))
    assert [s["status"] for s in crashed["steps"]][0] == "resumed"

    # Changing one step reruns it and what depends on it, not what comes before.
    changed = _json(cli("run", _small_recipe(tmp_path, 19), "--out", run, "--json", "--compare-rounds", "2"))
    assert [s["status"] for s in changed["steps"]] == ["skipped", "ran", "ran"]


def test_recipe_problems_are_all_reported_before_anything_runs(cli, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("""
[[steps]]
name = "train"
command = "train"
epochs = "many"
learning-rate = 0.1

[[steps]]
name = "squash"
command = "squeeze"

[[steps]]
name = "export"
command = "export"
from = "quantize"

[[steps]]
name = "quantize"
command = "eval"
from = "nowhere"
""")
    result = cli("run", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 2
    error = result.stderr.strip()
    assert error.startswith("error:") and error.count("\n") == 0
    for fragment in ("epochs must be an integer", "no option --learning-rate", "unknown command 'squeeze'",
                     "'quantize' names no earlier step (it comes later", "'nowhere' names no earlier step"):
        assert fragment in error, fragment
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_step_is_skipped_when_unchanged_and_refused_where_no_option_takes_it(cli, tmp_path, corpus):
    recipe = tmp_path / "tok.toml"
    recipe.write_text(f"""
[[steps]]
name = "tok"
command = "tokenizer"
data = "text:{corpus}"
vocab-size = 300
""")
    first = _json(cli("run", recipe, "--out", tmp_path / "run", "--json"))
    assert [s["status"] for s in first["steps"]] == ["ran"] and first["compare"] is None  # not a model
    assert (tmp_path / "run" / "tok" / "tokenizer.json").is_file()
    again = _json(cli("run", recipe, "--out", tmp_path / "run", "--json"))
    assert [s["status"] for s in again["steps"]] == ["skipped"]
    changed = _json(cli("run", recipe, "--out", tmp_path / "run", "--json", "--set", "tok.vocab-size=301"))
    assert [s["status"] for s in changed["steps"]] == ["ran"]
    with recipe.open("a") as handle:
        handle.write('[[steps]]\nname = "ev"\ncommand = "eval"\nfrom = "tok"\ntokenizer = "tok"\n')
    assert_one_error_line(cli("run", recipe, "--out", tmp_path / "other"), "eval has no option --tokenizer")
    assert not (tmp_path / "other").exists()


def test_recipe_check_prints_the_commands(cli, tmp_path):
    result = cli("run", _small_recipe(tmp_path), "--check", "--out", tmp_path / "run")
    assert result.exit_code == 0
    assert "bigmodel export" in result.stdout and "--opset 18" in result.stdout
    assert not (tmp_path / "run").exists()


def test_a_failing_step_stops_the_run_with_its_exit_code(cli, tmp_path):
    recipe = tmp_path / "fail.toml"
    recipe.write_text('[[steps]]\nname = "train"\ncommand = "train"\nmax-steps = 2\ndata = "csv:missing.csv"\ntarget = "y"\n')
    result = cli("run", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step 'train' (train)" in errors[0] and "missing.csv" in errors[0]


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_step_that_failed_is_run_again_not_skipped(cli, tmp_path):
    """Issue 20 §2: a failed attempt must not leave a record that the rerun mistakes for success."""
    import numpy as np

    sample = tmp_path / "sample.npy"
    np.save(sample, np.zeros((3, 64), dtype=np.float32))
    recipe, run = tmp_path / "ex.toml", tmp_path / "r"
    recipe.write_text(f"""
[[steps]]
name = "t"
command = "train"
max-steps = 2

[[steps]]
name = "ex"
command = "export"
from = "t"

[[steps]]
name = "chk"
command = "eval"
from = "t"

[[steps]]
name = "p"
command = "predict"
from = "t"
input = {str(sample)!r}
""")
    first = _json(cli("run", recipe, "--out", run, "--json", "--compare-rounds", "2"))
    assert [s["status"] for s in first["steps"]] == ["ran"] * 4
    assert len(json.loads((run / "p.json").read_text())["predictions"]) == 3  # predict got its INPUT
    old_export = (run / "ex" / "manifest.json").read_bytes()

    missing_data = ["--set", f"chk.data=csv:{tmp_path / 'gone.csv'}", "--set", "chk.target=y"]
    for _ in range(2):  # the second time too: the failed step is not "complete and unchanged"
        failed = cli("run", recipe, "--out", run, *missing_data)
        assert failed.exit_code == 2 and len(_errors(failed)) == 1 and "step 'chk' (eval)" in _errors(failed)[0]

    bad_export = ["--set", "ex.dtype=fp16", "--set", "ex.atol=0.0"]
    for _ in range(2):
        failed = cli("run", recipe, "--out", run, *bad_export)
        assert failed.exit_code == 2  # skipped, it would exit 0 with the old fp32 export
        assert len(_errors(failed)) == 1 and "step 'ex' (export)" in _errors(failed)[0]
    assert (run / "ex" / "manifest.json").read_bytes() == old_export  # the old output, never reported as new
    state = json.loads((run / "run-state.json").read_text())
    assert state["ex"]["complete"] is False and state["chk"]["complete"] is False  # so the next run reruns both


def test_a_training_step_that_failed_before_writing_is_run_again_not_resumed(cli, tmp_path, monkeypatch):
    """After a failed attempt with new options, RUN_DIR/t still holds the previous run: resuming it
    with the new options would be refused, so the step starts again."""
    import bigmodel_cli.engine.training.job as train_setup

    recipe, run = tmp_path / "t.toml", tmp_path / "r"
    recipe.write_text('[[steps]]\nname = "t"\ncommand = "train"\nmax-steps = 2\n')
    assert cli("run", recipe, "--out", run, "--compare-rounds", "2").exit_code == 0

    def interrupted(cfg):
        raise OSError(28, "No space left on device", str(run / "t"))  # before anything was written

    with monkeypatch.context() as patch:
        patch.setattr(train_setup, "prepare_training", interrupted)
        assert cli("run", recipe, "--out", run, "--set", "t.lr=0.002").exit_code == 2
    again = _json(cli("run", recipe, "--out", run, "--set", "t.lr=0.002", "--json", "--compare-rounds", "2"))
    assert [s["status"] for s in again["steps"]] == ["ran"]
    assert json.loads((run / "t" / "run.json").read_text())["options"]["lr"] == 0.002


def test_recipe_refuses_steps_that_cannot_run_before_anything_runs(cli, tmp_path):
    recipe = tmp_path / "clash.toml"
    recipe.write_text("""
[[steps]]
name = "t"
command = "train"

[[steps]]
name = "p"
command = "predict"
from = "t"

[[steps]]
name = "x"
command = "eval"
from = "t"

[[steps]]
name = "x.json"
command = "export"
from = "t"

[[steps]]
name = "T"
command = "export"
from = "t"

[[steps]]
name = "run-state"
command = "info"
from = "t"
""")
    for extra in (["--check"], []):  # run --check finds what run would refuse
        result = cli("run", recipe, "--out", tmp_path / "run", *extra)
        assert_one_error_line(result, 'predict needs input = "PATH"', "RUN_DIR/x.json is also the output of step 'x'",
                              "RUN_DIR/T is also the output of step 't'", "RUN_DIR/run-state.json is a file the run keeps")
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_a_directory_or_nested_too_deeply_is_one_error_line(cli, tmp_path):
    import os
    import subprocess
    import sys

    assert_one_error_line(cli("run", tmp_path), "is a directory")
    fifo = tmp_path / "recipe.toml"
    os.mkfifo(fifo)  # opening it to read would wait forever for a writer: a subprocess with a timeout
    proc = subprocess.run([sys.executable, "-m", "bigmodel_cli", "run", str(fifo)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "is not a regular file" in proc.stderr
    fifo.unlink()
    deep = tmp_path / "deep.toml"
    deep.write_text("[[steps]]\nname = 't'\ncommand = 'train'\nx = " + "[" * 3000 + "]" * 3000 + "\n")
    assert_one_error_line(cli("run", deep, "--check"), "nested too deeply")
    assert_one_error_line(cli("train", "--config", deep, "--out", tmp_path / "o"), "nested too deeply")
    shallow = tmp_path / "ok.toml"
    shallow.write_text("[[steps]]\nname = 't'\ncommand = 'train'\n")
    assert_one_error_line(cli("run", shallow, "--check", "--set", "t.epochs=" + "[" * 3000), "nested too deeply")
    assert not (tmp_path / "o").exists()


def test_compare_measures_side_by_side_and_writes_reports(cli, digits_mlp, tmp_path):
    plot, md, page = tmp_path / "t.png", tmp_path / "r.md", tmp_path / "r.html"
    data = _json(cli("compare", digits_mlp / "best", digits_mlp / "last", "--rounds", "3", "--json",
                     "--plot", plot, "--markdown", md, "--html", page))
    first, second = data["rows"]
    assert first["latency_ms_p50_ratio"] == 1.0 and second["params_ratio"] == 1.0
    assert data["backend"] == "torch" and data["metric"] == "accuracy"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| artifact |" in md.read_text() and "t.png" in md.read_text()
    assert "data:image/png;base64," in page.read_text()


def test_compare_refuses_nonsense(cli, digits_mlp, tiny_gpt, tmp_path):
    assert cli("compare", tmp_path / "missing").exit_code == 2
    mixed = cli("compare", digits_mlp, tiny_gpt)
    assert mixed.exit_code == 2 and "different tasks" in mixed.stderr


def test_plot_draws_training_curves(cli, digits_mlp, tmp_path):
    out = tmp_path / "curves.png"
    result = cli("plot", digits_mlp, "--out", out)
    assert result.exit_code == 0 and out.read_bytes()[:4] == b"\x89PNG"
    assert cli("plot", tmp_path).exit_code == 2
