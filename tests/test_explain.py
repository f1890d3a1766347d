"""bigmodel explain: attribution maths, completeness on every architecture, the three input kinds,
--compare, --samples, ONNX artifacts, and one-line errors that write nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bigmodel_cli.artifact import open_artifact
from bigmodel_cli.engine.explain import attribution as A
from bigmodel_cli.engine.explain.command import ExplainOptions, explain, explanation_agreement


def _one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def _digit(artifact_dir: Path, split: str = "test", row: int = 0) -> np.ndarray:
    """A raw (0–16) digit from the artifact's own split, as the user would have it."""
    from bigmodel_cli.engine.core.datasets import open_data

    data = open_data(open_artifact(artifact_dir))
    return data.x[data.splits[split]][row]


# --------------------------------------------------------------------------- the maths


def test_integrated_gradients_is_exact_for_a_linear_model_and_saliency_is_the_weight():
    w = np.array([0.5, -2.0, 3.0])

    def grad_fn(points):  # f(x) = w·x + 1
        return points @ w + 1.0, np.tile(w, (len(points), 1))

    x, b = np.array([1.0, 2.0, -1.0]), np.array([0.5, 0.0, 0.0])
    result = A.integrated_gradients(grad_fn, x, b)
    np.testing.assert_allclose(result.values, w * (x - b), rtol=1e-6)
    assert result.intervals == A.DEFAULT_INTERVALS and result.completeness_gap < 1e-6
    np.testing.assert_allclose(A.saliency(grad_fn, x).values, np.abs(w), rtol=1e-6)


def test_refinement_doubles_the_grid_until_completeness_holds():
    # f(x) = relu(x0 − 0.3) · 10: its gradient jumps along the path, so a coarse grid misses the sum
    def grad_fn(points):
        on = (points[:, 0] - 0.3 > 0).astype(float)
        grads = np.zeros_like(points)
        grads[:, 0] = 10 * on
        return 10 * np.maximum(points[:, 0] - 0.3, 0), grads

    x, b = np.array([1.0, 0.0]), np.zeros(2)
    coarse = A.integrated_gradients(grad_fn, x, b, intervals=3)
    assert coarse.completeness_gap > 0.01
    auto = A.integrated_gradients(grad_fn, x, b, start=3, tolerance=0.01)
    assert auto.intervals > 3 and auto.completeness_gap <= 0.01
    assert auto.values[0] == pytest.approx(7.0, rel=0.01) and auto.values[1] == 0


