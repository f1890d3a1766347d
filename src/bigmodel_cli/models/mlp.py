"""A multi-layer perceptron: input → (Linear, ReLU) × depth → Linear.

Inputs of any shape are flattened, so the same model takes 8×8 digits or tabular rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MLPConfig:
    input_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [128])
    num_classes: int = 10
    dropout: float = 0.0


def dense_layers(width: int, hidden_sizes: list[int], num_classes: int, dropout: float) -> list[nn.Module]:
    """Linear → ReLU (→ Dropout) per hidden size, then the Linear to the classes: the MLP, and the
    CNN's head. The order fixes the parameter names (``net.0.weight``, ``head.3.bias``…) that
    checkpoints and structured pruning rely on."""
    layers: list[nn.Module] = []
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return layers


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(*dense_layers(config.input_size, config.hidden_sizes, config.num_classes,
                                               config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


PRESETS = {
    "tiny": {"hidden_sizes": [32]},
    "small": {"hidden_sizes": [128]},
    "base": {"hidden_sizes": [512, 512]},
}
DEFAULT_PRESET = "small"
