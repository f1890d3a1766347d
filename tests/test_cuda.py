"""The CUDA paths (issue 3: `--device cuda`, fp16 for CUDA deployments; training on a GPU).

Marked `gpu` and deselected by default (pyproject's addopts); run them with `pytest -m gpu` on a
machine with a CUDA build of torch and onnxruntime-gpu. Without both they skip, saying which is
missing. They have not run on this project's CPU-only machines yet.
"""

from __future__ import annotations

import json

import numpy as np
import pytest


def _missing() -> str | None:
    """Why the CUDA paths cannot run here, or None. Checked at collection, so a machine without a
    GPU skips before any fixture trains a model."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return "torch has no CUDA device here"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


_MISSING = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_training_on_cuda_writes_a_cpu_loadable_artifact(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--device", "cuda", "--epochs", "1", "--out", out)
    assert r.exit_code == 0, r.output
    r = cli("eval", out, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] > 0.5


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_on_cuda_verifies_with_the_cuda_provider(cli, digits_mlp, tmp_path, dtype):
    out = tmp_path / f"onnx-{dtype}"
    r = cli("export", digits_mlp, "--out", out, "--device", "cuda", "--dtype", dtype)
    assert r.exit_code == 0, r.output
    verification = _manifest(out)["verification"]
    assert verification["provider"] == "CUDAExecutionProvider"
    assert verification["passed"] and verification["max_abs_diff"] <= verification["atol"]

    r = cli("eval", out, "--backend", "onnx", "--device", "cuda", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["provider"] == "CUDAExecutionProvider"
    cpu = json.loads(cli("eval", out, "--backend", "onnx", "--device", "cpu", "--json").stdout)
    assert report["accuracy"] == pytest.approx(cpu["accuracy"], abs=0.01)  # fp16 may flip a borderline sample


def test_cuda_and_cpu_sessions_agree(mlp_onnx):
    from bigmodel_cli.engine.onnx.runtime import open_session, session_predict

    x = np.random.default_rng(0).standard_normal((7, 1, 8, 8)).astype(np.float32)
    cuda, _ = open_session(mlp_onnx / "model.onnx", device="cuda")
    cpu, _ = open_session(mlp_onnx / "model.onnx", device="cpu")
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(session_predict(cuda)(x), session_predict(cpu)(x), atol=1e-4)
