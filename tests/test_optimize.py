"""bigmodel optimize: a tiny budgeted search on the digits MLP (front, choice, recipe, resume), a
language-model search with a relative perplexity limit, --dry-run, and every bad input of issue 19.

One search (``searched``) is shared by the module; tests that change a search work on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_error_line

QUICK = ("--space", "quick", "--rounds", "5", "--time-budget", "5m")


def _json(result) -> dict:
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, digits_mlp, cli):
    out = tmp_path_factory.mktemp("optimize") / "search"
    result = cli("optimize", digits_mlp, "--max-drop", "1.0", *QUICK, "--only", "quantize,distill", "--json",
                 "--out", out)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_search_writes_front_and_a_chosen_model_within_the_limit(searched):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.outputs import foreign

    out, summary = searched
    chosen = summary["chosen"]
    assert chosen is not None and chosen["meets"] and chosen["drop"] <= 1.0
    open_artifact(out / "chosen")  # a normal, verified artifact
    for name in ("report.md", "report.html", "tradeoff.png", "recipe.toml", "optimize.json"):
        assert (out / name).is_file(), name
    rows = summary["rows"]
    assert rows[0]["name"] == "fp32" and summary["front"]
    # the choice is the fastest of the rows that meet the limit
    fitting = [r for r in rows if r["meets"]]
    assert chosen["latency_ms_p50"] == min(r["latency_ms_p50"] for r in fitting)
    # cheap first: the input is quantized before any student is trained
    names = [s["name"] for s in summary["steps"]]
    assert names.index("q-dynamic") < names.index("d-w25")
    assert "Pareto front" in (out / "report.md").read_text()
    assert foreign(out) is None  # --overwrite may replace it: bigmodel wrote all of it


def test_recipe_rebuilds_the_winner_without_searching(searched, cli, tmp_path):
    from bigmodel_cli.engine.compare import compare_artifacts

    out, summary = searched
    run_dir = tmp_path / "rebuilt"
    result = cli("run", out / "recipe.toml", "--out", run_dir, "--compare-rounds", "1")
    assert result.exit_code == 0, result.output
    winner = summary["chosen"]["name"]
    rows = compare_artifacts([out / "chosen", run_dir / winner], backend="onnx", rounds=1).rows
    assert rows[0]["params"] == rows[1]["params"]
    assert abs(rows[0]["value"] - rows[1]["value"]) <= 0.006  # one validation image at most


def test_rerun_reuses_every_finished_candidate(searched, cli, tmp_path, digits_mlp):
    out, summary = searched
    copy = tmp_path / "search"
    shutil.copytree(out, copy)
    state_file = copy / "optimize-state.json"
    state = json.loads(state_file.read_text())
    state["steps"]["q-dynamic"]["status"] = "running"  # as if killed while quantizing
    state_file.write_text(json.dumps(state))
    again = _json(cli("optimize", digits_mlp, "--max-drop", "1.0", *QUICK, "--only", "quantize,distill", "--json",
                      "--out", copy))
    runs = {s["name"]: s["this_run"] for s in again["steps"]}
    assert runs.pop("q-dynamic") == "ran"
    # No other candidate of the first run is built again: each one the rerun visits is reused. (The
    # remeasured q-dynamic may move the front, so the rerun may visit other front work than the
    # first run did — a new front member quantized is new work, and one no longer near the front is
    # not visited.)
    finished = [s["name"] for s in summary["steps"] if s["name"] != "q-dynamic"]
    assert runs["fp32"] == "reused" and all(runs.get(name) in ("reused", None) for name in finished), runs


def test_nothing_meets_the_goal_exits_1_with_the_front_written(searched, cli, tmp_path, digits_mlp):
    out, _ = searched
    copy = tmp_path / "search"
    shutil.copytree(out, copy)
    result = cli("optimize", digits_mlp, "--max-drop", "1.0", "--latency-budget-ms", "0.000001", *QUICK,
                 "--only", "quantize,distill", "--out", copy)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "nothing met" in lines[0] and "closest" in lines[0]
    assert (copy / "report.md").is_file() and "Nothing met the goal" in (copy / "report.md").read_text()
    assert not (copy / "chosen").exists() and not (copy / "recipe.toml").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(cli, digits_mlp, tmp_path):
    out = tmp_path / "planned"
    result = cli("optimize", digits_mlp, "--max-drop", "1.0", "--dry-run", "--json", "--out", out)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["estimate_s"] > 0 and plan["steps"][0]["name"] == "fp32"
    commands = [s["command"] for s in plan["steps"]]
    assert commands.index("quantize") < commands.index("prune") < commands.index("distill")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_language_model_search_with_a_relative_perplexity_limit(cli, tiny_gpt, tmp_path):
    summary = _json(cli("optimize", tiny_gpt, "--max-drop", "3%", *QUICK, "--only", "quantize", "--json",
                        "--out", tmp_path / "lm"))
    assert summary["metric"] == "perplexity"
    base, chosen = summary["rows"][0], summary["chosen"]
    assert chosen is not None and chosen["value"] <= base["value"] * 1.03 + 1e-9


def test_torch_backend_searches_and_chooses_a_pytorch_artifact(cli, digits_mlp, tmp_path):
    """--backend torch: only candidates PyTorch runs (no ONNX-only quantization), each measured on
    PyTorch; the chosen model is a PyTorch artifact within the limit, and the recipe rebuilds it."""
    from bigmodel_cli.artifact import open_artifact

    out = tmp_path / "torch"
    summary = _json(cli("optimize", digits_mlp, "--max-drop", "1.0", *QUICK, "--only", "quantize,prune",
                        "--backend", "torch", "--threads", "1", "--json", "--out", out))
    assert summary["backend"] == "torch" and summary["threads"] == 1
    assert json.loads((out / "optimize.json").read_text())["backend"] == "torch"
    commands = {s["name"]: s["command"] for s in summary["steps"]}
    assert "export" not in commands.values() and not any(n.startswith("q-") for n in commands)
    assert any("left out" in note and "ONNX Runtime" in note for note in summary["notes"])
    assert all(r["backend"] == "torch" for r in summary["rows"]) and summary["rows"][0]["name"] == "input"
    chosen = summary["chosen"]
    assert chosen is not None and chosen["meets"] and chosen["drop"] <= 1.0
    artifact = open_artifact(out / "chosen")
    assert artifact.has_weights and not artifact.has_onnx
    recipe = (out / "recipe.toml").read_text()
    assert "--backend torch" in recipe and "export" not in recipe
    assert "PyTorch" in (out / "report.md").read_text()
    rebuilt = tmp_path / "rebuilt"  # the recipe rebuilds the winner as the search built it
    assert cli("run", out / "recipe.toml", "--out", rebuilt, "--compare-rounds", "1").exit_code == 0
    again = open_artifact(rebuilt / chosen["name"])
    assert again.has_weights and not again.has_onnx and again.config["model"] == artifact.config["model"]


def test_torch_backend_dry_run_says_what_is_left_out(cli, digits_mlp, tmp_path):
    result = cli("optimize", digits_mlp, "--max-drop", "1.0", "--objective", "size", "--backend", "torch", "--dry-run",
                 "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    names = [s["name"] for s in plan["steps"]]
    assert plan["backend"] == "torch" and {"q-wo8", "q-wo4"} <= set(names)
    assert not {"q-dynamic", "q-static", "q-matmul-nbits", "qat", "fp32"} & set(names)
    assert all(s["command"] != "export" for s in plan["steps"])
    assert any("QAT left out" in n for n in plan["notes"]) and any("dynamic, static" in n for n in plan["notes"])


@pytest.mark.parametrize("args, fragments", [
    (("--backend", "torch", "--only", "quantize"), ("space is empty", "only on ONNX Runtime", "--backend onnx")),
    (("--backend", "torch", "--only", "qat"), ("space is empty", "QAT left out")),
    (("--backend", "tensorrt"), ("--backend 'tensorrt' is unknown", "onnx", "torch")),
    (("--threads", "0"), ("--threads must be between 1",)),
])
def test_backend_option_mismatch_is_one_line(cli, digits_mlp, tmp_path, args, fragments):
    out = tmp_path / "never"
    assert_one_error_line(cli("optimize", digits_mlp, "--max-drop", "1", *args, "--out", out), *fragments)
    assert not out.exists()


def test_language_model_search_prunes_and_distils(cli, tiny_gpt, tmp_path):
    """--only prune,distill on a GPT: a pruned and a distilled candidate are built (each exported) and
    measured against the input's perplexity; none is silently dropped (a refusal would carry its reason)."""
    summary = _json(cli("optimize", tiny_gpt, "--max-drop", "3%", *QUICK, "--only", "prune,distill", "--json",
                        "--out", tmp_path / "lm"))
    steps = {s["name"]: s for s in summary["steps"]}
    for name in ("sp-50", "sp-50.onnx", "d-w25", "d-w25.onnx"):
        assert steps[name]["status"] == "complete" or (steps[name]["status"] == "failed" and steps[name]["error"]), \
            steps[name]
    measured = {r["name"]: r for r in summary["rows"]}
    assert {"sp-50.onnx", "d-w25.onnx"} <= set(measured)  # both families reached the final comparison
    assert all(r["metric"] == "perplexity" and r["value"] > 1 and r["drop"] is not None for r in measured.values())
    assert measured["d-w25.onnx"]["params"] < measured["fp32"]["params"]
    chosen = summary["chosen"]
    assert chosen is None or chosen["value"] <= measured["fp32"]["value"] * 1.03 + 1e-9


