"""bigmodel prune: zeros that are real and stay, structure that shrinks and reloads from config alone,
fine-tuning through the trainer, and one clear line for every bad input."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigmodel_cli import TrainConfig, open_artifact, train
from bigmodel_cli.artifact import write_metadata
from bigmodel_cli.engine.compress.prune.plan import cubic_schedule, kept_width, parse_pattern
from bigmodel_cli.engine.compress.prune.structured import prune_builtin, unit_groups
from bigmodel_cli.errors import UserError
from bigmodel_cli.models import build_model, parameter_count, resolve_spec

USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """Conv + BatchNorm, then two Linear layers joined by a residual add (their widths are coupled)."""

    def __init__(self, hidden=16):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)
        h = torch.relu(self.fc1(torch.relu(self.bn(self.conv(x))).flatten(1)))
        return self.out(h + torch.relu(self.fc2(h)))
'''


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    """A 32-unit MLP on digits, trained briefly (accuracy is not what these tests are about)."""
    out = tmp_path_factory.mktemp("prune") / "mlp"
    train(TrainConfig(model="mlp", hidden_sizes=[32], epochs=3, out=str(out), seed=0))
    return out / "best"


@pytest.fixture(scope="module")
def user_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prune-user")
    (root / "net.py").write_text(USER_MODEL)
    train(TrainConfig(model=f"{root / 'net.py'}:Net", max_steps=30, out=str(root / "run"), seed=0))
    return root / "run" / "best"


def _prune(cli, *args):
    result = cli("prune", *map(str, args), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _zeros(tensor) -> int:
    return int((tensor == 0).sum())


# --------------------------------------------------------------------------- the plan


def test_cubic_schedule_front_loads_and_ends_at_the_target():
    s = cubic_schedule(0.9, 4)
    assert s[0] == 0 and s[-1] == pytest.approx(0.9)
    assert all(a < b for a, b in zip(s, s[1:]))
    assert s[1] > 0.9 / 4  # prunes more than a linear schedule at first


def test_kept_width_floors_removal_and_rounds_down_to_multiples():
    assert kept_width(64, 0.5, 8) == 32
    assert kept_width(100, 0.9) == 10  # 1 - 0.9 is not exactly 0.1 in floating point
    assert kept_width(60, 0.5, 8) == 24  # 30 rounded down to a multiple of 8
    assert kept_width(4, 0.99) == 1 and kept_width(16, 0.99, 8) == 8


@pytest.mark.parametrize("bad", ["3:2", "2:2", "0:4", "x", "2:4:8"])
def test_bad_patterns_are_user_errors(bad):
    with pytest.raises(UserError):
        parse_pattern(bad)


# --------------------------------------------------------------------------- unstructured


def test_magnitude_zeros_are_permanent_and_reported(cli, mlp, tmp_path):
    report = _prune(cli, mlp, "--sparsity", 0.8, "--scope", "global", "--out", tmp_path / "p")
    best = tmp_path / "p" / "best"
    state, dense = load_file(best / "model.safetensors"), load_file(mlp / "model.safetensors")
    assert set(state) == set(dense)  # no weight_orig / weight_mask left behind
    weights = [k for k in state if k.endswith("weight")]
    total = sum(state[k].numel() for k in weights)
    assert sum(_zeros(state[k]) for k in weights) == round(0.8 * total)  # global: one threshold
    survivors = torch.cat([state[k][state[k] != 0] for k in weights])
    assert torch.equal(survivors, torch.cat([dense[k][state[k] != 0] for k in weights]))  # kept weights untouched
    assert report["after"]["nonzero_params"] < 0.25 * report["before"]["nonzero_params"]
    assert report["after"]["file_bytes"] == report["before"]["file_bytes"]  # dense storage: honest
    assert report["after"]["compressed_bytes"] < report["before"]["compressed_bytes"]
    assert report["after"]["latency_ms_p50"] > 0 and report["latency"]["backend"] == "torch"
    manifest = json.loads((best / "manifest.json").read_text())
    assert manifest["stage"] == "prune" and manifest["parent"]["path"] == str(mlp.resolve())
    assert manifest["options"]["prune"]["sparsity"] == 0.8 and "prune" in manifest
    # `bigmodel info` reads the per-layer sparsity straight from the file
    info = json.loads(cli("info", tmp_path / "p", "--json").stdout)
    by_name = {r["name"]: r["sparsity"] for r in info["layers"]}
    assert by_name == pytest.approx({r["layer"] + ".weight": r["sparsity"] for r in report["layers"]})
    reloaded = json.loads(cli("eval", tmp_path / "p", "--split", "test", "--json").stdout)
    assert reloaded["accuracy"] == pytest.approx(report["after"]["accuracy"])


def test_per_layer_scope_is_the_default_and_ignore_keeps_a_layer(cli, mlp, tmp_path):
    report = _prune(cli, mlp, "--sparsity", 0.5, "--ignore", "net.2", "--no-bench",
                    "--out", tmp_path / "p")
    state = load_file(tmp_path / "p" / "best" / "model.safetensors")
    assert _zeros(state["net.0.weight"]) == state["net.0.weight"].numel() // 2
    assert _zeros(state["net.2.weight"]) == 0
    assert {r["layer"] for r in report["layers"]} == {"net.0", "net.2"}


def test_two_four_pattern_keeps_two_of_every_four_inputs(cli, mlp, tmp_path):
    report = _prune(cli, mlp, "--pattern", "2:4", "--no-bench", "--out", tmp_path / "p")
    state = load_file(tmp_path / "p" / "best" / "model.safetensors")
    for name in ("net.0.weight", "net.2.weight"):
        groups = state[name].reshape(-1, 4)
        assert ((groups != 0).sum(1) <= 2).all()
    assert all(r["sparsity"] >= 0.5 for r in report["layers"])


def test_gradual_schedule_fine_tunes_and_the_zeros_stay(cli, mlp, tmp_path):
    report = _prune(cli, mlp, "--sparsity", 0.9, "--steps", 2, "--max-steps", 6, "--eval-every", 3,
                    "--no-bench", "--out", tmp_path / "p")
    assert [s["sparsity"] for s in report["schedule"]] == pytest.approx(cubic_schedule(0.9, 2)[1:])
    assert all(s["finetune"]["steps"] == 6 for s in report["schedule"])
    one_shot = _prune(cli, mlp, "--sparsity", 0.9, "--no-bench", "--out", tmp_path / "q")
    state = load_file(tmp_path / "p" / "best" / "model.safetensors")
    plain = load_file(tmp_path / "q" / "best" / "model.safetensors")
    weights = [k for k in state if k.endswith("weight")]
    total = sum(state[k].numel() for k in weights)
    # training moved the survivors, but not one pruned weight came back
    assert sum(_zeros(state[k]) for k in weights) == round(0.9 * total)
    assert not all(torch.equal(state[k], plain[k]) for k in weights)
    run = tmp_path / "p" / "finetune" / "step-2"
    assert (run / "metrics.jsonl").is_file()
    trainer_best = open_artifact(run / "best")
    assert trainer_best.stage == "prune" and trainer_best.manifest["parent"]["path"] == str(mlp.resolve())
    assert one_shot["after"]["nonzero_params"] == report["after"]["nonzero_params"]


def test_distill_fine_tunes_against_the_unpruned_teacher(cli, mlp, tmp_path, monkeypatch):
    from bigmodel_cli.engine.compress.distill import command as distill

    calls = []
    real = distill.distillation_loss_fn

    def spy(teacher, student, task, **kwargs):
        loss = real(teacher, student, task, **kwargs)
        calls.append({"kwargs": kwargs, "teacher_zeros": sum(_zeros(p) for p in teacher.parameters()), "calls": 0})

        def counted(model, x, y):
            calls[-1]["calls"] += 1
            return loss(model, x, y)

        return counted

    monkeypatch.setattr(distill, "distillation_loss_fn", spy)
    report = _prune(cli, mlp, "--sparsity", 0.7, "--steps", 2, "--max-steps", 3, "--distill", "--alpha", 0.9,
                    "--no-bench", "--out", tmp_path / "p")
    assert len(calls) == 2 and all(c["calls"] == 3 for c in calls)  # one teacher loss per step, used by every batch
    assert calls[0]["kwargs"] == {"temperature": 2.0, "alpha": 0.9, "kd_loss": "forward-kl"}
    dense_zeros = sum(_zeros(t) for t in load_file(mlp / "model.safetensors").values())
    assert all(c["teacher_zeros"] == dense_zeros for c in calls)  # the teacher is the unpruned model
    assert report["after"]["nonzero_params"] < report["before"]["nonzero_params"]


# --------------------------------------------------------------------------- structured


def _dead_units(model, spec, groups, fraction):
    """Zero every slice of every other unit (so their importance is exactly 0): removing them must
    not change the function at all, which checks the index bookkeeping exactly."""
    state = dict(model.named_parameters())
    for group in groups:
        dead = list(range(0, group.size, round(1 / fraction)))
        for name, dim, positions in group.members:
            if name not in state:
                continue
            index = dead if positions is None else [i for u in dead for i in positions[u]]
            with torch.no_grad():
                state[name].index_fill_(dim, torch.tensor(index), 0.0)


@pytest.mark.parametrize("arch,overrides,shape", [
    ("mlp", {"hidden_sizes": [16, 8]}, (3, 1, 8, 8)),
    ("cnn", {"channels": [8, 16], "hidden_sizes": [16]}, (3, 1, 8, 8)),
    ("gpt", {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "vocab_size": 64}, (2, 12)),
    # llama: GQA with a tied head (a kv group = its kv head + 2 query heads); MHA, untied, Qwen2's qkv bias
    ("llama", {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "vocab_size": 64, "tie_weights": True}, (2, 12)),
    ("llama", {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 64, "qkv_bias": True}, (2, 12)),
])
def test_structured_removes_exactly_the_dead_units(arch, overrides, shape):
    torch.manual_seed(0)
    spec = resolve_spec(arch, None, overrides)
    model = build_model(spec).eval()
    groups = unit_groups(model, spec)
    _dead_units(model, spec, groups, 0.5)
    lm = arch in ("gpt", "llama")
    x = torch.randint(0, 64, shape) if lm else torch.randn(shape)
    pruned, new_spec, rows = prune_builtin(model, spec, sparsity=0.5, head_sparsity=0.5 if lm else 0.0,
                                           criterion="l1", round_to=1, ignore=[], original={})
    assert torch.allclose(model(x), pruned.eval()(x), atol=1e-5)
    assert all(r["after"] == r["before"] // 2 for r in rows)
    rebuilt = build_model(new_spec)  # the config alone describes the pruned model
    rebuilt.load_state_dict(pruned.state_dict())
    if arch == "gpt":
        assert new_spec["mlp_hidden"] == 64 and new_spec["n_head"] == 2 and new_spec["head_dim"] == 8
    elif arch == "llama":
        assert new_spec["mlp_hidden"] == spec["mlp_hidden"] // 2 and new_spec["head_dim"] == 8
        assert new_spec["n_kv_head"] == spec["n_kv_head"] // 2 and new_spec["n_head"] == 2  # groups stay whole
        assert sum(p.numel() for p in pruned.parameters()) == parameter_count(new_spec)
    else:
        assert new_spec["hidden_sizes"][0] == overrides["hidden_sizes"][0] // 2


def test_gpt_blocks_share_one_width_so_partial_ignore_is_refused():
    spec = resolve_spec("gpt", None, {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 32})
    with pytest.raises(UserError, match="one mlp_hidden for all blocks"):
        prune_builtin(build_model(spec), spec, sparsity=0.5, head_sparsity=0.0, criterion="l2", round_to=1,
                      ignore=["blocks.0.mlp.fc"], original={})


def test_structured_mlp_is_smaller_and_reloads_from_config(cli, mlp, tmp_path):
    report = _prune(cli, mlp, "--method", "structured", "--sparsity", 0.5, "--round-to", 8, "--finetune-epochs", 1,
                    "--no-bench", "--out", tmp_path / "p")
    artifact = open_artifact(tmp_path / "p")
    assert artifact.model_spec["hidden_sizes"] == [16]
    assert report["ratio"]["params"] <= 0.55
    model = artifact.build_model()
    assert model.net[0].weight.shape == (16, 64)
    reloaded = json.loads(cli("eval", tmp_path / "p", "--split", "test", "--json").stdout)
    assert reloaded["accuracy"] == pytest.approx(report["after"]["accuracy"])
    assert reloaded["params"] == report["after"]["params"]


@pytest.mark.slow  # two verified ONNX exports (~10 s of CPU); run with -m slow
def test_onnx_runtime_latency_of_both_models(cli, mlp, tmp_path):
    report = _prune(cli, mlp, "--method", "structured", "--sparsity", 0.5, "--bench-onnx", "--no-bench",
                    "--out", tmp_path / "p")
    assert report["onnx"]["provider"] == "CPUExecutionProvider"
    for side in ("before", "after"):
        assert 0 < report[side]["onnx_latency_ms_p50"] <= report[side]["onnx_latency_ms_p95"]
        assert "latency_ms_p50" not in report[side]  # --no-bench: torch not timed
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["best"]  # the exports were not kept


def test_structured_schedule_targets_fractions_of_the_original_widths(cli, mlp, tmp_path):
    report = _prune(cli, mlp, "--method", "structured", "--sparsity", 0.5, "--steps", 2, "--max-steps", 2,
                    "--no-bench", "--out", tmp_path / "p")
    first = cubic_schedule(0.5, 2)[1]  # 0.4375
    step1 = open_artifact(tmp_path / "p" / "finetune" / "step-1")  # the trainer's artifact after step 1
    assert step1.model_spec["hidden_sizes"] == [kept_width(32, first)] == [18]
    assert step1.build_model().net[0].weight.shape == (18, 64)
    assert open_artifact(tmp_path / "p").model_spec["hidden_sizes"] == [16]
    assert report["layers"] == [{"layer": "net.0", "kind": "units", "original": 32, "before": 18, "after": 16}]


def test_structured_cnn_with_taylor_importance(cli, digits_cnn, tmp_path):
    spec = open_artifact(digits_cnn).model_spec
    _prune(cli, digits_cnn, "--method", "structured", "--sparsity", 0.5, "--importance", "taylor",
           "--calibration-batches", 2, "--no-bench", "--out", tmp_path / "p")
    artifact = open_artifact(tmp_path / "p")
    assert artifact.model_spec["channels"] == [c // 2 for c in spec["channels"]]
    assert artifact.model_spec["hidden_sizes"] == [h // 2 for h in spec["hidden_sizes"]]
    artifact.build_model()(torch.randn(2, 1, 8, 8))


def test_structured_gpt_mlp_and_heads(cli, tiny_gpt, tmp_path):
    spec = open_artifact(tiny_gpt).model_spec
    report = _prune(cli, tiny_gpt, "--method", "structured", "--sparsity", 0.5, "--head-sparsity", 0.5,
                    "--eval-windows", 4, "--no-bench", "--out", tmp_path / "p")
    new = open_artifact(tmp_path / "p").model_spec
    assert new["mlp_hidden"] == spec["mlp_hidden"] // 2
    assert new["n_head"] == spec["n_head"] // 2 and new["head_dim"] == spec["head_dim"]
    assert new["n_embd"] == spec["n_embd"]
    assert report["after"]["params"] < report["before"]["params"]
    reloaded = json.loads(cli("eval", tmp_path / "p", "--split", "test", "--json").stdout)
    assert reloaded["params"] == report["after"]["params"]


def test_user_model_pruned_with_the_dependency_graph_reloads_without_pickle(cli, user_model, tmp_path, monkeypatch):
    result = cli("--trust-model-code", "prune", user_model, "--method", "structured", "--sparsity", 0.5,
                 "--steps", 2, "--max-steps", 2, "--no-bench", "--out", tmp_path / "p", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    widths = {r["layer"]: r["after"] for r in report["layers"]}
    assert widths == {"conv": 4, "fc1": 8, "fc2": 8, "out": 10}  # residual kept fc1 = fc2; the output is kept
    assert [s["sparsity"] for s in report["schedule"]] == pytest.approx(cubic_schedule(0.5, 2)[1:])
    assert (tmp_path / "p" / "finetune" / "step-2" / "best" / "model.py").is_file()
    record = open_artifact(tmp_path / "p").model_spec["pruned"]
    assert record["fc1"]["shapes"]["weight"] == [8, 256] and record["bn"]["attrs"]["num_features"] == 4

    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    reloaded = cli("--trust-model-code", "eval", tmp_path / "p", "--split", "test", "--json")
    assert reloaded.exit_code == 0, reloaded.output
    assert json.loads(reloaded.stdout)["accuracy"] == pytest.approx(report["after"]["accuracy"])


# --------------------------------------------------------------------------- bad input


def _onnx_only(source: Path, where: Path) -> Path:
    where.mkdir()
    shutil.copy(source / "config.json", where / "config.json")
    (where / "model.onnx").write_bytes(b"not really onnx; prune must refuse before reading it")
    write_metadata(where, config=json.loads((source / "config.json").read_text()), stage="export", parent=source)
    return where


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--pattern", "3:2"], "0 < N < M"),
    (["--sparsity", "0.5", "--ignore", "nothing*"], "matches no prunable layer"),
    (["--method", "structured", "--sparsity", "0.5", "--ignore", "net.9"], "matches no prunable layer"),
    (["--sparsity", "0.5", "--steps", "3"], "needs --finetune-epochs"),
    (["--method", "structured", "--sparsity", "0.5", "--head-sparsity", "0.5"], "attention heads of gpt"),
    (["--method", "structured", "--pattern", "2:4"], "use it with --method magnitude"),
    (["--sparsity", "0.5", "--distill"], "give --finetune-epochs"),
    (["--sparsity", "0.5", "--distill", "--finetune-epochs", "1", "--temperature", "0"], "--temperature must be positive"),
    (["--sparsity", "0.5", "--alpha", "0.9"], "add --distill"),
    ([], "give --sparsity"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, mlp, tmp_path, args, message):
    out = tmp_path / "out"
    result = cli("prune", mlp, *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # not even a staging directory


def test_onnx_only_artifact_is_refused(cli, mlp, tmp_path):
    onnx_only = _onnx_only(mlp, tmp_path / "exported")
    result = cli("prune", onnx_only, "--sparsity", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "ONNX-only" in result.stderr
    assert not (tmp_path / "out").exists()


def _variant(source: Path, where: Path, **config_extra) -> Path:
    """A copy of ``source`` whose config.json has extra sections (a manifest that matches)."""
    where.mkdir()
    shutil.copy(source / "model.safetensors", where / "model.safetensors")
    (where / "model.onnx").write_bytes(b"stands in for an exported model")
    config = {**json.loads((source / "config.json").read_text()), **config_extra}
    write_metadata(where, config=config, stage="export", parent=source)
    return where


def test_quantized_artifact_is_refused(cli, mlp, tmp_path):
    quantized = _variant(mlp, tmp_path / "q", quantization={"mode": "weight-only", "bits": 8})
    result = cli("prune", quantized, "--sparsity", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "is quantized (weight-only)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_export_that_kept_its_weights_prunes_into_a_plain_pytorch_artifact(cli, mlp, tmp_path):
    exported = _variant(mlp, tmp_path / "e", onnx={"exporter": "dynamo", "opset": 18})
    _prune(cli, exported, "--sparsity", 0.5, "--no-bench", "--out", tmp_path / "p")
    pruned = open_artifact(tmp_path / "p")
    assert "onnx" not in pruned.config and not pruned.has_onnx  # no description of a file it does not carry
    pruned.build_model()


def test_existing_output_needs_overwrite(cli, mlp, tmp_path):
    (tmp_path / "out").mkdir()
    result = cli("prune", mlp, "--sparsity", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--overwrite" in result.stderr


def test_installed_entry_point_reports_bad_sparsity(mlp, tmp_path):
    exe = Path(sys.executable).with_name("bigmodel")
    proc = subprocess.run([str(exe), "prune", str(mlp), "--sparsity", "1.5", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --sparsity must be in [0, 1)")
    assert not (tmp_path / "o").exists()
