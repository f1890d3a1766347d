"""bigmodel predict (npy, csv, png, pgm → class, probabilities, top-k) and bigmodel generate, on
PyTorch and ONNX artifacts alike."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from conftest import export_once


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def raw_digits():
    """Raw (un-normalized) digits as a user would have them: pixel values 0–16, and the labels."""
    with resources.files("bigmodel_cli.data").joinpath("digits.npz").open("rb") as handle:
        arrays = np.load(handle, allow_pickle=False)
        return arrays["x"][:40].astype(np.float32), arrays["y"][:40]


def _predict(cli, *args):
    r = cli("predict", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_predict_npy_on_both_backends_agrees_with_the_labels(cli, tmp_path, mlp_onnx, digits_mlp, raw_digits):
    x, y = raw_digits
    np.save(tmp_path / "batch.npy", x)  # (N, 8, 8): fitted to the model's 1×8×8
    onnx_r = _predict(cli, mlp_onnx, tmp_path / "batch.npy", "--top-k", "4")
    torch_r = _predict(cli, digits_mlp, tmp_path / "batch.npy")
    assert onnx_r["backend"] == "onnx" and onnx_r["provider"] == "CPUExecutionProvider" and torch_r["backend"] == "torch"
    assert onnx_r["samples"] == len(y)
    onnx_classes = [p["class_index"] for p in onnx_r["predictions"]]
    assert onnx_classes == [p["class_index"] for p in torch_r["predictions"]]
    assert np.mean(np.array(onnx_classes) == y) > 0.8  # raw inputs were normalized like training data
    first = onnx_r["predictions"][0]
    assert abs(sum(first["probabilities"]) - 1) < 1e-6 and len(first["top_k"]) == 4
    probs = [t["probability"] for t in first["top_k"]]
    assert probs == sorted(probs, reverse=True) and first["top_k"][0]["class_index"] == first["class_index"]
    assert first["probability"] == pytest.approx(torch_r["predictions"][0]["probability"], abs=1e-5)


def test_predict_csv_rows_and_one_sample(cli, tmp_path, mlp_onnx, raw_digits):
    x, _ = raw_digits
    header = ",".join(f"p{i}" for i in range(64))
    np.savetxt(tmp_path / "rows.csv", x[:5].reshape(5, -1), delimiter=",", header=header, comments="")
    np.save(tmp_path / "one.npy", x[3])
    rows = _predict(cli, mlp_onnx, tmp_path / "rows.csv")
    one = _predict(cli, mlp_onnx, tmp_path / "one.npy")
    assert rows["samples"] == 5 and one["samples"] == 1
    assert one["predictions"][0]["class_index"] == rows["predictions"][3]["class_index"]


def test_predict_images_png_and_pgm(cli, tmp_path, mlp_onnx, raw_digits):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x, _ = raw_digits
    np.save(tmp_path / "d.npy", x[:8])
    expected = [p["class_index"] for p in _predict(cli, mlp_onnx, tmp_path / "d.npy")["predictions"]]
    for i in range(8):
        plt.imsave(tmp_path / f"d{i}.png", x[i], cmap="gray", vmin=0, vmax=16)  # RGBA, ink bright
        pgm = np.round(x[i] / 16 * 255).astype(np.uint8)
        (tmp_path / f"d{i}.pgm").write_bytes(b"P5\n# digit\n8 8\n255\n" + pgm.tobytes())
        for suffix in ("png", "pgm"):
            r = _predict(cli, mlp_onnx, tmp_path / f"d{i}.{suffix}", "--pixel-max", "16")
            assert r["predictions"][0]["class_index"] == expected[i], (i, suffix)


def test_predict_bad_inputs_exit_2(cli, tmp_path, mlp_onnx, gpt_onnx):
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5), dtype=np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "notes.txt").write_text("1,2,3")
    (tmp_path / "notes.doc").write_text("1,2,3")
    (tmp_path / "big.pgm").write_bytes(b"P5 16 16 255\n" + bytes(256))
    (tmp_path / "bad.csv").write_text("1,2,3\n4,x,6\n")
    cases = {
        "wrong.npy": "samples of 1×8×8", "objects.npy": "pickle", "notes.doc": "unsupported input",
        "notes.txt": "shape 1×3 does not fit", "big.pgm": "resize the image",
        "bad.csv": "line 2, column 2: 'x' is not a finite number", "missing.npy": "no such file",
    }
    for name, message in cases.items():
        r = cli("predict", mlp_onnx, tmp_path / name)
        assert r.exit_code == 2 and message in r.stderr, (name, r.output)
        assert "Traceback" not in r.output
    lm = cli("predict", gpt_onnx, tmp_path / "wrong.npy")
    assert lm.exit_code == 2 and "bigmodel generate" in lm.stderr


def _generate(cli, artifact, *args):
    r = cli("generate", artifact, "--prompt", "def wrap(text", "--max-new-tokens", "24", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_generate_is_the_same_on_torch_and_onnx(cli, gpt_onnx):
    for flags in (("--temperature", "0"), ("--temperature", "0.9", "--top-k", "20", "--seed", "3")):
        torch_r = _generate(cli, gpt_onnx, "--backend", "torch", *flags)
        onnx_r = _generate(cli, gpt_onnx, "--backend", "onnx", *flags)
        assert onnx_r["provider"] == "CPUExecutionProvider"
        assert len(onnx_r["tokens"]) == 24 and onnx_r["tokens"] == torch_r["tokens"], flags
        assert onnx_r["text"] == bytes(onnx_r["tokens"]).decode("utf-8", errors="replace")
    other_seed = _generate(cli, gpt_onnx, "--temperature", "0.9", "--top-k", "20", "--seed", "4")
    assert other_seed["tokens"] != onnx_r["tokens"]


def test_generate_greedy_matches_the_model_argmax(gpt_onnx):
    """Greedy decoding from ONNX is exactly 'append the torch model's most likely next byte'."""
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.backends import open_backend
    from bigmodel_cli.engine.generate import GenerateConfig, generate_text

    a = open_artifact(gpt_onnx)
    out = generate_text(a, GenerateConfig(prompt="import ", max_new_tokens=6, temperature=0, backend="onnx"))
    predict = open_backend(a, "torch").predict
    tokens = list(b"import ")
    for _ in range(6):
        tokens.append(int(predict(np.array([tokens]))[0, -1].argmax()))
    assert out["tokens"] == tokens[len(b"import "):]


