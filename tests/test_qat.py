"""bigmodel quantize --qat: fine-tuning with int8 simulated, exported as static QDQ int8 whose
simulation agrees with ONNX Runtime, the fp32 shadow weights kept, four-row report, and bad input
(exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line

FAST = ("--iterations", "2", "--warmup", "0")

# BatchNorm, Conv and Linear: the user model the issue names.
BN_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], 1, 8, 8)
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))
'''

# A weight used by a bare matmul: no Linear or Conv for the fake-quant pass to wrap.
BARE_MATMUL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 10) * 0.1)

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.w
'''


def _user(root: Path, code: str, steps: int = 20) -> Path:
    from bigmodel_cli import TrainConfig, train

    root.mkdir(parents=True, exist_ok=True)
    (root / "net.py").write_text(code)
    train(TrainConfig(model=f"{root / 'net.py'}:Net", max_steps=steps, out=str(root / "run"), seed=0))
    return root / "run" / "best"


def _ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def qat_mlp(cli, digits_mlp, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("qat") / "q"
    report = _ok(cli("quantize", digits_mlp / "best", "--out", out, "--qat", "--finetune-steps", 30, "--json", *FAST))
    return out, report


def test_qat_simulation_agrees_with_onnx_runtime(qat_mlp):
    _, result = qat_mlp
    agreement = result["report"]["qat"]["simulated_vs_onnx"]
    assert agreement["predictions"] > 100
    assert agreement["top1_agreement"] >= 0.995
    assert abs(agreement["simulated"]["accuracy"] - agreement["onnx"]["accuracy"]) <= 0.002


def test_qat_artifact_holds_int8_onnx_and_fp32_shadow_weights(qat_mlp, digits_mlp):
    import onnx
    from bigmodel_cli.artifact import open_artifact

    out, result = qat_mlp
    report = result["report"]
    assert {"before", "ptq", "after"} <= set(report) and "accuracy" in report["ptq"]
    assert "latency_ms_p50" in report["ptq"] and "latency_ms_p50" in report["after"]
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    artifact = open_artifact(out)
    assert artifact.stage == "quantize" and artifact.has_weights
    model = artifact.build_model()  # the shadow weights load into the plain fp32 architecture
    x = np.zeros((2, 64), dtype=np.float32)
    import torch

    assert model(torch.from_numpy(x)).shape == (2, 10)
    assert result["quantization"]["per_channel"] is True and result["quantization"]["qat"]["layers"]


def test_qat_default_learning_rate_is_a_tenth_of_the_training_rate(qat_mlp, digits_mlp):
    _, result = qat_mlp
    trained_with = json.loads((digits_mlp / "best" / "manifest.json").read_text())["options"]["lr"]
    assert result["report"]["qat"]["lr"] == pytest.approx(trained_with / 10)


def test_qat_exported_activation_scales_are_the_simulated_ones(qat_mlp):
    import onnx
    from onnx import numpy_helper

    out, result = qat_mlp
    graph = onnx.load(str(out / "model.onnx")).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    exported = [(float(values[n.input[1]]), int(values[n.input[2]])) for n in graph.node if n.op_type == "QuantizeLinear"]
    simulated = result["quantization"]["qat"]["activations"]
    assert simulated
    for q in simulated.values():
        assert any(np.isclose(scale, q["scale"], rtol=1e-6) and zp == q["zero_point"] for scale, zp in exported), (q, exported)


def test_qat_user_model_with_batchnorm_conv_linear(cli, tmp_path):
    # Trained past coin-flip logits: a half-trained model's near-tied logits land on either side of
    # one output quantization step (a tie in the simulation, 0.009 apart in ORT), which is rounding,
    # not a disagreement of the two models.
    source = _user(tmp_path / "bn", BN_MODEL, steps=80)
    result = _ok(cli("--trust-model-code", "quantize", source, "--out", tmp_path / "q", "--qat",
                     "--finetune-steps", 10, "--json", "--no-bench"))
    # ORT folds the BatchNorm into the Conv; per-channel symmetric weights make the unfolded
    # simulation the same grid, so the two agree as for any model.
    agreement = result["report"]["qat"]["simulated_vs_onnx"]
    assert agreement["top1_agreement"] >= 0.995
    assert abs(agreement["simulated"]["accuracy"] - agreement["onnx"]["accuracy"]) <= 0.002
    assert (tmp_path / "q" / "model.py").is_file() and (tmp_path / "q" / "model.safetensors").is_file()


def test_qat_cnn_agrees_with_onnx_runtime(cli, digits_cnn, tmp_path):
    result = _ok(cli("quantize", digits_cnn / "best", "--out", tmp_path / "q", "--qat", "--finetune-steps", 10,
                     "--json", "--no-bench"))
    agreement = result["report"]["qat"]["simulated_vs_onnx"]
    assert agreement["top1_agreement"] >= 0.995
    assert abs(agreement["simulated"]["accuracy"] - agreement["onnx"]["accuracy"]) <= 0.002


def test_qat_llama(cli, corpus, tmp_path):
    from bigmodel_cli import TrainConfig, train

    train(TrainConfig(model="llama", preset="tiny", data=f"text:{corpus}", block_size=32, batch_size=8, max_steps=5,
                      eval_windows=4, out=str(tmp_path / "llama"), seed=0, threads=1,
                      model_args={"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 64}))
    result = _ok(cli("quantize", tmp_path / "llama" / "best", "--out", tmp_path / "q", "--qat", "--finetune-steps", 3,
                     "--batch-size", 8, "--calib-samples", 8, "--limit", 8, "--json", "--no-bench"))
    assert "perplexity" in result["report"]["after"] and result["quantization"]["qat"]["layers"]
    # RMSNorm exports as plain ops (no LayerNormalization): the placement follows attention, not the norm.
    assert "weight layers" in result["quantization"]["qat"]["placement"]
    assert result["report"]["qat"]["simulated_vs_onnx"]["top1_agreement"] >= 0.995


def test_qat_language_model_simulation_agrees_with_onnx_runtime(cli, tiny_gpt, tmp_path):
    result = _ok(cli("quantize", tiny_gpt / "best", "--out", tmp_path / "q", "--qat", "--finetune-steps", 5,
                     "--batch-size", 8, "--calib-samples", 8, "--limit", 8, "--json", "--no-bench"))
    assert "perplexity" in result["report"]["after"] and "perplexity" in result["report"]["ptq"]
    agreement = result["report"]["qat"]["simulated_vs_onnx"]
    assert agreement["predictions"] >= 8 * 16 and agreement["top1_agreement"] >= 0.995
    simulated, onnx = agreement["simulated"]["perplexity"], agreement["onnx"]["perplexity"]
    assert abs(onnx / simulated - 1) <= 0.002
    # The export quantizes what the simulation simulates: the weight layers, not attention's products.
    assert "weight layers" in result["quantization"]["qat"]["placement"]
    assert not any(name.endswith("(output)") for name in result["quantization"]["qat"]["activations"])


@pytest.mark.parametrize("extra, fragments", [
    (("--qat",), ("--finetune-epochs",)),
    (("--qat", "--finetune-epochs", 0), ("--finetune-epochs",)),
    (("--qat", "--finetune-steps", 5, "--mode", "weight-only"), ("--qat", "weight-only")),
    (("--qat", "--finetune-steps", 5, "--mode", "dynamic"), ("--qat", "dynamic")),
    (("--finetune-steps", 5), ("--qat",)),
    (("--qat", "--finetune-steps", 5, "--lr", "nan"), ("--lr",)),
    (("--qat", "--finetune-steps", 5, "--lr", 0), ("--lr", "positive")),
    (("--lr", 0.01), ("--lr", "--qat")),
    (("--nproc", 2), ("--nproc", "--qat")),
    (("--qat", "--finetune-steps", 5, "--nproc", 4096), ("--nproc 4096", "CPU cores")),
])
def test_qat_bad_options(cli, digits_mlp, tmp_path, extra, fragments):
    out = tmp_path / "q"
    assert_one_error_line(cli("quantize", digits_mlp / "best", "--out", out, *extra), *fragments)
    assert not out.exists()


def test_qat_on_onnx_artifact_names_its_pytorch_parent(cli, mlp_onnx, digits_mlp, tmp_path):
    out = tmp_path / "q"
    assert_one_error_line(cli("quantize", mlp_onnx, "--out", out, "--qat", "--finetune-steps", 5),
                          "--qat", "ONNX artifact", str(digits_mlp))
    assert not out.exists()


def test_qat_refuses_a_layer_it_cannot_place(cli, tmp_path):
    source = _user(tmp_path / "bare", BARE_MATMUL)
    out = tmp_path / "q"
    assert_one_error_line(cli("--trust-model-code", "quantize", source, "--out", out, "--qat", "--finetune-steps", 5),
                          "cannot place", "Net")
    assert not out.exists()


def test_qat_keeps_its_run_in_finetune_dir_and_resume_continues_it(cli, digits_mlp, tmp_path):
    run = tmp_path / "run"
    args = ("quantize", digits_mlp / "best", "--qat", "--finetune-steps", 6, "--finetune-dir", run, "--no-bench", "--json")
    first = _ok(cli(*args, "--out", tmp_path / "q1"))
    assert (run / "metrics.jsonl").is_file() and first["report"]["qat"]["resumed_from"] is None
    assert_one_error_line(cli(*args, "--out", tmp_path / "q2"), "--finetune-dir", "--resume")
    assert not (tmp_path / "q2").exists()
    again = _ok(cli(*args, "--resume", "--out", tmp_path / "q3"))
    assert again["report"]["qat"]["resumed_from"] is not None


def test_qat_resume_needs_finetune_dir(cli, digits_mlp, tmp_path):
    assert_one_error_line(cli("quantize", digits_mlp / "best", "--out", tmp_path / "q", "--qat", "--finetune-steps", 5,
                              "--resume"), "--resume", "--finetune-dir")


def test_qat_keeps_the_calibrated_start_when_every_step_hurts(cli, digits_mlp, tmp_path):
    # A learning rate that wrecks every step: the calibrated model before the first step (step 0)
    # is kept, and the report says so; int8 is then exactly post-training int8.
    from safetensors.numpy import load_file

    out, run = tmp_path / "q", tmp_path / "run"
    result = _ok(cli("quantize", digits_mlp / "best", "--out", out, "--qat", "--finetune-steps", 5, "--lr", 0.3,
                     "--finetune-dir", run, "--no-bench", "--json"))
    qat = result["report"]["qat"]
    assert qat["best_step"] == 0 and qat["steps"] == 5 and qat["kept_start"] is True
    assert qat["selection"] == "fine-tuning did not improve on the calibrated model; kept step 0"
    assert result["report"]["after"]["accuracy"] == result["report"]["ptq"]["accuracy"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[0]["step"] == 0 and all(e["val_accuracy"] < evals[0]["val_accuracy"] for e in evals[1:])
    shipped, source = load_file(out / "model.safetensors"), load_file(digits_mlp / "best" / "model.safetensors")
    assert shipped.keys() == source.keys() and all(np.array_equal(shipped[k], source[k]) for k in source)


def test_qat_gate_refuses_a_result_that_loses_too_much(cli, digits_mlp, tmp_path, monkeypatch):
    # The QAT int8 model measured 50 points worse than it is: the gate applies to it as to any int8 model.
    from bigmodel_cli.engine.compress.quantize import int8_flow

    attempts = int8_flow.Int8Attempts
    measure_first = attempts.measure_first

    def qat_measured_worse(self):
        measure_first(self)
        if self.tmp.name == "qat":  # the QAT attempt's work directory (the other is "ptq")
            self.latest = {**self.latest, "accuracy": self.latest["accuracy"] - 0.5}

    monkeypatch.setattr(attempts, "measure_first", qat_measured_worse)
    out = tmp_path / "q"
    result = cli("quantize", digits_mlp / "best", "--out", out, "--qat", "--finetune-steps", 5,
                 "--max-metric-drop", 1, "--max-retries", 0, "--no-bench")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: accuracy gate failed"), result.stderr
    assert "nothing was written" in lines[0] and "Traceback" not in result.output
    assert not out.exists()


def test_qat_interrupted_finetune_resumes_to_the_same_weights(digits_mlp, tmp_path):
    from safetensors.numpy import load_file

    from bigmodel_cli import TrainConfig, open_artifact
    from bigmodel_cli.engine.compress.quantize.command import QuantizeOptions, quantize_artifact

    def run(resume=False):
        train = TrainConfig(eval_every=2, checkpoint_every=2, keep_checkpoints=5, resume=resume, threads=1)
        options = QuantizeOptions(qat=True, finetune_steps=6, finetune_dir=str(tmp_path / "run"), train=train,
                                  bench=False, threads=1, limit=64)
        return quantize_artifact(open_artifact(digits_mlp / "best"), tmp_path / f"q{int(resume)}", options)

    whole = run()
    cut = tmp_path / "run"
    whole_last = load_file(cut / "last" / "model.safetensors")
    # What the run would have left had it been killed after its step-4 checkpoint: no step-6
    # checkpoint and no last/ (best/ exists from step 0 on: the loop evaluates the starting point).
    for leftover in [*sorted((cut / "checkpoints").glob("step-*"))[-1:], cut / "last"]:
        shutil.rmtree(leftover)
    resumed = run(resume=True)
    assert whole.report["qat"]["resumed_from"] is None
    assert resumed.report["qat"]["resumed_from"] is not None and resumed.report["qat"]["steps"] == 6
    # The trained weights (last/) and the shipped ones (best/) are those of the uninterrupted run.
    for a, b in [(whole_last, load_file(cut / "last" / "model.safetensors")),
                 (load_file(whole.path / "model.safetensors"), load_file(resumed.path / "model.safetensors"))]:
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("content", ["not json", "[]", '{"source": 1}'])
def test_qat_worker_refuses_a_spec_it_did_not_write(cli, tmp_path, content):
    spec = tmp_path / "spec.json"
    spec.write_text(content)
    assert_one_error_line(cli("qat-worker", spec), "worker spec", "quantize --qat --nproc")
