"""bigmodel distill: the losses, hidden-state matching, init from the teacher, the cache, the
comparison report, resume, and one clear line with exit code 2 for every bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bigmodel_cli import artifact as art  # noqa: E402
from bigmodel_cli.config import TrainConfig  # noqa: E402
from bigmodel_cli.engine.compress.distill import command as D  # noqa: E402
from bigmodel_cli.engine.compress.distill.losses import IGNORE_INDEX, default_layer_map, distillation_loss, hidden_loss, kd_loss  # noqa: E402
from bigmodel_cli.errors import UserError  # noqa: E402
from conftest import assert_one_error_line as _one_error_line  # noqa: E402

FAST = ("--bench-iterations", "2", "--threads", "1")




@pytest.fixture(scope="module")
def deep_mlp(tmp_path_factory) -> Path:
    """A two-hidden-layer MLP teacher on digits (for layer maps and init-from-teacher)."""
    from bigmodel_cli import train

    out = tmp_path_factory.mktemp("distill") / "deep-mlp"
    train(TrainConfig(model="mlp", hidden_sizes=[32, 32], epochs=8, lr=3e-3, out=str(out), seed=0, threads=1))
    return out


# --------------------------------------------------------------------------- losses


def test_forward_kl_matches_its_definition_and_vanishes_for_a_perfect_student():
    torch.manual_seed(0)
    t, s = torch.randn(6, 5), torch.randn(6, 5)
    T = 3.0
    p_t = torch.softmax(t / T, -1)
    expected = T**2 * (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, None, T, "forward-kl"), expected, atol=1e-6)
    assert kd_loss(t, t, None, T, "forward-kl").abs() < 1e-6
    p_s = torch.softmax(s / T, -1)
    reverse = T**2 * (p_s * (p_s.log() - torch.log_softmax(t / T, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, None, T, "reverse-kl"), reverse, atol=1e-6)
    assert not torch.allclose(reverse, expected)
    # Logit MSE ignores the temperature (it cancels).
    assert torch.allclose(kd_loss(s, t, None, 1.0, "mse"), kd_loss(s, t, None, 7.0, "mse"))
    assert torch.allclose(kd_loss(s, t, None, 1.0, "mse"), ((s - t) ** 2).mean())


def test_per_token_losses_ignore_masked_labels():
    torch.manual_seed(1)
    t, s = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    y = torch.randint(0, 7, (2, 4))
    y[0, 1] = y[1, 3] = IGNORE_INDEX
    base = distillation_loss(s, t, y, 2.0, 0.5)
    s2 = s.clone()
    s2[0, 1, 0] += 100.0  # a masked position: must not move the loss (one logit: softmax changes)
    s2[1, 3, 2] -= 50.0
    assert torch.allclose(distillation_loss(s2, t, y, 2.0, 0.5), base)
    s3 = s.clone()
    s3[0, 0, 0] += 5.0  # an unmasked one does
    assert not torch.allclose(distillation_loss(s3, t, y, 2.0, 0.5), base)
    h_s, h_t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    h_s2 = h_s.clone()
    h_s2[0, 1] = 9.0
    assert torch.allclose(hidden_loss(h_s2, h_t, "mse", y), hidden_loss(h_s, h_t, "mse", y))


def test_alpha_weighs_soft_and_hard_terms():
    from torch.nn import functional as F

    torch.manual_seed(2)
    t, s, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 0.0), F.cross_entropy(s, y))
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 1.0), kd_loss(s, t, y, 2.0))
    mixed = 0.3 * kd_loss(s, t, y, 2.0) + 0.7 * F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 0.3), mixed)
    assert hidden_loss(t, t, "cosine") < 1e-6 and hidden_loss(t, 2 * t, "cosine") < 1e-6
    assert hidden_loss(t, 2 * t, "mse") > 0.1


def test_layer_maps():
    assert D.parse_layer_map("0:1, 1:3") == [(0, 1), (1, 3)]
    assert default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert default_layer_map(1, 5) == [(0, 4)]
    assert default_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    for bad in ("0-1", "a:1", "0:1,0:2", ""):
        with pytest.raises(UserError):
            D.parse_layer_map(bad)


# --------------------------------------------------------------------------- the command


def test_distill_digits_with_baseline_writes_a_distill_artifact_and_a_report(cli, tmp_path, deep_mlp):
    out = tmp_path / "d"
    result = cli("distill", "--teacher", deep_mlp, "--student-config", '{"arch": "mlp", "hidden_sizes": [16]}',
                 "--baseline", "--epochs", "6", "--lr", "3e-3", "--temperature", "4", "--alpha", "0.7",
                 "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    report = data["report"]
    assert list(report["models"]) == ["teacher", "baseline", "distilled"]
    assert report["metric"] == "accuracy" and report["split"] == "test"
    distilled, teacher = report["models"]["distilled"], report["models"]["teacher"]
    assert distilled["params"] == 64 * 16 + 16 + 16 * 10 + 10 < teacher["params"]
    assert distilled["accuracy"] > 0.8 and distilled["latency_ms_p50"] > 0
    assert report["retention"] == pytest.approx(distilled["accuracy"] / teacher["accuracy"])
    assert report["margin_vs_baseline"] == pytest.approx(distilled["accuracy"] - report["models"]["baseline"]["accuracy"])

    student = art.open_artifact(out / "best")
    teacher_art = art.open_artifact(deep_mlp)
    assert student.stage == "distill" and student.model_spec["hidden_sizes"] == [16]
    assert student.manifest["parent"]["path"] == str(teacher_art.path)
    assert student.manifest["parent"]["sha256"] == art.sha256_file(teacher_art.path / art.MANIFEST_FILE)
    record = student.manifest["distill"]
    assert record["temperature"] == 4.0 and record["alpha"] == 0.7 and record["kd_loss"] == "forward-kl"
    assert record["student_params"] == distilled["params"] and "val_accuracy" in student.metrics
    assert student.manifest["options"]["epochs"] == 6
    # The teacher's data (and its normalization) is the student's.
    assert student.data_spec["normalization"] == teacher_art.data_spec["normalization"]
    base = art.open_artifact(out / "baseline" / "best")
    assert base.stage == "train" and base.model_spec == student.model_spec


def test_table_output_names_all_three_models(cli, tmp_path, digits_mlp):
    result = cli("distill", "--teacher", digits_mlp, "--student-preset", "tiny", "--baseline", "--max-steps", "6",
                 "--out", tmp_path / "d", *FAST)
    assert result.exit_code == 0, result.output
    for word in ("teacher", "baseline", "distilled", "accuracy", "latency p50"):
        assert word in result.stdout


def test_hidden_projections_are_checkpointed_but_not_in_the_student(cli, tmp_path, deep_mlp):
    out = tmp_path / "h"
    result = cli("distill", "--teacher", deep_mlp, "--student-config", '{"hidden_sizes": [12]}', "--hidden-loss", "mse",
                 "--layer-map", "0:1", "--max-steps", "8", "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)["distill"]
    assert record["layer_map"] == [[0, 1]] and record["hidden_widths"] == {"0:1": [12, 32]}
    assert record["projection_params"] == 12 * 32 + 32
    from safetensors.torch import load_file

    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    aux = load_file(checkpoint / "aux.safetensors")
    assert {tuple(v.shape) for v in aux.values()} == {(32, 12), (32,)}
    student = art.open_artifact(out / "best")
    saved = load_file(student.path / art.WEIGHTS_FILE)
    fresh = student.build_model().state_dict()
    assert set(saved) == set(fresh)  # the projection is training-only
    assert sum(v.numel() for v in saved.values()) == 64 * 12 + 12 + 12 * 10 + 10


def test_gpt_distillation_per_token_with_hidden_cosine(cli, tmp_path, tiny_gpt):
    out = tmp_path / "g"
    result = cli("distill", "--teacher", tiny_gpt, "--student-config", '{"n_embd": 16, "n_head": 2}',
                 "--hidden-loss", "cosine", "--kd-loss", "reverse-kl", "--max-steps", "6", "--batch-size", "4",
                 "--eval-windows", "4", "--baseline", "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    report = data["report"]
    assert report["metric"] == "loss" and math.isfinite(report["margin_vs_baseline"])
    assert all(math.isfinite(m["loss"]) for m in report["models"].values())
    student = art.open_artifact(out / "best")
    assert student.model_spec["n_embd"] == 16 and student.model_spec["vocab_size"] == 256
    assert student.data_spec["block_size"] == art.open_artifact(tiny_gpt).data_spec["block_size"]
    assert data["distill"]["hidden_widths"] == {"0:0": [16, 32]}


def test_cnn_stages_are_matched_across_spatial_sizes(cli, tmp_path, digits_cnn):
    # A one-stage student (4×4 maps) imitates the teacher's second stage (2×2 maps): pooled to match.
    result = cli("distill", "--teacher", digits_cnn, "--student-config", '{"channels": [6], "hidden_sizes": [16]}',
                 "--hidden-loss", "mse", "--layer-map", "0:1", "--max-steps", "4", "--out", tmp_path / "c", "--json",
                 *FAST)
    assert result.exit_code == 0, result.output
    widths = json.loads(result.stdout)["distill"]["hidden_widths"]
    assert widths == {"0:1": [6, art.open_artifact(digits_cnn).model_spec["channels"][1]]}


def test_resume_continues_and_refuses_changed_distill_options(cli, tmp_path, digits_mlp):
    out = tmp_path / "r"
    args = ["--teacher", digits_mlp, "--student-preset", "tiny", "--max-steps", "6", "--eval-every", "3",
            "--out", out, "--json", *FAST]
    assert cli("distill", *args).exit_code == 0
    resumed = cli("distill", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 6
    _one_error_line(cli("distill", *args, "--resume", "--temperature", "5"), "temperature")
    _one_error_line(cli("distill", *args), "already exists")


def test_cross_architecture_student_from_a_cnn_teacher(cli, tmp_path, digits_cnn):
    result = cli("distill", "--teacher", digits_cnn, "--student-config", '{"arch": "mlp", "hidden_sizes": [16]}',
                 "--max-steps", "4", "--cache-teacher", "--out", tmp_path / "x", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert art.open_artifact(tmp_path / "x" / "best").model_spec["arch"] == "mlp"


def test_student_artifact_continues_from_its_weights(cli, tmp_path, deep_mlp, digits_mlp):
    out = tmp_path / "a"
    result = cli("distill", "--teacher", deep_mlp, "--student", digits_mlp, "--max-steps", "1", "--lr", "1e-9",
                 "--baseline", "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    source = art.open_artifact(digits_mlp)
    student = json.loads(result.stdout)["distill"]["student"]
    assert student["from"] == "artifact" and student["artifact"]["path"] == str(source.path)
    before, after = source.load_state_dict(), art.open_artifact(out / "last").load_state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert art.open_artifact(out / "baseline" / "best").manifest["parent"]["path"] == str(source.path)
    _one_error_line(cli("distill", "--teacher", deep_mlp, "--student", digits_mlp, "--init-from-teacher",
                        "--out", tmp_path / "b"), "--init-from-teacher")
    _one_error_line(cli("distill", "--teacher", deep_mlp, "--student", _onnx_only(tmp_path, digits_mlp),
                        "--out", tmp_path / "b"), "ONNX-only")
    assert not (tmp_path / "b").exists()


def test_a_user_model_teacher_distils_its_logits_into_a_builtin_student(cli, tmp_path, monkeypatch):
    file = tmp_path / "net.py"
    file.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 24), torch.nn.ReLU(),\n"
        "                                        torch.nn.Linear(24, 10))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n")
    assert cli("train", "--model", f"{file}:Net", "--epochs", "2", "--out", tmp_path / "t").exit_code == 0
    student, out = '{"arch": "mlp", "hidden_sizes": [8]}', tmp_path / "s"
    _one_error_line(cli("distill", "--teacher", tmp_path / "t", "--student-config", student, "--out", out),
                    "--trust-model-code")
    monkeypatch.setenv("BIGMODEL_TRUST_MODEL_CODE", "1")  # restored after the test
    _one_error_line(cli("distill", "--teacher", tmp_path / "t", "--student-config", student, "--hidden-loss", "mse",
                        "--out", out), "drop --hidden-loss")
    _one_error_line(cli("distill", "--teacher", tmp_path / "t", "--student-config", '{"hidden_sizes": [8]}',
                        "--out", out), "name the student's \"arch\"")
    assert not out.exists()
    result = cli("distill", "--teacher", tmp_path / "t", "--student-config", student, "--max-steps", "3",
                 "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert art.open_artifact(out / "best").model_spec["arch"] == "mlp"


# --------------------------------------------------------------------------- engine pieces


def _tiny_gpt_model(n_layer: int, **kw):
    from bigmodel_cli.models import build_model, resolve_spec

    spec = resolve_spec("gpt", "nano", {"n_layer": n_layer, "n_embd": 16, "n_head": 2, "block_size": 32, **kw})
    return build_model(spec), spec


def test_init_from_teacher_takes_every_kth_layer():
    torch.manual_seed(0)
    teacher, t_spec = _tiny_gpt_model(4)
    student, s_spec = _tiny_gpt_model(2, block_size=16)
    used = D.init_from_teacher(student, teacher, s_spec, t_spec)
    assert used == {"stride": 2, "teacher_layers": [0, 2]}
    for s_index, t_index in ((0, 0), (1, 2)):
        for (name, s), (_, t) in zip(student.blocks[s_index].state_dict().items(), teacher.blocks[t_index].state_dict().items()):
            assert torch.equal(s, t), name
    assert torch.equal(student.pos_emb.weight, teacher.pos_emb.weight[:16])
    assert torch.equal(student.tok_emb.weight, teacher.tok_emb.weight)
    # Same depth: the student is the teacher.
    twin, _ = _tiny_gpt_model(4)
    D.init_from_teacher(twin, teacher, t_spec, t_spec)
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.allclose(twin(x), teacher(x))


def test_init_from_teacher_refuses_students_that_do_not_fit():
    teacher, t_spec = _tiny_gpt_model(2)
    wide, w_spec = _tiny_gpt_model(1, n_embd=32, head_dim=8)  # same heads, a wider residual stream
    with pytest.raises(UserError, match="do not fit"):
        D.init_from_teacher(wide, teacher, w_spec, t_spec)
    more_heads, h_spec = _tiny_gpt_model(1, n_head=4)
    with pytest.raises(UserError, match="n_head"):
        D.init_from_teacher(more_heads, teacher, h_spec, t_spec)
    deep, d_spec = _tiny_gpt_model(3)
    with pytest.raises(UserError, match="3 layers"):
        D.init_from_teacher(deep, teacher, d_spec, t_spec)


def test_init_from_teacher_on_the_command_line(cli, tmp_path, deep_mlp):
    out = tmp_path / "i"
    result = cli("distill", "--teacher", deep_mlp, "--student-config", '{"hidden_sizes": [32]}', "--init-from-teacher",
                 "--max-steps", "1", "--lr", "1e-9", "--out", out, "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["distill"]["student"]["init_from_teacher"] == {"stride": 2, "teacher_layers": [0]}
    # After one step at a negligible lr the student's first layer is still the teacher's.
    from safetensors.torch import load_file

    s = load_file(out / "last" / art.WEIGHTS_FILE)
    t = load_file(art.open_artifact(deep_mlp).path / art.WEIGHTS_FILE)
    assert torch.allclose(s["net.0.weight"], t["net.0.weight"], atol=1e-6)
    assert torch.allclose(s["net.2.weight"], t["net.4.weight"], atol=1e-6)  # the output layer


def test_cached_teacher_trains_exactly_like_the_live_one(tmp_path, deep_mlp):
    weights = []
    for cache in (False, True):
        cfg = D.DistillConfig(teacher=str(deep_mlp), student_config={"hidden_sizes": [8]}, cache_teacher=cache,
                              hidden_loss="mse", bench_iterations=0,
                              train=TrainConfig(out=str(tmp_path / f"c{cache}"), max_steps=5, threads=1, seed=3))
        result = D.distill(cfg)
        weights.append(art.open_artifact(result.run.last_dir).load_state_dict())
    assert set(weights[0]) == set(weights[1])
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name


def test_public_loss_fn_for_other_commands(deep_mlp):
    from bigmodel_cli.data import load_dataset
    from bigmodel_cli.engine.core.tasks import make_task
    from bigmodel_cli.models import build_model, resolve_spec

    teacher_art = art.open_artifact(deep_mlp)
    teacher = teacher_art.build_model()
    task = make_task(load_dataset(dict(teacher_art.data_spec)), batch_size=16)
    student = build_model(resolve_spec("mlp", "tiny"))
    loss_fn = D.distillation_loss_fn(teacher, student, task, temperature=2.0, alpha=0.5)
    x, y = task.batch(0)
    loss = loss_fn(student, x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    with pytest.raises(UserError, match="classes"):
        D.distillation_loss_fn(teacher, build_model(resolve_spec("mlp", "tiny", {"num_classes": 7})), task)
    with pytest.raises(UserError, match="temperature"):
        D.distillation_loss_fn(teacher, student, task, temperature=0.0)


# --------------------------------------------------------------------------- bad input


def _onnx_only(tmp_path: Path, teacher: Path) -> Path:
    source = art.open_artifact(teacher)
    out = tmp_path / "onnx-only"
    with art.atomic_directory(out) as staging:
        (staging / art.ONNX_FILE).write_bytes(b"not really onnx, never loaded")
        art.write_metadata(staging, config=source.config, stage="export", parent=source)
    return out


MLP16 = '{"hidden_sizes": [16]}'


@pytest.mark.parametrize("args, fragment", [
    (["--student-config", '{"num_classes": 7}'], "agree on the classes"),
    (["--student-config", MLP16, "--temperature", "0"], "--temperature"),
    (["--student-config", MLP16, "--temperature", "-2"], "--temperature"),
    (["--student-config", MLP16, "--alpha", "1.5"], "--alpha"),
    (["--student-config", MLP16, "--alpha", "-0.1"], "--alpha"),
    (["--student-config", MLP16, "--hidden-loss", "mse", "--layer-map", "0:5"], "teacher has no hidden layer 5"),
    (["--student-config", MLP16, "--hidden-loss", "mse", "--layer-map", "3:0"], "student has no hidden layer 3"),
    (["--student-config", MLP16, "--layer-map", "0:0"], "--layer-map needs --hidden-loss"),
    (["--student-config", MLP16, "--kd-loss", "js"], "--kd-loss"),
    (["--student-config", '{"arch": "gpt"}'], "language-modeling"),
    (["--student-config", '{"hidden_size": 3}'], "unknown mlp argument"),
    (["--student-config", "[1]"], "JSON object"),
    (["--student-preset", "tiny", "--student-config", MLP16], "only one of"),
    ([], "give the student"),
    (["--student-preset", "huge"], "unknown preset"),
    (["--student-config", '{"hidden_sizes": [64, 64, 64]}', "--init-from-teacher"], "3 layers"),
])
def test_bad_distill_input_is_one_line_exit_2_nothing_written(cli, tmp_path, deep_mlp, args, fragment):
    out = tmp_path / "never"
    _one_error_line(cli("distill", "--teacher", deep_mlp, *args, "--out", out, *FAST), fragment)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_onnx_only_teacher_and_vocabulary_mismatch_are_user_errors(cli, tmp_path, digits_mlp, tiny_gpt):
    out = tmp_path / "never"
    _one_error_line(cli("distill", "--teacher", _onnx_only(tmp_path, digits_mlp), "--student-preset", "tiny",
                        "--out", out), "ONNX-only")
    _one_error_line(cli("distill", "--teacher", tiny_gpt, "--student-config", '{"vocab_size": 128}', "--out", out),
                    "agree on the vocabulary", "256")
    _one_error_line(cli("distill", "--teacher", tiny_gpt, "--student-preset", "nano", "--cache-teacher", "--out", out),
                    "--cache-teacher")
    _one_error_line(cli("distill", "--teacher", tmp_path / "missing", "--student-preset", "nano", "--out", out),
                    "no such file")
    assert not out.exists()


def test_installed_entry_point_exit_code(tmp_path, digits_mlp):
    exe = Path(sys.executable).parent / "bigmodel"
    if not exe.exists():
        pytest.skip("the bigmodel entry point is not installed in this environment")
    proc = subprocess.run([str(exe), "distill", "--teacher", str(digits_mlp), "--student-preset", "tiny",
                           "--alpha", "2", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--alpha" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
