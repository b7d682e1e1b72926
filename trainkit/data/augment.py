"""Batched, seeded augmentation on the training device, then the one normalization.

`BatchTransform.start_epoch` draws every sample's random parameters for the epoch at once, from
a CPU generator seeded by (seed, epoch), indexed by the sample's position in the epoch order. So
a sample is augmented the same whatever the batch size, accumulation, world size or resume
point, and there is no augmentation RNG state to save.
"""

from __future__ import annotations

import torch

from trainkit.config import AugmentConfig
from trainkit.data.preprocess import Preprocess


class BatchTransform:
    """uint8 batch → normalized float batch, with batched random augmentation when training."""

    def __init__(self, preprocess: Preprocess, augment: AugmentConfig | None, seed: int = 0):
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.params: dict[str, torch.Tensor] = {}  # per epoch position, on the training device

    @property
    def active(self) -> bool:
        a = self.augment
        return bool(a and (a.crop_padding or a.hflip or a.brightness or a.contrast))

    def start_epoch(self, epoch: int, size: int, device: torch.device) -> None:
        if not self.active:
            return
        a = self.augment
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 7_919 + 17) % (2**63))
        params = {}
        if a.crop_padding or a.hflip:
            p = a.crop_padding
            params["offsets"] = torch.randint(0, 2 * p + 1, (size, 2), generator=g, dtype=torch.int16)
            flips = torch.rand(size, generator=g) < 0.5 if a.hflip else torch.zeros(size, dtype=torch.bool)
            params["flips"] = flips
        if a.brightness:
            params["brightness"] = 1 + (torch.rand(size, generator=g) * 2 - 1) * a.brightness
        if a.contrast:
            params["contrast"] = 1 + (torch.rand(size, generator=g) * 2 - 1) * a.contrast
        self.params = {name: value.to(device) for name, value in params.items()}

    def __call__(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """images (b, C, H, W) uint8; positions (b,) of the rows in this epoch's order."""
        if not self.active or positions is None:
            return self.preprocess.normalize(images)
        a, params = self.augment, self.params
        positions = positions.to(images.device)
        if "offsets" in params:
            offsets = params["offsets"].index_select(0, positions).long()
            images = crop_and_flip(
                images, offsets, params["flips"].index_select(0, positions), a.crop_padding
            )
        if not (a.brightness or a.contrast):
            return self.preprocess.normalize(images)
        x = images.float().div_(255.0)  # (b, C, H, W) in [0, 1]
        if a.brightness:
            x = x * params["brightness"].index_select(0, positions).view(-1, 1, 1, 1)
        if a.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * params["contrast"].index_select(0, positions).view(-1, 1, 1, 1) + mean
        return self.preprocess.normalize(x.clamp_(0, 1), value_range=1.0)


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to (H, W) at a per-sample (dy, dx), mirror where `flips`.

    One gather over the flattened pixels: ~5x faster on CPU than 4-D advanced indexing and
    than a separate torch.where flip, and a single kernel on GPU.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
    width = w + 2 * pad
    columns = torch.arange(w, device=images.device)
    columns = torch.where(flips.view(b, 1), w - 1 - columns, columns) + offsets[:, 1:2]  # (b, W)
    rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # (b, H)
    index = (rows[:, :, None] * width + columns[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, padded.shape[2] * width).gather(2, index).view(b, c, h, w)
