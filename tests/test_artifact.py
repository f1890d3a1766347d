"""The artifact format: atomic writes, verified loads, no pickle, tied weights."""

from __future__ import annotations

import json

import pytest
import torch

from bigmodel_cli import artifact as art
from bigmodel_cli.errors import UserError
from bigmodel_cli.models import build_model, resolve_spec


def _save(tmp_path, arch="mlp", name="a", **kw):
    spec = resolve_spec(arch, kw.pop("preset", None), kw.pop("overrides", None))
    torch.manual_seed(0)
    model = build_model(spec)
    task = "language-modeling" if arch == "gpt" else "classification"
    config = art.new_config(task, spec, {"name": "synthetic"})
    art.save_torch_artifact(tmp_path / name, model, config=config, stage="train", **kw)
    return model, tmp_path / name


def test_roundtrip_gives_identical_outputs(tmp_path):
    model, path = _save(tmp_path)
    loaded = art.open_artifact(path).build_model()
    x = torch.randn(5, 64)
    assert torch.equal(model(x), loaded(x))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["parent"] is None
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert "torch" in manifest["versions"]


def test_tied_gpt_weights_survive_a_roundtrip(tmp_path):
    model, path = _save(tmp_path, "gpt", preset="nano")
    loaded = art.open_artifact(path).build_model()
    assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model.eval()(idx), loaded(idx))


def test_modified_weights_are_refused(tmp_path):
    _, path = _save(tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the sha256"):
        art.open_artifact(path)


def test_truncated_weights_are_refused(tmp_path):
    _, path = _save(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt, truncated or edited"):
        art.open_artifact(path)


def test_malformed_config_is_a_user_error(tmp_path):
    _, path = _save(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(UserError):  # the hash check catches the edit first
        art.open_artifact(path)
    with pytest.raises(UserError, match="not valid JSON"):
        art.open_artifact(path, verify=False)


def test_existing_output_needs_overwrite(tmp_path):
    _save(tmp_path)
    with pytest.raises(UserError, match="--overwrite"):
        _save(tmp_path)
    _save(tmp_path, overwrite=True)  # allowed


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with art.atomic_directory(out) as staging:
            (staging / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash in the middle of a save")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_artifact(tmp_path):
    _, path = _save(tmp_path)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError):
        with art.atomic_directory(path, overwrite=True):
            raise RuntimeError("boom")
    assert (path / "manifest.json").read_bytes() == before
    art.open_artifact(path)


def test_parent_and_lineage(tmp_path):
    _, parent = _save(tmp_path, name="parent")
    _, child = _save(tmp_path, name="child", parent=art.open_artifact(parent))
    chain = art.open_artifact(child).lineage()
    assert [c["stage"] for c in chain] == ["train", "train"]
    assert chain[1]["found"] is True


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    _, path = _save(tmp_path)
    other, _ = _save(tmp_path, name="b", overrides={"hidden_sizes": [8]})
    config = json.loads((path / "config.json").read_text())
    config["model"]["hidden_sizes"] = [8]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not belong together"):
        art.open_artifact(path, verify=False).build_model()


def test_run_directory_resolves_to_best(digits_mlp):
    assert art.open_artifact(digits_mlp).path == (digits_mlp / "best").resolve()


def test_loading_never_unpickles(tmp_path, monkeypatch):
    """Load and run an artifact with every unpickling entry point booby-trapped."""
    import pickle

    model, path = _save(tmp_path)

    def trap(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "Unpickler", trap)
    monkeypatch.setattr(torch, "load", trap)
    loaded = art.open_artifact(path).build_model()
    assert torch.equal(loaded(torch.ones(1, 64)), model(torch.ones(1, 64)))
