"""A procedurally generated, learnable 10-class image task: shapes on noisy backgrounds.

Every image shows one filled or outlined shape of random position, size and colour on a random
background colour with Gaussian noise. The generator is vectorized (a few ms per thousand
32 px images) and deterministic: the same split, size and seed always give the same pixels.
"""

from __future__ import annotations

import torch

CLASSES = (
    "circle",
    "square",
    "ring",
    "diamond",
    "plus",
    "hbar",
    "vbar",
    "triangle",
    "x",
    "frame",
)
# Different streams for the splits, so test images are never training images.
SPLIT_SEEDS = {"train": 1_000_003, "test": 2_000_029}


def _shape_masks(labels: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor):
    """(N,) labels and (N, S, S) offsets from each shape's centre → (N, S, S) bool masks."""
    ax, ay = dx.abs(), dy.abs()
    dist = torch.sqrt(dx * dx + dy * dy)
    thin = r * 0.3
    masks = torch.stack(
        [
            dist < r,  # circle
            torch.maximum(ax, ay) < r * 0.85,  # square
            (dist - r * 0.75).abs() < r * 0.22,  # ring
            ax + ay < r * 1.1,  # diamond
            ((ax < thin) & (ay < r)) | ((ay < thin) & (ax < r)),  # plus
            (ay < thin) & (ax < r * 1.2),  # hbar
            (ax < thin) & (ay < r * 1.2),  # vbar
            (dy < r * 0.8) & (dy > -r) & (ax < (dy + r) * 0.55),  # triangle
            ((ax - ay).abs() < thin) & (ax < r * 0.9),  # x
            (torch.maximum(ax, ay) < r * 0.9) & (torch.maximum(ax, ay) > r * 0.55),  # frame
        ],
        dim=1,
    )  # (N, 10, S, S)
    return masks[torch.arange(labels.shape[0]), labels]


def make_synthetic(
    size: int, split: str, image_size: int = 32, channels: int = 3, noise: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ images uint8 (N, C, S, S), labels int64 (N,), classes balanced and shuffled."""
    generator = torch.Generator().manual_seed(SPLIT_SEEDS[split] + 7919 * image_size + channels)
    labels = torch.arange(size) % len(CLASSES)
    labels = labels[torch.randperm(size, generator=generator)]
    images = torch.empty(size, channels, image_size, image_size, dtype=torch.uint8)
    axis = torch.arange(image_size, dtype=torch.float32) + 0.5
    for start in range(0, size, 2048):  # chunks bound memory at large sizes
        lab = labels[start : start + 2048]
        n = lab.shape[0]
        radius = (0.18 + 0.14 * torch.rand(n, 1, 1, generator=generator)) * image_size
        centre = radius[:, None] + torch.rand(n, 2, 1, 1, generator=generator) * (
            image_size - 2 * radius[:, None]
        )
        dx = axis.view(1, 1, -1) - centre[:, 0]
        dy = axis.view(1, -1, 1) - centre[:, 1]
        mask = _shape_masks(lab, dx, dy, radius).unsqueeze(1)  # (n, 1, S, S)
        background = torch.rand(n, channels, 1, 1, generator=generator)
        # foreground differs from the background by at least 0.35 in every channel's mean
        offset = 0.35 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
        sign = torch.where(background.mean(1, keepdim=True) > 0.5, -1.0, 1.0)
        tint = (torch.rand(n, channels, 1, 1, generator=generator) - 0.5) * 0.3
        foreground = (background + sign * offset + tint).clamp(0, 1)
        pixels = torch.where(mask, foreground, background)
        pixels = pixels + noise * torch.randn(pixels.shape, generator=generator)
        images[start : start + n] = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels
