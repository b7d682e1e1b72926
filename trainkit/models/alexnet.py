"""AlexNet in two forms: the classic one for ~224 px inputs, a small one for 28–32 px."""

from __future__ import annotations

import torch
from torch import nn

SMALL_INPUT_LIMIT = 64  # below this side the classic stride-4 stem would leave no pixels


def _middle_convs() -> list[nn.Module]:
    """AlexNet's three 3x3 convs (192 → 384 → 256 → 256), shared by both forms."""
    return [
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
    ]


def _classifier(features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """AlexNet's head: dropout → fc → ReLU → dropout → fc → ReLU → fc."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class AlexNet(nn.Module):
    """Classic AlexNet (as in torchvision: 64-192-384-256-256 convs, dropout classifier)."""

    def __init__(self, num_classes: int, in_channels: int, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_middle_convs(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _classifier(256 * 6 * 6, 4096, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 224, 224) -> (B, num_classes)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class SmallAlexNet(nn.Module):
    """AlexNet's five-conv shape with 3x3 stride-1 convs, for 28–32 px inputs."""

    def __init__(self, num_classes: int, in_channels: int, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 32 -> 16
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 16 -> 8
            *_middle_convs(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = _classifier(256 * 4 * 4, 1024, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 32, 32) -> (B, num_classes)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_alexnet(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5) -> nn.Module:
    if input_size < SMALL_INPUT_LIMIT:
        return SmallAlexNet(num_classes, in_channels, dropout)
    return AlexNet(num_classes, in_channels, dropout)