@pytest.mark.parametrize("args, fragments", [
    ((), ("give a limit or a budget",)),
    (("--max-drop", "1", "--objective", "speed"), ("--objective 'speed' is unknown",)),
    (("--max-drop", "lots"), ("--max-drop 'lots' is not a number",)),
    (("--max-drop", "-1"), ("--max-drop must be",)),
    (("--max-drop", "1", "--time-budget", "soon"), ("--time-budget 'soon'",)),
    (("--max-drop", "1", "--only", "prune,magic"), ("--only", "magic")),
    (("--max-drop", "1", "--space", "huge"), ("--space 'huge' is unknown",)),
    (("--size-budget-mb", "0.0000001"), ("below what any candidate", "closest")),
])
def test_bad_input_is_one_line(cli, digits_mlp, tmp_path, args, fragments):
    out = tmp_path / "never"
    assert_one_error_line(cli("optimize", digits_mlp, *args, "--out", out), *fragments)
    assert not out.exists()


def test_a_budget_the_input_already_meets_returns_it(cli, digits_mlp, tmp_path):
    out = tmp_path / "never"
    assert_one_error_line(cli("optimize", digits_mlp, "--latency-budget-ms", "10000", "--out", out),
                          "already meets the budget", "use it as it is")
    assert not out.exists()


