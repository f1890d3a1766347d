"""llama through compression: structured pruning that keeps GQA groups whole, and distillation
with students built from the teacher's layers and hidden-state matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigmodel_cli import artifact as art
from bigmodel_cli.config import TrainConfig
from bigmodel_cli.engine.compress.distill import command as D
from bigmodel_cli.errors import UserError
from bigmodel_cli.models import build_model, parameter_count, resolve_spec
from conftest import assert_one_error_line

FAST = ("--bench-iterations", "2", "--threads", "1")
SIZES = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "block_size": 64}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, corpus) -> Path:
    """A byte-level llama with grouped-query attention (4 query heads over 2 kv heads), tied head."""
    from bigmodel_cli import train

    out = tmp_path_factory.mktemp("llama") / "tiny-llama"
    train(TrainConfig(model="llama", preset="tiny", data=f"text:{corpus}", block_size=32, batch_size=8, max_steps=20,
                      lr=3e-3, eval_windows=4, out=str(out), seed=0, threads=1, model_args=dict(SIZES)))
    return out


def _run(cli, *args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


# --------------------------------------------------------------------------- prune


def test_structured_prune_removes_whole_kv_groups_and_mlp_width(cli, tiny_llama, tmp_path):
    before = art.open_artifact(tiny_llama)
    report = json.loads(_run(cli, "prune", tiny_llama, "--method", "structured", "--sparsity", "0.5",
                             "--head-sparsity", "0.5", "--eval-windows", "4", "--no-bench", "--out", tmp_path / "p",
                             "--json").stdout)
    pruned = art.open_artifact(tmp_path / "p")
    spec = pruned.model_spec
    # one of two kv groups went, with both of its query heads: the groups stay 2 query heads each
    assert (spec["n_kv_head"], spec["n_head"], spec["head_dim"]) == (1, 2, 8)
    assert spec["mlp_hidden"] == before.model_spec["mlp_hidden"] // 2
    assert report["after"]["params"] == parameter_count(spec) < parameter_count(before.model_spec)
    assert (pruned.path / art.WEIGHTS_FILE).stat().st_size < (before.path / art.WEIGHTS_FILE).stat().st_size
    assert {r["kind"] for r in report["layers"]} == {"units", "kv groups"}
    reloaded = json.loads(_run(cli, "eval", pruned.path, "--json").stdout)
    assert reloaded["params"] == report["after"]["params"]
    _run(cli, "generate", pruned.path, "--prompt", "def ", "--max-new-tokens", "3", "--temperature", "0")
    _run(cli, "export", pruned.path, "--out", tmp_path / "onnx")
    _run(cli, "quantize", tmp_path / "onnx", "--out", tmp_path / "int8")
    assert json.loads(_run(cli, "eval", tmp_path / "int8", "--json").stdout)["perplexity"] > 0


# --------------------------------------------------------------------------- distill


def _model(**changes):
    spec = resolve_spec("llama", None, {**SIZES, "vocab_size": 64, **changes})
    return build_model(spec).eval(), spec


@pytest.mark.parametrize("tied", [True, False])
def test_init_from_teacher_copies_every_kth_block(tied):
    torch.manual_seed(0)
    teacher, t_spec = _model(n_layer=4, tie_weights=tied)
    student, s_spec = _model(n_layer=2, tie_weights=tied)
    assert D.init_from_teacher(student, teacher, s_spec, t_spec) == {"stride": 2, "teacher_layers": [0, 2]}
    for s_index, t_index in ((0, 0), (1, 2)):
        s_state, t_state = student.blocks[s_index].state_dict(), teacher.blocks[t_index].state_dict()
        assert all(torch.equal(s_state[k], t_state[k]) for k in t_state)
    for part in ("tok_emb", "norm", "lm_head"):
        assert torch.equal(getattr(student, part).weight, getattr(teacher, part).weight), part
    twin, _ = _model(n_layer=4, tie_weights=tied)
    D.init_from_teacher(twin, teacher, t_spec, t_spec)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(twin(x), teacher(x))


def test_init_from_teacher_refuses_other_head_groups():
    teacher, t_spec = _model()
    student, s_spec = _model(n_layer=1, n_kv_head=4)  # plain MHA: the teacher's k/v rows do not fit
    with pytest.raises(UserError, match="n_kv_head"):
        D.init_from_teacher(student, teacher, s_spec, t_spec)


def test_distill_llama_from_the_teachers_layers_with_hidden_loss(cli, tiny_llama, tmp_path):
    out = tmp_path / "d"
    result = _run(cli, "distill", "--teacher", tiny_llama, "--student-config", '{"n_layer": 1}', "--init-from-teacher",
                  "--hidden-loss", "mse", "--max-steps", "4", "--batch-size", "4", "--eval-windows", "4",
                  "--out", out, "--json", *FAST)
    record = json.loads(result.stdout)["distill"]
    assert record["hidden_widths"] == {"0:1": [32, 32]}  # last to last, same width: no projection
    student = art.open_artifact(out / "best")
    assert student.model_spec["n_layer"] == 1 and student.model_spec["n_kv_head"] == 2
    assert json.loads(_run(cli, "eval", student.path, "--json").stdout)["perplexity"] > 0


def test_a_narrower_llama_student_matches_hidden_states_through_a_projection(cli, tiny_llama, tmp_path):
    result = _run(cli, "distill", "--teacher", tiny_llama, "--student-config",
                  '{"n_layer": 1, "n_embd": 16, "n_head": 2, "n_kv_head": 1}', "--hidden-loss", "cosine",
                  "--max-steps", "2", "--batch-size", "4", "--eval-windows", "4", "--out", tmp_path / "n", "--json", *FAST)
    record = json.loads(result.stdout)["distill"]
    assert record["hidden_widths"] == {"0:1": [16, 32]} and record["projection_params"] == 16 * 32 + 32
    # the student's mlp_hidden follows its own n_embd (Llama's 8/3 rule), not the teacher's
    assert art.open_artifact(tmp_path / "n" / "best").model_spec["mlp_hidden"] == 64


def test_init_from_teacher_with_other_widths_is_one_line(cli, tiny_llama, tmp_path):
    result = cli("distill", "--teacher", tiny_llama, "--student-config", '{"n_layer": 1, "n_kv_head": 1}',
                 "--init-from-teacher", "--max-steps", "1", "--out", tmp_path / "x")
    assert_one_error_line(result, "n_kv_head", "keep the teacher's widths")
    assert not (tmp_path / "x").exists()
