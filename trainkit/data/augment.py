"""Batched, seeded augmentation on the training device, then the one normalization.

`BatchTransform.start_epoch` draws every sample's random parameters for the epoch at once, from
a CPU generator seeded by (seed, epoch), indexed by the sample's position in the epoch order. So
a sample is augmented the same whatever the batch size, accumulation, world size or resume
point, and there is no augmentation RNG state to save.
"""

from __future__ import annotations

import math

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
        return bool(a and (a.crop_padding or a.hflip or a.brightness or a.contrast or a.random_resized_crop))

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
        if a.random_resized_crop:  # drawn last: the draws above stay as they were without it
            params["boxes"] = random_crop_boxes(size, self.preprocess.stored_size, a.scale, a.ratio, g)
        self.params = {name: value.to(device) for name, value in params.items()}

    def __call__(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """images (b, C, S, S) uint8 stored squares; positions (b,) of the rows in this epoch's order."""
        if not self.active or positions is None:
            return self.preprocess.prepare(images)
        a, params = self.augment, self.params
        positions = positions.to(images.device)
        if "boxes" in params:  # (b, C, image_size, image_size) float in 0..255
            images = crop_resize(
                images, params["boxes"].index_select(0, positions), self.preprocess.image_size
            )
        else:
            images = self.preprocess.center_crop(images)
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


def random_crop_boxes(
    count: int, side: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """torchvision's RandomResizedCrop draw, for `count` samples of a side x side square at once:
    an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, ten tries each, the
    first that fits wins (else the whole square), at a uniform position. → (count, 4) float
    boxes (x1, y1, x2, y2) in pixels."""
    tries = 10
    area = side * side * torch.empty(count, tries).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(count, tries).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).round()
    height = torch.sqrt(area / aspect).round()
    fits = (width > 0) & (width <= side) & (height > 0) & (height <= side)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((count,), -1))
    rows = torch.arange(count)
    w = torch.where(first >= 0, width[rows, first.clamp_min(0)], torch.full((count,), float(side)))
    h = torch.where(first >= 0, height[rows, first.clamp_min(0)], torch.full((count,), float(side)))
    x = torch.floor(torch.rand(count, generator=generator) * (side - w + 1))
    y = torch.floor(torch.rand(count, generator=generator) * (side - h + 1))
    return torch.stack([x, y, x + w, y + h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box, resized to size x size (bilinear, averaged over 2x2 samples per output
    pixel): one batched roi_align. (b, C, S, S) uint8, (b, 4) boxes → (b, C, size, size) float."""
    from torchvision.ops import roi_align

    index = torch.arange(images.shape[0], device=images.device, dtype=torch.float32).view(-1, 1)
    rois = torch.cat([index, boxes.to(images.device, torch.float32)], dim=1)  # (b, 5)
    return roi_align(
        images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True
    )


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to (H, W) at a per-sample (dy, dx), mirror where `flips`.

    Each output row is W pixels that lie side by side in the padded batch (read forwards) or,
    mirrored, in a reversed copy of it (read forwards too): so the whole crop is one
    `index_select` of b * C * H row windows — W times fewer indices than a per-pixel gather
    (0.19 → 0.12 ms per LeNet batch on CPU) and no per-sample flip (a broadcast torch.where
    alone cost 0.18 ms). (b, C, H, W) of any dtype → a new tensor of the same shape.
    """
    b, c, h, w = images.shape
    if b == 0:
        return images.clone()
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
    flat = padded.reshape(-1)
    n, sample = flat.numel(), c * (h + 2 * pad) * (w + 2 * pad)
    both = torch.cat([flat, flat.flip(0)])  # (2n,): the reversed copy holds every row mirrored
    windows = both.as_strided((2 * n - w + 1, w), (1, 1))  # every run of w pixels, a view
    view = (b, 1, 1)
    dy, dx = offsets[:, 0].long().view(view), offsets[:, 1].long().view(view)
    flipped = flips.long().view(view)
    channel = torch.arange(c, device=images.device).view(1, c, 1)
    row = torch.arange(h, device=images.device).view(1, 1, h)
    first = torch.arange(b, device=images.device).view(view) * sample
    start = first + ((channel * (h + 2 * pad) + row + dy) * (w + 2 * pad) + dx)  # (b, C, H)
    # the mirrored run of the w pixels at q..q+w-1 starts at 2n - w - q in `both`
    start = torch.where(flipped.bool(), 2 * n - w - start, start)
    return windows.index_select(0, start.view(-1)).view(b, c, h, w)
