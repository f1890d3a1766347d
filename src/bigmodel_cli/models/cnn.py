"""A small convolutional classifier: (Conv3×3, ReLU, MaxPool2) per stage, then a linear head.

Pooling halves the image while it is at least 2 pixels wide, so 8×8 digits and 32×32 images
both work with the same configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .mlp import dense_layers


@dataclass
class CNNConfig:
    in_channels: int = 1
    height: int = 8
    width: int = 8
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden_sizes: list[int] = field(default_factory=lambda: [64])
    num_classes: int = 10
    dropout: float = 0.0


def feature_size(config: CNNConfig) -> tuple[int, int]:
    """Spatial size after the conv stages (each pools by 2 while the image allows)."""
    h, w = config.height, config.width
    for _ in config.channels:
        if h >= 2 and w >= 2:
            h, w = h // 2, w // 2
    return h, w


class CNN(nn.Module):
    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        stages: list[nn.Module] = []
        channels, h, w = config.in_channels, config.height, config.width
        for out_channels in config.channels:
            stages += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU()]
            if h >= 2 and w >= 2:
                stages.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            channels = out_channels
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(*dense_layers(channels * h * w, config.hidden_sizes, config.num_classes,
                                                config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # a batch of single-channel images without the channel axis
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


PRESETS = {
    "tiny": {"channels": [8, 16], "hidden_sizes": [32]},
    "small": {"channels": [16, 32], "hidden_sizes": [64]},
    "base": {"channels": [32, 64, 128], "hidden_sizes": [256]},
}
DEFAULT_PRESET = "small"
