"""Deployment: the exported model runs in a separate Python process that imports only onnxruntime
and numpy (importing torch or bigmodel fails there), from nothing but the files of the artifact
directory, and gives the same predictions as PyTorch. The script is the one docs/export.md tells
users to copy, extracted from the page, so the documentation cannot drift from what works."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from conftest import export_once

DOC = Path(__file__).resolve().parent.parent / "docs" / "export.md"
# Run before the snippet: torch and bigmodel cannot be imported, and at exit we prove they were not.
GUARD = """
import atexit, sys
for _name in ("torch", "bigmodel_cli", "safetensors"):
    sys.modules[_name] = None  # any `import torch` now raises ImportError
atexit.register(lambda: sys.stderr.write("IMPORTED:" + ",".join(sorted(m.split(".")[0] for m in sys.modules if sys.modules[m] is not None)) + "\\n"))
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def deploy_snippet() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- deploy-snippet -->\s*```python\n(.*?)```\s*<!-- /deploy-snippet -->", text, re.S)
    assert match, "docs/export.md lost its deploy snippet"
    return match.group(1)


def run_client(directory: Path, argument: str, cwd: Path) -> tuple[str, set[str]]:
    script = cwd / "deploy.py"
    script.write_text(GUARD + deploy_snippet())
    proc = subprocess.run([sys.executable, "-I", str(script), str(directory), argument], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = set(proc.stderr.rsplit("IMPORTED:", 1)[1].strip().split(","))
    return proc.stdout, imported


def only_artifact_files(export_dir: Path, dest: Path) -> Path:
    """The deployment directory: just the ONNX model and config.json, nothing from the parent."""
    dest.mkdir()
    for name in ("model.onnx", "config.json"):
        shutil.copyfile(export_dir / name, dest / name)
    return dest


def test_classifier_runs_without_torch_and_matches_pytorch(tmp_path, tmp_path_factory, digits_mlp):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.data.classification import preprocess
    from bigmodel_cli.engine.backends import open_backend
    from bigmodel_cli.engine.predict import softmax

    deploy = only_artifact_files(export_once(tmp_path_factory, digits_mlp), tmp_path / "deploy")
    with resources.files("bigmodel_cli.data").joinpath("digits.npz").open("rb") as handle:
        raw = np.load(handle, allow_pickle=False)["x"][100:164].astype(np.float32)
    np.save(tmp_path / "samples.npy", raw)

    stdout, imported = run_client(deploy, str(tmp_path / "samples.npy"), tmp_path)
    assert "onnxruntime" in imported and "numpy" in imported
    assert not imported & {"torch", "bigmodel_cli", "safetensors"}
    client = [json.loads(line) for line in stdout.splitlines()]

    parent = open_artifact(digits_mlp)  # the PyTorch model the export came from
    probs = softmax(open_backend(parent, "torch").predict(preprocess(raw, parent.data_spec)))
    names = parent.data_spec["class_names"]
    assert [c["class"] for c in client] == [names[i] for i in probs.argmax(-1)]
    np.testing.assert_allclose([c["probability"] for c in client], probs.max(-1), atol=1e-5)


@pytest.mark.parametrize("dynamic", ["batch,seq", "none"])
def test_language_model_runs_without_torch_and_matches_pytorch(tmp_path, tmp_path_factory, tiny_gpt, dynamic):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.backends import open_backend

    args = () if dynamic == "batch,seq" else ("--dynamic", "none", "--exporter", "torchscript")
    export_dir = export_once(tmp_path_factory, tiny_gpt, *args)
    deploy = only_artifact_files(export_dir, tmp_path / "deploy")
    prompt = "def fill(text, width=70"  # 23 bytes + 40 generated: longer than a 32-byte window
    stdout, imported = run_client(deploy, prompt, tmp_path)
    assert "torch" not in imported

    # PyTorch, greedy, with the context the exported graph allows
    exported = open_artifact(export_dir)
    seq = exported.config["onnx"]["inputs"][0]["shape"][1]
    context = seq if isinstance(seq, int) else exported.model_spec["block_size"]
    predict = open_backend(open_artifact(tiny_gpt), "torch").predict
    tokens = list(prompt.encode())
    for _ in range(40):
        tokens.append(int(predict(np.array([tokens[-context:]]))[0, -1].argmax()))
    assert stdout.rstrip("\n") == bytes(tokens).decode("utf-8", errors="replace")
