"""Distributed training on CPU: gloo, 2 processes, tiny models.

The multi-process tests start real workers (``bigmodel train --nproc 2`` and ``torchrun``) in
subprocesses; the single-process references run in this process. Stated tolerance: a run on N
processes matches one process with the same global batch to 1e-5 (absolute) in every logged loss
and every weight; measured differences are ~1e-7, i.e. float32 summation order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel_cli.engine.training.launcher import available_cores

TOLERANCE = 1e-5
needs_two_cores = pytest.mark.skipif(available_cores() < 2, reason="two worker processes need two CPU cores")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # let the launcher split the cores between the ranks
    return env


def _bigmodel(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigmodel_cli", "train", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _steps(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r]


def _weights(artifact: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(artifact / "model.safetensors")


def _assert_same_training(a: Path, b: Path, tolerance: float = TOLERANCE) -> None:
    steps_a, steps_b = _steps(a), _steps(b)
    assert [r["step"] for r in steps_a] == [r["step"] for r in steps_b]
    for ra, rb in zip(steps_a, steps_b):
        assert abs(ra["loss"] - rb["loss"]) < tolerance, (ra["step"], ra["loss"], rb["loss"])
    wa, wb = _weights(a / "last"), _weights(b / "last")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() < tolerance, name


# An MLP on the digits: 1,439 training samples in micro-batches of 33, so the global micro-batch
# splits 17/16 between two ranks, and an epoch (44 micro-batches) ends on a ragged batch of 20.
# In-process references use one thread, as each of the two ranks does (and a shared, busy machine
# slows many-threaded tiny matmuls down badly).
MLP = dict(model="mlp", hidden_sizes=[16], batch_size=33, grad_accum=2, seed=3, threads=1)
MLP_FLAGS = ["--model", "mlp", "--hidden-sizes", "16", "--batch-size", "33", "--grad-accum", "2", "--seed", "3"]


@needs_two_cores
def test_ddp_matches_single_process_training_with_the_same_global_batch(tmp_path):
    from bigmodel_cli import TrainConfig, open_artifact, train

    single = train(TrainConfig(**MLP, max_steps=30, eval_every=30, out=str(tmp_path / "one")))
    result = _bigmodel(*MLP_FLAGS, "--max-steps", 30, "--eval-every", 30, "--out", tmp_path / "two",
                       "--nproc", 2, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # one JSON document: only rank 0 printed
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    _assert_same_training(single.run_dir, tmp_path / "two")
    # Only rank 0 wrote: one line per step, and regular artifacts that verify and record the run.
    assert [r["step"] for r in _steps(tmp_path / "two")] == list(range(1, 31))
    manifest = open_artifact(tmp_path / "two" / "last").manifest
    assert manifest["runtime"]["world_size"] == 2 and manifest["stage"] == "train"
    assert abs(manifest["metrics"]["val_accuracy"] - single.last_metrics["val_accuracy"]) < TOLERANCE


GPT_ARGS = {"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 32}


@needs_two_cores
def test_fsdp_via_torchrun_matches_one_process_and_its_artifact_evaluates_to_the_last_logged_metric(tmp_path, corpus):
    from bigmodel_cli import TrainConfig, evaluate_artifact, open_artifact, train

    # batch 5 over 2 ranks: slices of 3 and 2; the GPT's head is tied to its embedding.
    options = dict(model="gpt", model_args=GPT_ARGS, data=f"text:{corpus}", block_size=16, batch_size=5,
                   grad_accum=2, max_steps=8, eval_every=4, eval_windows=8, seed=1, threads=1)
    single = train(TrainConfig(**options, out=str(tmp_path / "one")))
    out = tmp_path / "fsdp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "bigmodel_cli", "train", "--model", "gpt", "--model-args", json.dumps(GPT_ARGS),
               "--data", f"text:{corpus}", "--block-size", "16", "--batch-size", "5", "--grad-accum", "2",
               "--max-steps", "8", "--eval-every", "4", "--eval-windows", "8", "--seed", "1",
               "--strategy", "fsdp", "--out", str(out), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=_env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["strategy"] == "fsdp"  # rank 1 printed nothing
    _assert_same_training(single.run_dir, out)

    artifact = open_artifact(out / "last")  # a regular, full artifact: hashes verify, one copy of tied weights
    assert artifact.manifest["runtime"]["strategy"] == "fsdp"
    assert sorted(_weights(out / "last")) == sorted(_weights(single.last_dir))
    last_logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r.get("event") == "eval"][-1]
    reloaded = evaluate_artifact(artifact, split="val", limit=8, backend="torch")
    assert reloaded["loss"] == pytest.approx(last_logged["val_loss"], abs=1e-6)


LLAMA_ARGS = {"n_layer": 2, "n_embd": 16, "n_head": 4, "n_kv_head": 2, "block_size": 32, "tie_weights": False}


@needs_two_cores
def test_llama_with_grouped_query_attention_trains_on_two_processes_like_one(tmp_path, corpus):
    """The Llama family through the same data-parallel path: RoPE's frequencies are not weights and
    GQA's key/value heads are narrower than the queries; DDP on 2 ranks matches one process."""
    from bigmodel_cli import TrainConfig, open_artifact, train

    options = dict(model="llama", model_args=LLAMA_ARGS, data=f"text:{corpus}", block_size=16, batch_size=4,
                   max_steps=6, eval_every=6, eval_windows=4, seed=2, threads=1)
    single = train(TrainConfig(**options, out=str(tmp_path / "one")))
    result = _bigmodel("--model", "llama", "--model-args", json.dumps(LLAMA_ARGS), "--data", f"text:{corpus}",
                       "--block-size", 16, "--batch-size", 4, "--max-steps", 6, "--eval-every", 6,
                       "--eval-windows", 4, "--seed", 2, "--nproc", 2, "--out", tmp_path / "two", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["world_size"] == 2
    _assert_same_training(single.run_dir, tmp_path / "two")
    assert open_artifact(tmp_path / "two" / "last").model_spec["arch"] == "llama"


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found += [int(entry.name), *_descendants(int(entry.name))]
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_the_failure_named_is_the_root_cause_not_its_consequences():
    """A rank killed from outside makes its peers abort (gloo) or get stopped (SIGTERM) within the
    same second: the one line names the killed rank, whatever the rank numbers."""
    import signal
    from types import SimpleNamespace as F

    from bigmodel_cli.engine.training.launcher import root_cause

    same_second = 1_700_000_000
    killed = {0: F(exitcode=-signal.SIGABRT, timestamp=same_second),
              1: F(exitcode=-signal.SIGKILL, timestamp=same_second),
              2: F(exitcode=-signal.SIGTERM, timestamp=same_second)}
    assert root_cause(killed) == 1
    raised = {0: F(exitcode=-signal.SIGABRT, timestamp=same_second), 1: F(exitcode=1, timestamp=same_second)}
    assert root_cause(raised) == 1
    # Failures seconds apart: the earlier one, among failures of the same kind.
    apart = {0: F(exitcode=1, timestamp=same_second + 5), 1: F(exitcode=1, timestamp=same_second)}
    assert root_cause(apart) == 1


@needs_two_cores
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_dying_rank_stops_the_run_cleanly_and_it_resumes_on_one_process(tmp_path):
    from bigmodel_cli import TrainConfig, open_artifact, train

    out = tmp_path / "run"
    # Rank 1 is killed as soon as the first checkpoint (step 2) exists; a checkpoint every other
    # step keeps the run busy long enough that it is still going then.
    steps, schedule = 60, dict(eval_every=20, checkpoint_every=2)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "bigmodel_cli", "train", *MLP_FLAGS, "--max-steps", str(steps),
         "--eval-every", "20", "--checkpoint-every", "2", "--out", str(out), "--nproc", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline, rank1 = time.monotonic() + 150, None
        while rank1 is None or not list((out / "checkpoints").glob("step-*")):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run never wrote a checkpoint"
            rank1 = rank1 or _rank_pid(launcher.pid, 1)
            time.sleep(0.01)
        os.kill(rank1, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, stderr
    assert "rank 1 died (SIGKILL)" in stderr and "continue with --resume" in stderr
    assert "Traceback" not in stderr
    # Nothing half-written: no last/ artifact, no staging directories, and what is there verifies.
    assert not (out / "last").exists()
    assert not [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    if (out / "best").exists():
        open_artifact(out / "best")

    # The checkpoint written by two processes resumes in one, and ends where one process would.
    resumed = train(TrainConfig(**MLP, max_steps=steps, **schedule, out=str(out), resume=True))
    assert resumed.resumed_from is not None and 2 <= resumed.resumed_from < steps
    reference = train(TrainConfig(**MLP, max_steps=steps, **schedule, out=str(tmp_path / "ref")))
    _assert_same_training(reference.run_dir, out)


SCALAR_MODEL = """
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.temperature = nn.Parameter(torch.tensor(1.0))  # 0-d: FSDP cannot split it

    def forward(self, x):
        return self.fc(x.flatten(1)) / self.temperature
"""


@pytest.mark.parametrize("case", ["too-many", "zero", "unknown-strategy", "unshardable", "resume-nothing"])
def test_bad_distributed_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, case):
    model = tmp_path / "scaled.py"
    model.write_text(SCALAR_MODEL)
    out = tmp_path / "out"
    nproc = min(2, available_cores())  # the checks hold for one process too
    args, expected = {
        "too-many": (["--nproc", available_cores() + 1], "more than the"),
        "zero": (["--nproc", 0], "--nproc must be at least 1"),
        "unknown-strategy": (["--nproc", nproc, "--strategy", "zero3"], "unknown --strategy 'zero3'"),
        "unshardable": (["--nproc", nproc, "--strategy", "fsdp", "--model", f"{model}:Scaled"], "cannot shard 0-d parameter(s) temperature"),
        "resume-nothing": (["--nproc", nproc, "--resume"], "has no run.json"),
    }[case]
    if case == "resume-nothing":
        out.mkdir()
    result = cli("train", *args, "--max-steps", 2, "--out", out)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_full_optimizer_state_round_trips_between_index_and_name_keys():
    """FSDP's full optimizer state is keyed by parameter name; checkpoints use the single-process
    layout keyed by index. The conversion must be exact in both directions."""
    import torch

    from bigmodel_cli.config import TrainConfig
    from bigmodel_cli.engine.training.distributed import _optimizer_by_index, _optimizer_by_name
    from bigmodel_cli.engine.training.loop import make_optimizer
    from bigmodel_cli.models import build_model

    model = build_model({"arch": "gpt", **GPT_ARGS, "vocab_size": 256})
    optimizer = make_optimizer(TrainConfig(), [p for p in model.parameters()])
    model(torch.randint(0, 256, (2, 8))).float().mean().backward()
    optimizer.step()
    by_index = optimizer.state_dict()
    by_name = _optimizer_by_name(by_index, optimizer, model)
    assert "tok_emb.weight" in by_name["state"] and "lm_head.weight" not in by_name["state"]  # tied: one entry
    back = _optimizer_by_index(by_name)
    assert back["param_groups"] == by_index["param_groups"]
    assert sorted(back["state"]) == sorted(by_index["state"])
    for pid, entries in by_index["state"].items():
        for key, value in entries.items():
            assert torch.equal(back["state"][pid][key], value)


@needs_two_cores
def test_qat_finetune_on_two_processes_matches_one(tmp_path, digits_mlp):
    """quantize --qat --nproc 2: the fine-tuning with int8 simulated runs as two data-parallel ranks
    (the launching process's calibration handed to them) and trains exactly like one process."""
    from bigmodel_cli import TrainConfig, open_artifact
    from bigmodel_cli.engine.compress.quantize.command import QuantizeOptions, quantize_artifact

    train = TrainConfig(batch_size=33, seed=3, threads=1)  # the rate: QAT's default on both sides
    quantize_artifact(open_artifact(digits_mlp / "best"), tmp_path / "q1",
                      QuantizeOptions(qat=True, finetune_steps=6, finetune_dir=str(tmp_path / "one"), train=train,
                                      bench=False, threads=1))
    result = subprocess.run([sys.executable, "-m", "bigmodel_cli", "quantize", str(digits_mlp / "best"), "--out",
                             str(tmp_path / "q2"), "--qat", "--finetune-steps", "6", "--batch-size", "33", "--seed", "3",
                             "--finetune-dir", str(tmp_path / "two"), "--nproc", "2", "--no-bench", "--json"],
                            capture_output=True, text=True, timeout=240, env=_env())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["report"]["qat"]["processes"] == 2
    _assert_same_training(tmp_path / "one", tmp_path / "two")