def test_rank_correlation_matches_scipy_with_ties_and_top_k_overlap():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 4, size=50).astype(float)  # many ties, signs mixed
    b = a + rng.normal(scale=2.0, size=50)
    assert A.rank_correlation(a, b) == pytest.approx(stats.spearmanr(np.abs(a), np.abs(b)).statistic, abs=1e-12)
    assert A.rank_correlation(a, a) == pytest.approx(1.0)
    assert A.rank_correlation(np.arange(5.0), -np.arange(5.0)[::-1]) == pytest.approx(-1.0)
    assert np.isnan(A.rank_correlation(np.zeros(4), np.arange(4.0)))
    # features both leave at zero (inputs equal to the baseline) are not counted as agreement
    shared_zeros = np.r_[np.zeros(20), 1.0, 2.0, 3.0]
    assert A.rank_correlation(shared_zeros, np.r_[np.zeros(20), 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert A.top_k_overlap(np.array([5, 4, 0, 0, 1.0]), np.array([-5, 0, 4, 0, 0.0]), 2) == 0.5
    assert A.default_top_k(64) == 10 and A.default_top_k(12) == 3 and A.default_top_k(2) == 1


def test_finite_differences_agree_with_autograd(digits_mlp):
    import torch

    from bigmodel_cli.data.classification import preprocess

    artifact = open_artifact(digits_mlp)
    model = artifact.build_model()
    x = preprocess(_digit(digits_mlp)[None], artifact.data_spec)[0].astype(np.float64)
    b = preprocess(np.zeros((1, 1, 8, 8)), artifact.data_spec)[0].astype(np.float64)
    target = 3
    auto = A.integrated_gradients(A.torch_gradients(lambda p: model(p)[:, target]), x, b, intervals=64)
    fd_fn = A.finite_difference_gradients(lambda batch: model(torch.from_numpy(batch)).detach().numpy()[:, target])
    fd = A.integrated_gradients(fd_fn, x, b, intervals=64)
    assert A.rank_correlation(auto.values, fd.values) > 0.99
    np.testing.assert_allclose(fd.values, auto.values, atol=0.02 * np.abs(auto.values).max())


# --------------------------------------------------------------------------- completeness, each architecture


def _reference_delta_classifier(run_dir: Path, raw: np.ndarray, target: int) -> float:
    """f(input) − f(black image), computed here from the model, not by explain."""
    import torch

    from bigmodel_cli.data.classification import preprocess

    artifact = open_artifact(run_dir)
    model = artifact.build_model()
    batch = preprocess(np.stack([raw, np.zeros_like(raw)]), artifact.data_spec)
    with torch.no_grad():
        out = model(torch.from_numpy(batch))[:, target].double().numpy()
    return float(out[0] - out[1])


@pytest.mark.parametrize("fixture", ["digits_mlp", "digits_cnn"])
def test_completeness_within_one_percent_on_image_classifiers(request, fixture):
    run_dir = request.getfixturevalue(fixture)
    for row in range(4):
        e = explain(run_dir, split="test", row=row).explanation
        delta = _reference_delta_classifier(run_dir, _digit(run_dir, row=row), e.target)
        assert abs(delta) > 1e-3
        assert abs(e.values.sum() - delta) <= 0.01 * abs(delta), (row, e.values.sum(), delta, e.intervals)
        assert e.target == e.prediction and e.values.shape == (1, 8, 8)


def test_completeness_within_one_percent_on_gpt(tiny_gpt):
    import torch

    model = open_artifact(tiny_gpt).build_model()
    for prompt in ("def wrap(text, width", "    return "):
        e = explain(tiny_gpt, prompt=prompt).explanation
        ids = torch.tensor([list(prompt.encode())])
        with torch.no_grad():  # reference: the model fed token embeddings vs zero embeddings, positions kept

            def last_logit(tok):
                x = tok + model.pos_emb(torch.arange(ids.shape[1]))
                for block in model.blocks:
                    x = block(x)
                return float(model.lm_head(model.ln_f(x))[0, -1, e.target])

            emb = model.tok_emb(ids)
            delta = last_logit(emb) - last_logit(torch.zeros_like(emb))
        assert e.values.shape == (len(prompt),)
        assert abs(e.values.sum() - delta) <= 0.01 * abs(delta), (prompt, e.values.sum(), delta)


# --------------------------------------------------------------------------- images


def test_image_from_npy_writes_png_with_three_panels(cli, tmp_path, digits_mlp):
    np.save(tmp_path / "digit.npy", _digit(digits_mlp))
    out = tmp_path / "pictures" / "why.png"
    result = cli("explain", digits_mlp, tmp_path / "digit.npy", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["kind"] == "image" and d["method"] == "integrated-gradients" and d["baseline"] == "zeros"
    assert np.asarray(d["attributions"]).shape == (1, 8, 8) and d["completeness_gap"] <= 0.01
    from PIL import Image

    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 2 * img.size[1]  # panels side by side
        assert json.loads(img.text["Description"])["artifact"] == d["artifact"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_png_input_explains_like_the_array(cli, tmp_path, digits_mlp):
    import matplotlib.image as mpimg

    raw = _digit(digits_mlp, row=5)
    np.save(tmp_path / "digit.npy", raw)
    mpimg.imsave(tmp_path / "digit.png", raw[0] / 16.0, cmap="gray", vmin=0, vmax=1)
    from_png = json.loads(cli("explain", digits_mlp, tmp_path / "digit.png", "--json").stdout)
    from_npy = json.loads(cli("explain", digits_mlp, tmp_path / "digit.npy", "--json").stdout)
    assert from_png["prediction"] == from_npy["prediction"]
    np.testing.assert_allclose(from_png["input"], from_npy["input"], atol=16 / 255)
    assert A.rank_correlation(np.asarray(from_png["attributions"]), np.asarray(from_npy["attributions"])) > 0.98


def test_saliency_and_blur_baseline_and_target_by_name(cli, tmp_path, digits_cnn):
    np.save(tmp_path / "batch.npy", np.stack([_digit(digits_cnn, row=r) for r in range(3)]))
    sal = json.loads(cli("explain", digits_cnn, tmp_path / "batch.npy", "--row", "2", "--method", "saliency",
                         "--target", "7", "--json").stdout)
    assert sal["method"] == "saliency" and sal["target"] == 7 and sal["baseline"] is None
    assert np.min(sal["attributions"]) >= 0 and np.max(sal["attributions"]) > 0
    blur = json.loads(cli("explain", digits_cnn, tmp_path / "batch.npy", "--row", "2", "--baseline", "blur",
                          "--steps", "32", "--json").stdout)
    assert blur["baseline"] == "blur" and blur["intervals"] == 32
    # completeness holds against the blurred image, whose score is not the black image's
    assert abs(blur["attribution_sum"] - (blur["score"] - blur["baseline_score"])) < 0.05 * abs(blur["score"] - blur["baseline_score"])
    table = cli("explain", digits_cnn, tmp_path / "batch.npy", "--row", "2")
    assert table.exit_code == 0 and "completeness gap" in table.stdout and "attribution" in table.stdout


# --------------------------------------------------------------------------- tabular rows


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    """An MLP on a CSV where only the column 'signal' decides the class."""
    from bigmodel_cli import TrainConfig, train

    root = tmp_path_factory.mktemp("tabular")
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 4))
    lines = ["noise_a,signal,noise_b,noise_c,label"] + [
        f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{r[3]:.4f},{'yes' if r[1] > 0 else 'no'}" for r in rows]
    (root / "rows.csv").write_text("\n".join(lines) + "\n")
    train(TrainConfig(model="mlp", hidden_sizes=[16], data=f"csv:{root / 'rows.csv'}", target="label",
                      epochs=25, lr=1e-2, out=str(root / "run"), seed=0))
    return root


def test_csv_row_gives_a_ranked_table_led_by_the_signal(cli, tabular_run):
    csv_path = tabular_run / "rows.csv"
    result = cli("explain", tabular_run / "run", csv_path, "--row", "2", "--json")  # signal −1.27
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["kind"] == "tabular" and d["baseline"] == "mean" and d["features"][1] == "signal"
    assert int(np.argmax(np.abs(d["attributions"]))) == 1
    assert d["completeness_gap"] <= 0.01 and d["target_name"] in ("yes", "no")
    table = cli("explain", tabular_run / "run", csv_path, "--row", "2", "--target", "yes")
    assert table.exit_code == 0, table.output
    assert table.stdout.index("signal") < table.stdout.index("noise_a")  # strongest first


def test_samples_without_compare_is_a_global_importance(cli, tmp_path, tabular_run):
    out = tmp_path / "importance.png"
    result = cli("explain", tabular_run / "run", "--data", "test", "--samples", "8", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["samples"] == 8 and d["completeness_gap"]["max"] <= 0.01
    assert d["features"][int(np.argmax(d["mean_abs_attribution"]))] == "signal"
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- language models


def test_prompt_tokens_as_coloured_text_and_html(cli, tmp_path, tiny_gpt):
    prompt = "import os\nx = "
    out = tmp_path / "tokens.html"
    result = cli("explain", tiny_gpt, prompt, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [t["text"] for t in d["tokens"]] == list(prompt)
    assert d["completeness_gap"] <= 0.01
    page = out.read_text(encoding="utf-8")
    assert page.count("<span ") == len(prompt)
    titles = [float(v) for v in re.findall(r'title="([^"]+)"', page)]
    assert sum(titles) == pytest.approx(d["attribution_sum"], rel=1e-2, abs=1e-3)
    shown = cli("explain", tiny_gpt, "--prompt", prompt, "--target", "e")
    assert shown.exit_code == 0, shown.output
    assert "'e'" in shown.stdout and "import os" in shown.stdout


def test_multibyte_characters_are_grouped(tiny_gpt):
    e = explain(tiny_gpt, prompt="é = 1").explanation
    tokens = e.to_dict()["tokens"]
    assert e.values.shape == (6,) and [t["text"] for t in tokens] == list("é = 1")
    assert tokens[0]["end"] - tokens[0]["start"] == 2


# --------------------------------------------------------------------------- --compare and --samples


def test_compare_with_itself_agrees_completely_and_with_another_model_less(cli, tmp_path, digits_mlp, digits_cnn):
    same = json.loads(cli("explain", digits_mlp, "--data", "test", "--row", "1", "--compare", digits_mlp, "--json").stdout)
    assert same["compare"]["rank_correlation"] == pytest.approx(1.0) and same["compare"]["top_k_overlap"] == 1.0
    out = tmp_path / "side-by-side.png"
    result = cli("explain", digits_mlp, "--data", "test", "--row", "1", "--compare", digits_cnn, "--top-k", "5",
                 "--out", out, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    cmp = d["compare"]
    assert cmp["target"] == d["target"]  # the same question is asked of both models
    assert cmp["top_k"] == 5 and -1 <= cmp["rank_correlation"] < 1 and 0 <= cmp["top_k_overlap"] <= 1
    assert not np.allclose(cmp["attributions"], d["attributions"])
    from PIL import Image

    with Image.open(out) as img:
        meta = json.loads(img.text["Description"])
    assert meta["compare"] == cmp["artifact"] and meta["rank_correlation"] == pytest.approx(cmp["rank_correlation"])


def test_samples_summary_and_the_engine_function_for_compare(cli, digits_mlp, digits_cnn, tiny_gpt):
    result = cli("explain", digits_mlp, "--data", "val", "--samples", "5", "--compare", digits_cnn, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["compare"]
    assert len(d["rank_correlations"]) == 5
    assert d["mean_rank_correlation"] == pytest.approx(np.mean(d["rank_correlations"]))
    summary = explanation_agreement(digits_mlp, digits_cnn, split="val", samples=5)
    assert summary["mean_rank_correlation"] == pytest.approx(d["mean_rank_correlation"])
    assert summary["samples"] == 5 and 0 <= summary["mean_top_k_overlap"] <= 1
    assert explanation_agreement(tiny_gpt, tiny_gpt, samples=2)["mean_rank_correlation"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- ONNX artifacts


@pytest.fixture(scope="module")
def onnx_only(tmp_path_factory, digits_mlp, tiny_gpt):
    """ONNX-only exports (no model.safetensors) of the digits MLP and the tiny GPT."""
    from bigmodel_cli.engine.onnx.export import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("onnx")
    for name, run in (("mlp", digits_mlp), ("gpt", tiny_gpt)):
        export_artifact(open_artifact(run), root / name, ExportOptions(weights=False, exporter="torchscript"))
    return root


def _orphan(src: Path, dst: Path) -> Path:
    """A copy whose manifest names a parent that no longer exists (the manifest itself is not hashed)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["parent"]["path"] = str(dst.parent / "deleted-parent")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_onnx_only_classifier_by_finite_differences_and_through_its_parent(cli, onnx_only, digits_mlp):
    args = ("--data", "test", "--row", "2", "--json")
    torch_side = json.loads(cli("explain", digits_mlp, *args).stdout)
    fd = json.loads(cli("explain", onnx_only / "mlp", *args).stdout)
    assert fd["via"] == "onnx finite differences" and fd["explained_with"] == str((onnx_only / "mlp").resolve())
    assert fd["completeness_gap"] <= 0.01
    assert A.rank_correlation(np.asarray(fd["attributions"]), np.asarray(torch_side["attributions"])) > 0.99
    parent = json.loads(cli("explain", onnx_only / "mlp", *args, "--through", "torch").stdout)
    assert parent["via"] == "pytorch ancestor" and parent["explained_with"] == torch_side["artifact"]
    np.testing.assert_allclose(parent["attributions"], torch_side["attributions"])
    assert any("ancestor" in n for n in parent["notes"])


def test_onnx_only_language_model_is_explained_through_its_parent(cli, onnx_only, tiny_gpt):
    d = json.loads(cli("explain", onnx_only / "gpt", "def f(", "--json").stdout)
    direct = json.loads(cli("explain", tiny_gpt, "def f(", "--json").stdout)
    assert d["via"] == "pytorch ancestor"
    assert [t["value"] for t in d["tokens"]] == pytest.approx([t["value"] for t in direct["tokens"]])


def test_onnx_only_without_a_parent_is_one_line_exit_2(cli, tmp_path, onnx_only):
    gpt = _orphan(onnx_only / "gpt", tmp_path / "gpt")
    _one_error_line(cli("explain", gpt, "def f("), "ONNX-only", "no PyTorch parent")
    mlp = _orphan(onnx_only / "mlp", tmp_path / "mlp")
    _one_error_line(cli("explain", mlp, "--data", "test", "--through", "torch"), "no PyTorch parent")
    _one_error_line(cli("explain", gpt, "def f(", "--through", "onnx"), "language model")


# --------------------------------------------------------------------------- bad input: one line, exit 2, nothing written


def test_bad_inputs_are_one_line_and_write_nothing(cli, tmp_path, digits_mlp, tiny_gpt):
    out = tmp_path / "never.png"
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5)))
    _one_error_line(cli("explain", digits_mlp, tmp_path / "wrong.npy", "--out", out), "does not fit", "1×8×8")
    np.save(tmp_path / "ok.npy", _digit(digits_mlp))
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--target", "12", "--out", out), "out of range", "10 classes")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--target", "cat"), "not a class")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "missing.npy"), "no such file")
    _one_error_line(cli("explain", digits_mlp), "exactly one input")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--steps", "0"), "--steps")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--method", "saliency", "--baseline", "mean"), "--baseline")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--out", tmp_path / "x.html"), ".png")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--compare", tiny_gpt), "--compare")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--row", "1"), "one sample")
    _one_error_line(cli("explain", tiny_gpt, "x" * 100), "context is 64")
    _one_error_line(cli("explain", tiny_gpt, "abc", "--target", "ab"), "one byte")
    _one_error_line(cli("explain", digits_mlp, "--data", "test", "--samples", "0"), "--samples")
    assert not out.exists() and not list(tmp_path.glob(".*"))
    out.write_bytes(b"keep me")
    _one_error_line(cli("explain", digits_mlp, tmp_path / "ok.npy", "--out", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert cli("explain", digits_mlp, tmp_path / "ok.npy", "--out", out, "--overwrite").exit_code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_installed_entry_point_error_in_a_subprocess(tmp_path, digits_mlp):
    exe = Path(sys.executable).with_name("bigmodel")
    np.save(tmp_path / "wrong.npy", np.zeros(7))
    proc = subprocess.run([str(exe), "explain", str(digits_mlp), str(tmp_path / "wrong.npy")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not fit" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_options_object_rejects_every_problem_at_once():
    from bigmodel_cli.errors import ConfigErrors

    with pytest.raises(ConfigErrors) as info:
        ExplainOptions(method="lime", steps=0, baseline="noise", through="gpu").check()
    assert len(info.value.problems) == 4
