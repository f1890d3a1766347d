"""The trainer: it learns, it resumes exactly, it stops on bad numbers, it writes what it says."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bigmodel_cli import TrainConfig, evaluate_artifact, open_artifact, train
from bigmodel_cli.engine.training.loop import lr_at, run_job
from bigmodel_cli.engine.training.job import prepare_training
from bigmodel_cli.errors import NonFiniteLoss, UserError


def test_default_digits_mlp_reaches_95_percent_test_accuracy(digits_mlp):
    result = evaluate_artifact(open_artifact(digits_mlp), split="test")
    assert result["accuracy"] >= 0.95
    assert result["params"] == result["nonzero_params"] > 0


def test_run_directory_layout(digits_mlp):
    for name in ("best/manifest.json", "last/manifest.json", "metrics.jsonl", "run.json"):
        assert (digits_mlp / name).is_file()
    lines = [json.loads(l) for l in (digits_mlp / "metrics.jsonl").read_text().splitlines()]
    assert any(l.get("event") == "eval" for l in lines) and all("step" in l for l in lines)
    checkpoints = sorted((digits_mlp / "checkpoints").iterdir())
    assert 1 <= len(checkpoints) <= 2  # --keep-checkpoints 2
    assert {p.name for p in checkpoints[-1].iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}


def test_reloaded_artifact_gives_identical_outputs(digits_mlp):
    a, b = open_artifact(digits_mlp / "last").build_model(), open_artifact(digits_mlp / "last").build_model()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(a(x), b(x))


class _Interrupt(Exception):
    pass


def _stop_at(step):
    def progress(event, **info):
        if event == "step" and info["step"] == step:
            raise _Interrupt()
    return progress


@pytest.mark.parametrize("model,extra", [("mlp", {"model_args": {"dropout": 0.2}}),
                                         ("gpt", {"preset": "nano", "block_size": 16, "batch_size": 4})])
def test_resume_continues_from_the_checkpoint_and_matches(tmp_path, corpus, model, extra):
    data = {"data": f"text:{corpus}"} if model == "gpt" else {}
    common = dict(model=model, max_steps=12, checkpoint_every=4, eval_every=4, eval_windows=4, seed=3, **extra, **data)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **common))
    with pytest.raises(_Interrupt):
        run_job(prepare_training(TrainConfig(out=str(tmp_path / "cut"), **common)), _stop_at(10))
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())[-1] == "step-00000008"
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **common))
    assert resumed.resumed_from == 8 and resumed.steps == 12
    a = load_file(whole.last_dir / "model.safetensors")
    b = load_file(resumed.last_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "event" not in json.loads(l)]
    assert steps == list(range(1, 13))  # no duplicated or missing lines after the resume


def test_resume_refuses_changed_options(tmp_path):
    train(TrainConfig(out=str(tmp_path / "r"), max_steps=2))
    with pytest.raises(UserError, match=r"options differ.*lr"):
        train(TrainConfig(out=str(tmp_path / "r"), max_steps=2, lr=0.5, resume=True))


def test_grad_accumulation_equals_a_bigger_batch(tmp_path):
    common = dict(model="mlp", max_steps=3, grad_clip=0.0, seed=1)
    big = train(TrainConfig(out=str(tmp_path / "big"), batch_size=32, **common))
    acc = train(TrainConfig(out=str(tmp_path / "acc"), batch_size=16, grad_accum=2, **common))
    assert big.steps == acc.steps == 3
    # Not the same samples (batches are drawn per micro-step), so compare the learning, not the bits:
    assert abs(big.last_metrics["val_loss"] - acc.last_metrics["val_loss"]) < 0.2


def test_gpt_learns_the_corpus(tiny_gpt):
    metrics = json.loads((tiny_gpt / "best" / "manifest.json").read_text())["metrics"]
    assert metrics["val_loss"] < 4.0  # uniform over 256 bytes would be ln(256) = 5.55
    result = evaluate_artifact(open_artifact(tiny_gpt))
    assert {"loss", "perplexity", "bits_per_byte"} <= set(result)


def test_bf16_mixed_precision_trains(tmp_path):
    result = train(TrainConfig(out=str(tmp_path / "bf16"), max_steps=30, precision="bf16-mixed"))
    assert result.runtime["precision"] == "bf16-mixed"
    assert result.last_metrics["val_accuracy"] > 0.5


def test_early_stopping(tmp_path):
    result = train(TrainConfig(out=str(tmp_path / "es"), epochs=50, patience=1, min_delta=10.0))
    assert result.stopped_early and result.steps < 50 * 23


def test_a_training_deadline_stops_like_early_stopping_and_resume_finishes_bit_exact(tmp_path):
    """training_deadline (optimize's time budget): a run past it stops after its step with a checkpoint,
    best/ and last/; --resume without a deadline trains on to exactly the uninterrupted run's weights."""
    from bigmodel_cli.engine.training.loop import training_deadline

    def cfg(name, **extra):
        return TrainConfig(out=str(tmp_path / name), max_steps=6, eval_every=3, seed=1, **extra)

    with training_deadline(0.0) as deadline:  # already over: the first step is the last
        cut = train(cfg("cut"))
    assert deadline.reached and cut.steps == 1 and not cut.stopped_early
    assert (tmp_path / "cut" / "best").is_dir() and (tmp_path / "cut" / "last").is_dir()
    events = [json.loads(line).get("event") for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert "deadline" in events
    resumed = train(cfg("cut", resume=True))
    whole = train(cfg("whole"))
    assert resumed.steps == whole.steps == 6
    a, b = load_file(str(tmp_path / "cut" / "last" / "model.safetensors")), load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with training_deadline(3600.0) as later:  # not reached: the run is the one it would have been
        assert train(cfg("within")).steps == 6
    assert not later.reached


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    job = prepare_training(TrainConfig(out=str(tmp_path / "nan"), max_steps=10, checkpoint_every=2, eval_every=2))
    real_loss = job.task.loss
    calls = {"n": 0}

    def loss_fn(model, x, y):
        calls["n"] += 1
        loss = real_loss(model(x), y)
        return loss * float("nan") if calls["n"] == 5 else loss

    job.loss_fn = loss_fn
    with pytest.raises(NonFiniteLoss, match=r"step 4: the loss is not finite.*step-00000004"):
        run_job(job)
    assert (tmp_path / "nan" / "checkpoints" / "step-00000004").is_dir()
    assert not (tmp_path / "nan" / "last").exists()


def test_skip_nonfinite_skips_bad_batches(tmp_path):
    job = prepare_training(TrainConfig(out=str(tmp_path / "skip"), max_steps=6, skip_nonfinite=1))
    real_loss = job.task.loss
    calls = {"n": 0}

    def loss_fn(model, x, y):
        calls["n"] += 1
        return real_loss(model(x), y) * (float("inf") if calls["n"] == 2 else 1.0)

    job.loss_fn = loss_fn
    result = run_job(job)
    assert result.steps == 6
    events = [json.loads(l) for l in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "skipped_nonfinite" for e in events) == 1


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(50, TrainConfig(lr=1.0, schedule="linear"), 100) == pytest.approx(0.5)


def test_user_model_file_trains_and_reloads(tmp_path, monkeypatch):
    from bigmodel_cli.models import user

    file = tmp_path / "net.py"
    file.write_text("import torch\ndef make(width=16):\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                    "torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))\n")
    result = train(TrainConfig(model=f"{file}:make", model_args={"width": 24}, max_steps=20, out=str(tmp_path / "u")))
    artifact = open_artifact(result.best_dir)
    assert artifact.model_spec == {"arch": "user", "file": "model.py", "entry": "make", "args": {"width": 24}}
    assert (result.best_dir / "model.py").read_text() == file.read_text()
    monkeypatch.setattr(user, "_TRUSTED", set())
    monkeypatch.setattr(user, "_TRUST_ALL", False)
    monkeypatch.delenv("BIGMODEL_TRUST_MODEL_CODE", raising=False)
    with pytest.raises(UserError, match="--trust-model-code"):
        artifact.build_model()
    monkeypatch.setenv("BIGMODEL_TRUST_MODEL_CODE", "1")
    assert artifact.build_model()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_config_problems_are_reported_together():
    with pytest.raises(UserError) as info:
        prepare_training(TrainConfig(lr=-1, batch_size=0, optimizer="lion"))
    text = str(info.value)
    assert "3 problems" in text and "--lr" in text and "--batch-size" in text and "lion" in text
