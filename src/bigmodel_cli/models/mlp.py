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


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.input_size
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


PRESETS = {
    "tiny": {"hidden_sizes": [32]},
    "small": {"hidden_sizes": [128]},
    "base": {"hidden_sizes": [512, 512]},
}
DEFAULT_PRESET = "small"
