"""Issue 17: --augment (policies, purity, resume, ranks, bad input) and the defaults that prune and
distill choose (pure functions, checked against what docs/prune.md and docs/distill.md say)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bigmodel_cli import TrainConfig, train
from bigmodel_cli.data import load_dataset, parse_data_arg
from bigmodel_cli.data.augment import DEFAULTS, POLICIES, augment_batch, parse_augment, policy_for
from bigmodel_cli.engine.compress.distill.student import student_budget
from bigmodel_cli.engine.compress.prune.plan import finetune_plan, original_lr
from bigmodel_cli.engine.core.tasks import make_task
from conftest import assert_one_error_line


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_data_arg("digits"))


# --------------------------------------------------------------------------- defaults (pure)


def test_prune_default_schedule_is_what_docs_prune_md_says():
    # docs/prune.md, "Defaults": 90 % with --finetune-epochs 5 → 4 cubic steps of 20 epochs at 3× the original rate.
    plan = finetune_plan(0.9, 5, 1e-3)
    assert (plan["steps"], plan["epochs_per_step"], plan["lr"], plan["gradual"]) == (4, 20, pytest.approx(3e-3), True)
    assert "4 cubic steps" in plan["why"] and "original run's" in plan["why"]
    assert finetune_plan(0.85, 20, 2e-3)["steps"] == 3
    assert finetune_plan(0.85, 30, 2e-3)["epochs_per_step"] == 30  # a larger budget is kept
    assert finetune_plan(0.97, 5, 1e-3)["steps"] == 6
    assert finetune_plan(0.9, 5, 5e-3)["lr"] == pytest.approx(1e-2)  # capped
    # Low sparsity: one step, the original run's rate (not a fixed default).
    low = finetune_plan(0.5, 5, 2e-3)
    assert (low["steps"], low["epochs_per_step"], low["lr"], low["gradual"]) == (1, 5, 2e-3, False)
    # The user's own --steps / --lr always win.
    mine = finetune_plan(0.9, 5, 1e-3, steps=2, lr=5e-4)
    assert (mine["steps"], mine["epochs_per_step"], mine["lr"]) == (2, 5, 5e-4)
    assert finetune_plan(0.9, 5, 1e-3, steps=2)["lr"] == 1e-3  # explicit steps: not gradual-by-default
    assert finetune_plan(0.9, 5, None)["lr"] == pytest.approx(3e-3) and "trainer's default" in finetune_plan(0.9, 5, None)["why"]


def test_the_original_learning_rate_is_read_from_the_manifest_options():
    assert original_lr({"lr": 0.002}) == 0.002
    assert original_lr({"prune": {}, "finetune": {"lr": 0.003}}) == 0.003
    assert original_lr({"lr": "x"}) is None and original_lr(None) is None and original_lr({"lr": float("nan")}) is None


def test_distill_default_budget_is_what_docs_distill_md_says():
    small = student_budget("classification", 2_410, 1_439, None, None, None)
    assert (small["epochs"], small["max_steps"], small["lr"]) == (60, None, 3e-3)
    big = student_budget("classification", 300_000, 50_000, None, None, None)
    assert (big["epochs"], big["lr"]) == (20, 1e-3)
    lm = student_budget("language-modeling", 50_000, 100_000, None, None, None)
    assert (lm["epochs"], lm["max_steps"], lm["lr"]) == (None, None, 1e-3)
    mine = student_budget("classification", 2_410, 1_439, 5, None, 1e-2)
    assert (mine["epochs"], mine["lr"]) == (5, 1e-2)


def test_prune_reports_the_chosen_schedule_and_an_explicit_steps_wins(cli, digits_mlp, tmp_path):
    out = tmp_path / "p"
    result = cli("prune", digits_mlp, "--sparsity", "0.9", "--finetune-epochs", "1", "--out", out, "--no-bench",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["defaults"]["steps"] == 4 and len(report["schedule"]) == 4
    assert report["defaults"]["lr"] == pytest.approx(3e-3)
    assert json.loads((out / "best" / "manifest.json").read_text())["options"]["finetune"]["lr"] == pytest.approx(3e-3)
    result = cli("prune", digits_mlp, "--sparsity", "0.9", "--finetune-epochs", "1", "--steps", "1", "--lr", "1e-4",
                 "--out", tmp_path / "q", "--no-bench", "--json")
    report = json.loads(result.stdout)
    assert len(report["schedule"]) == 1 and report["defaults"]["lr"] == 1e-4


# --------------------------------------------------------------------------- the policies


def test_an_augmented_batch_is_a_pure_function_of_seed_and_step(digits):
    policy = policy_for(parse_augment("shift=1,rotate=10,scale=0.1,noise=0.05,cutout=2"), "classification",
                        digits.input_shape)
    task = make_task(digits, 64, seed=3, augment=policy)
    plain = make_task(digits, 64, seed=3)
    x1, y1 = task.batch(17)
    x2, y2 = task.batch(17)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    px, py = plain.batch(17)
    assert torch.equal(y1, py) and not torch.equal(x1, px)  # same samples, changed pixels
    assert not torch.equal(task.batch(18)[0][:8], x1[:8])


def test_ranks_slices_of_the_augmented_global_batch_are_what_one_process_sees(digits):
    policy = policy_for(parse_augment("default,noise=0.1,mixup=0.4"), "classification", digits.input_shape)
    task = make_task(digits, 33, seed=0, augment=policy)
    for step in (0, 21, 22):  # 22: the ragged end of the first epoch
        x, y = task.batch(step)
        for world in (2, 3):
            for rank in range(world):
                rx, ry = task.batch(step, rank, world)
                assert torch.equal(rx, x[rank::world]) and torch.equal(ry, y[rank::world])


def test_mixup_gives_soft_targets_the_loss_takes(digits):
    task = make_task(digits, 16, augment={"mixup": 0.4})
    x, y = task.batch(0)
    assert y.shape == (16, 10) and torch.allclose(y.sum(1), torch.ones(16))
    assert bool((y.max(1).values >= 0.5).all())  # each row stays mostly itself
    logits = torch.randn(16, 12)  # a model with spare outputs
    assert torch.isfinite(task.loss(logits, y))


def test_shift_moves_whole_pixels_and_flip_happens_only_when_asked():
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    out, _ = augment_batch(x, torch.zeros(64, dtype=torch.long), {"shift": 2}, seed=0, micro_step=0, num_classes=10)
    peaks = out.flatten(1).argmax(1)
    rows, cols = peaks // 8, peaks % 8
    assert bool(((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all())
    assert torch.allclose(out.flatten(1).max(1).values, torch.ones(64))  # whole-pixel moves: nothing blurred
    assert "flip" not in DEFAULTS["image"] and "flip" in POLICIES


def test_augmented_training_resumes_bit_exactly(tmp_path):
    def cfg(out: Path, resume: bool = False) -> TrainConfig:
        return TrainConfig(model="cnn", model_args={"channels": [4], "hidden_sizes": [16]}, augment="default,noise=0.05",
                           max_steps=30, checkpoint_every=10, eval_every=10, seed=5, threads=1, out=str(out),
                           resume=resume)

    train(cfg(tmp_path / "whole"))

    def crash_at_step_23(event: str, **info) -> None:
        if event == "step" and info["step"] == 23:
            raise KeyboardInterrupt  # as if the process died after step 23; the checkpoint is step 20's

    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut"), crash_at_step_23)
    assert not (tmp_path / "cut" / "last").exists()
    result = train(cfg(tmp_path / "cut", resume=True))
    assert result.resumed_from == 20
    a = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "whole" / "last" / "manifest.json").read_text())
    assert manifest["options"]["augment"] == "default,noise=0.05"
    assert manifest["augment"] == {"shift": 1, "rotate": 10, "scale": 0.1, "noise": 0.05}


def test_augment_from_a_toml_file_and_on_tabular_data(cli, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5))
    rows = ["a,b,c,d,e,label"] + [",".join(f"{v:.4f}" for v in r) + f",{int(r[0] > 0)}" for r in x]
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    options = tmp_path / "train.toml"
    options.write_text(f'[train]\ndata = "csv:{table}"\ntarget = "label"\naugment = "default"\nepochs = 2\n')
    result = cli("train", "--config", options, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "best" / "manifest.json").read_text())
    assert manifest["augment"] == DEFAULTS["tabular"]
    result = cli("train", "--data", f"csv:{table}", "--target", "label", "--augment", "shift=1", "--out", tmp_path / "x")
    assert_one_error_line(result, "shift", "tabular", "noise, mixup")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value, fragments", [
    ("blur=1", ("unknown policy 'blur'", "shift, rotate, scale, cutout, flip, noise, mixup")),
    ("rotate=181", ("rotate=181", "between 0 and 180")),
    ("noise=-0.1", ("noise=-0.1", "between 0 and 5")),
    ("shift=8", ("shift=8", "8×8", "at most 7")),
    ("shift=1.5", ("whole number",)),
    ("shift=1,shift=2", ("twice",)),
    ("rotate=abc", ("rotate=abc", "a number")),
])
def test_bad_augment_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, value, fragments):
    result = cli("train", "--augment", value, "--epochs", "1", "--out", tmp_path / "run")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_augment_on_text_is_refused_and_so_is_mixup_in_distill(cli, tmp_path, corpus, digits_mlp):
    result = cli("train", "--model", "gpt", "--preset", "nano", "--data", f"text:{corpus}", "--augment", "default",
                 "--out", tmp_path / "run")
    assert_one_error_line(result, "not defined for language models", "shift")
    result = cli("distill", "--teacher", digits_mlp, "--student-config", '{"hidden_sizes": [8]}',
                 "--augment", "mixup=0.2", "--out", tmp_path / "d")
    assert_one_error_line(result, "mixup mixes labels")
    assert not (tmp_path / "run").exists() and not (tmp_path / "d").exists()


def test_prune_fine_tuning_and_distill_take_augment(cli, digits_mlp, tmp_path):
    result = cli("prune", digits_mlp, "--sparsity", "0.5", "--finetune-epochs", "1", "--augment", "shift=1",
                 "--out", tmp_path / "p", "--no-bench", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "p" / "best" / "manifest.json").read_text())
    assert manifest["options"]["finetune"]["augment"] == "shift=1"
    result = cli("distill", "--teacher", digits_mlp, "--student-config", '{"hidden_sizes": [8]}', "--epochs", "1",
                 "--augment", "noise=0.1", "--bench-iterations", "0", "--out", tmp_path / "d", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["distill"]["augment"] == {"noise": 0.1}


def test_train_prints_its_plan_before_the_run_and_an_estimate(cli, tmp_path):
    result = cli("train", "--epochs", "1", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "plan: 9,610 parameters, 64 samples a step, 23 steps" in result.stderr
    assert "estimate: about" in result.stderr
    result = cli("train", "--epochs", "1", "--out", tmp_path / "run2", "--json")
    json.loads(result.stdout)  # stdout stays one JSON document
