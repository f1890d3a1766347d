"""The model registry: architectures, presets, overrides, user files."""

from __future__ import annotations

import pytest
import torch

from bigmodel_cli.errors import UserError
from bigmodel_cli.models import build_model, meta_parameter_count, resolve_spec


@pytest.mark.parametrize("preset,low,high", [("nano", 0.08e6, 0.2e6), ("micro", 0.8e6, 1.3e6), ("mini", 9e6, 12e6),
                                             ("gpt2", 120e6, 128e6), ("7b", 6.4e9, 7.1e9), ("70b", 66e9, 72e9)])
def test_gpt_presets_have_their_advertised_size(preset, low, high):
    assert low <= meta_parameter_count(resolve_spec("gpt", preset)) <= high


def test_gpt2_preset_matches_gpt2_small():
    # GPT-2 small: 124,439,808 parameters with tied embeddings and 1024 positions.
    assert meta_parameter_count(resolve_spec("gpt", "gpt2")) == 124_439_808


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_model(resolve_spec("gpt", "nano")).eval()
    idx = torch.randint(0, 256, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 256
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


@pytest.mark.parametrize("arch,shape", [("mlp", (3, 64)), ("cnn", (3, 1, 8, 8))])
def test_classifiers_output_one_logit_per_class(arch, shape):
    model = build_model(resolve_spec(arch, None, {"num_classes": 7}))
    assert model(torch.randn(*shape)).shape == (3, 7)


def test_overrides_win_over_presets_and_data():
    spec = resolve_spec("mlp", "base", {"hidden_sizes": [5]}, {"input_size": 10, "num_classes": 3})
    assert spec["hidden_sizes"] == [5] and spec["input_size"] == 10 and spec["num_classes"] == 3


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        resolve_spec("resnet")
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        resolve_spec("gpt", "huge")
    with pytest.raises(UserError, match="unknown mlp argument 'widths'"):
        resolve_spec("mlp", None, {"widths": [3]})
    with pytest.raises(UserError, match="positive integer"):
        resolve_spec("mlp", None, {"hidden_sizes": [0]})


def test_user_model_file_needs_trust_to_load(tmp_path, monkeypatch):
    from bigmodel_cli.models import user

    monkeypatch.delenv("BIGMODEL_TRUST_MODEL_CODE", raising=False)
    monkeypatch.setattr(user, "_TRUSTED", set())
    file = tmp_path / "net.py"
    file.write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self, width=4):\n        super().__init__()\n"
                    "        self.fc = torch.nn.Linear(64, width)\n    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    spec = {"arch": "user", "file": str(file), "entry": "Net", "args": {"width": 6}}
    with pytest.raises(UserError, match="--trust-model-code"):
        build_model(spec)
    user.trust_file(file)
    assert build_model(spec)(torch.randn(2, 64)).shape == (2, 6)