def test_generate_with_a_fixed_sequence_length_pads_correctly(tmp_path_factory, tiny_gpt):
    """A graph exported with --dynamic none has a fixed sequence length: the context is right-padded,
    which (causal attention) gives exactly the logits of the unpadded context."""
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.backends import open_backend
    from bigmodel_cli.engine.generate import GenerateConfig, generate_text, generate_tokens

    static = open_artifact(export_once(tmp_path_factory, tiny_gpt, "--dynamic", "none", "--exporter", "torchscript"))
    window = static.data_spec["block_size"]
    assert static.config["onnx"]["inputs"][0]["shape"] == [1, window]
    cfg = GenerateConfig(prompt="class TextWrapper:", max_new_tokens=30, temperature=0.7, seed=1, backend="onnx")
    onnx_r = generate_text(static, cfg)
    assert onnx_r["context"] == window
    torch_tokens = generate_tokens(open_backend(static, "torch").predict, list(cfg.prompt.encode()), cfg, context=window)
    assert onnx_r["tokens"] == torch_tokens[len(cfg.prompt):]


def test_generate_bad_inputs_exit_2(cli, gpt_onnx, mlp_onnx):
    empty = cli("generate", gpt_onnx, "--prompt", "")
    assert empty.exit_code == 2 and "--prompt must not be empty" in empty.stderr
    both = cli("generate", gpt_onnx, "--prompt", "x", "--temperature", "-1", "--max-new-tokens", "0")
    assert both.exit_code == 2 and "--temperature" in both.stderr and "--max-new-tokens" in both.stderr
    classifier = cli("generate", mlp_onnx, "--prompt", "x")
    assert classifier.exit_code == 2 and "bigmodel predict" in classifier.stderr