def test_an_existing_directory_that_is_not_a_search_is_refused(cli, digits_mlp, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_one_error_line(cli("optimize", digits_mlp, "--max-drop", "1", "--out", out), "already exists")
    assert_one_error_line(cli("optimize", digits_mlp, "--max-drop", "1", "--out", out, "--overwrite"),
                          "was not written by bigmodel")
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_search_of_another_space_is_not_continued(searched, cli, digits_mlp):
    out, _ = searched
    assert_one_error_line(cli("optimize", digits_mlp, "--max-drop", "1", "--space", "full", "--out", out),
                          "another input, space or runtime", "--overwrite")


def test_recipe_inputs_are_read_relative_to_the_recipe(tmp_path, digits_mlp):
    from bigmodel_cli.cli.recipe_file import parse_recipe

    recipe = tmp_path / "r.toml"
    model = Path(digits_mlp)
    recipe.write_text(f'[inputs]\nteacher = "{model}"\n\n[[steps]]\nname = "q"\ncommand = "quantize"\n'
                      'from = "teacher"\nmode = "dynamic"\nexport = true\n')
    parsed = parse_recipe(recipe)
    assert parsed.steps[0].refs == {"from": str(model.resolve())}


def test_a_damaged_state_file_is_refused_or_its_bad_entries_forgotten(searched, cli, tmp_path, digits_mlp):
    out, _ = searched
    copy = tmp_path / "search"
    shutil.copytree(out, copy)
    state_file = copy / "optimize-state.json"
    state = json.loads(state_file.read_text())
    args = ("optimize", digits_mlp, "--max-drop", "1.0", *QUICK, "--only", "quantize,distill", "--json", "--out", copy)
    state_file.write_text("[1, 2")
    assert_one_error_line(cli(*args), "cannot be read as an optimize state", "--overwrite")
    # entries edited into a cycle of parents, or with a row that is not numbers, must not hang or crash
    row = {"value": 0.9, "latency_ms_p50": 0.001, "file_bytes": 1, "nonzero_params": 1}
    state["steps"]["a"] = {"record": {"parent": "b", "options": {}, "command": "export"}, "status": "complete", "row": row}
    state["steps"]["b"] = {"record": {"parent": "a", "options": {}, "command": "export"}, "status": "complete", "row": row}
    state["steps"]["q-dynamic"]["row"] = {"value": "high"}
    state_file.write_text(json.dumps(state))
    summary = _json(cli(*args))
    assert {r["name"] for r in summary["rows"]}.isdisjoint({"a", "b"})
    assert {s["name"]: s["this_run"] for s in summary["steps"]}["q-dynamic"] == "ran"


def test_strategy_stops_a_branch_at_its_first_miss_retrains_near_misses_and_charts_past_them(tmp_path):
    """The search's decisions on made-up measurements: no model is trained."""
    from types import SimpleNamespace

    from bigmodel_cli.engine.core.progress import no_progress
    from bigmodel_cli.engine.optimize.search import Search, new_state
    from bigmodel_cli.engine.optimize.space import Goal, Plan, Step, export_of

    def pruned(level):
        return Step(f"sp-{level}", "prune", "input", {"method": "structured", "sparsity": level / 100,
                                                      "finetune-epochs": 2}, "prune", 5.0, branch="structured")

    steps = [Step("fp32", "export", "input", {}, "export", 5.0, measure=True)]
    for level in (25, 50, 75):
        steps += [pruned(level), export_of(pruned(level), 5.0)]
    search = Search(SimpleNamespace(has_onnx=False), tmp_path, Plan(steps), Goal(max_drop=1.0),
                    new_state({}, tmp_path / "model"), split="val", rounds=1, progress=no_progress)
    measured = {"fp32": (0.95, 1.0), "sp-25.onnx": (0.945, 0.8), "sp-50.onnx": (0.935, 0.5)}  # sp-50: 1.5 points
    for step in steps[:5]:
        entry = {"record": step.record(), "status": "complete", "seconds": 1.0, "estimate_s": 5.0}
        if step.name in measured:
            value, latency = measured[step.name]
            entry["row"] = {"name": step.name, "value": value, "latency_ms_p50": latency, "file_bytes": 100,
                            "nonzero_params": 10}
        search.state["steps"][step.name] = entry
        search.after(step)
    assert search.stopped == {"structured": "sp-50.onnx"}
    assert search.run_one(steps[5]) == "stopped"  # sp-75 is not tried in the first pass
    promoted = search.promote(1)  # sp-50 missed by 1.5 ≤ 3 × 1.0 and is faster than sp-25, which met
    assert [s.name for s in promoted] == ["sp-50-r1", "sp-50-r1.onnx"]
    assert promoted[0].options["finetune-epochs"] == 4 and promoted[0].rung == 1
    assert [s.name for s in search.chart()] == ["sp-75", "sp-75.onnx"]


def test_a_training_step_past_the_time_budget_is_stopped_and_runs_again_later(tmp_path, digits_mlp, monkeypatch):
    """A made-up estimate (0 s) lets a prune step start with no time left: its fine-tuning stops at the
    budget's end after one step instead of finishing, the step is recorded "over budget" (unmeasured,
    unused), and a run with time left builds it whole."""
    from types import SimpleNamespace

    from bigmodel_cli.engine.core.progress import no_progress
    from bigmodel_cli.engine.optimize.search import Search, new_state
    from bigmodel_cli.engine.optimize.space import Goal, Plan, Step

    step = Step("sp-50", "prune", "input", {"method": "structured", "sparsity": 0.5, "bench": False,
                                            "finetune-epochs": 1, "seed": 0}, "prune", 0.0, branch="structured")
    search = Search(SimpleNamespace(), tmp_path, Plan([step]), Goal(max_drop=1.0),
                    new_state({}, Path(digits_mlp) / "best"), split="val", rounds=1, progress=no_progress)
    monkeypatch.setattr(search, "time_left", lambda: 0.0)
    assert search.run_one(step) == "over budget"
    entry = search.state["steps"]["sp-50"]
    assert entry["status"] == "over budget" and "time budget" in entry["error"] and "row" not in entry

    def events() -> list:  # of prune's fine-tuning runs (one per pruning step)
        logs = sorted((tmp_path / "candidates" / "sp-50").rglob("metrics.jsonl"))
        assert logs
        return [json.loads(line) for log in logs for line in log.read_text().splitlines()]

    assert {"step": 1, "event": "deadline"} in events()
    monkeypatch.setattr(search, "time_left", lambda: 3600.0)
    assert search.run_one(step) == "ran" and search.state["steps"]["sp-50"]["status"] == "complete"
    assert all(e.get("event") != "deadline" for e in events()) and max(e["step"] for e in events()) > 1
