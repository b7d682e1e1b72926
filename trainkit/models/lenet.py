"""LeNet-5 as in the classic PyTorch CIFAR-10 tutorial, sized from the input."""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """conv5(6) → pool → conv5(16) → pool → fc120 → fc84 → fc(num_classes), ReLU between.

    `width` multiplies the conv channels (1 = the tutorial's 6/16). A state dict saved from the
    tutorial's own `Net` (conv1, conv2, fc1, fc2, fc3) loads through `state_dict_aliases`.
    """

    state_dict_aliases = {
        "conv1.": "features.0.",
        "conv2.": "features.3.",
        "fc1.": "classifier.1.",
        "fc2.": "classifier.3.",
        "fc3.": "classifier.5.",
    }

    def __init__(self, num_classes: int, in_channels: int, input_size: int, width: int = 1):
        super().__init__()
        side = ((input_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, each then a 2x2 pool
        if side < 1:
            raise ValueError(f"lenet needs inputs of at least 16 px, got {input_size}")
        c1, c2 = 6 * width, 16 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.features(x))
