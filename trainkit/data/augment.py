"""Batched, seeded augmentation on the training device, then the one normalization.

`BatchTransform.start_epoch` draws every sample's random parameters for the epoch at once, from
a CPU generator seeded by (seed, epoch), indexed by the sample's position in the epoch order. So
a sample is augmented the same whatever the batch size, accumulation, world size or resume
point, and there is no augmentation RNG state to save.
"""

from __future__ import annotations

import functools
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
        a = augment  # config: not changed during a run
        self.active = bool(
            a and (a.crop_padding or a.hflip or a.brightness or a.contrast or a.random_resized_crop)
        )

    def start_epoch(self, epoch: int, size: int, device: torch.device) -> None:
        if not self.active:
            return
        a = self.augment
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 7_919 + 17) % (2**63))
        params = {}
        if a.crop_padding or a.hflip:
            p = a.crop_padding
            offsets = torch.randint(0, 2 * p + 1, (size, 2), generator=g, dtype=torch.int16)
            flips = torch.rand(size, generator=g) < 0.5 if a.hflip else torch.zeros(size, dtype=torch.bool)
            params["crops"] = crop_codes(offsets, flips, p)
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
        if "crops" in params:
            images = crop_and_flip(images, params["crops"].index_select(0, positions), a.crop_padding)
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


def crop_codes(offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, 2) crop offsets (dy, dx) in 0..2 pad and (N,) flips → (N,) int64 codes
    (dy * span + dx) * 2 + flip, the rows of crop_and_flip's table. Made once per epoch."""
    span = 2 * pad + 1
    return (offsets[:, 0].long() * span + offsets[:, 1].long()) * 2 + flips.long()


def crop_and_flip(images: torch.Tensor, codes: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to (H, W) at each sample's (dy, dx) and mirror it where
    flipped, as its `crop_codes` code says. (b, C, H, W) of any dtype → a new tensor alike.

    Each output row is W pixels side by side in the padded sample (read forwards) or, mirrored,
    in a reversed copy of the sample (read forwards too): so the whole crop is one
    `index_select` of b * C * H row windows — W times fewer indices than a per-pixel gather and
    no per-sample flip (a broadcast torch.where alone cost 0.18 ms per LeNet batch on CPU) —
    with the row starts from tables made once per shape: 6 ops per batch (there were 20).
    """
    b, c, h, w = images.shape
    if b == 0:
        return images.clone()
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
    blocks = padded.reshape(b, -1)  # (b, L): one padded sample per row
    length = blocks.shape[1]
    both = torch.stack([blocks, blocks.flip(1)], 1).view(-1)  # (b * 2L,): each sample, then reversed
    windows = both.as_strided((both.numel() - w + 1, w), (1, 1))  # every run of w pixels, a view
    table = _row_starts(c, h, w, pad, images.device)
    starts = table.index_select(0, codes) + _sample_starts(b, 2 * length, images.device)  # (b, C*H)
    return windows.index_select(0, starts.view(-1)).view(b, c, h, w)


@functools.lru_cache(maxsize=8)
def _row_starts(c: int, h: int, w: int, pad: int, device: torch.device) -> torch.Tensor:
    """(span * span * 2, C * H) int64, row = crop code: where each output row of that crop
    starts in its sample's (padded, reversed padded) pair. span^2 * 2 * C * H entries: 19 KB for
    3x32x32 at pad 2."""
    span, hp, wp = 2 * pad + 1, h + 2 * pad, w + 2 * pad
    length = c * hp * wp
    with torch.inference_mode(False):  # made in the first training step, used in all later ones
        dy = torch.arange(span, device=device).view(span, 1, 1, 1)
        dx = torch.arange(span, device=device).view(1, span, 1, 1)
        channel = torch.arange(c, device=device).view(1, 1, c, 1)
        row = torch.arange(h, device=device).view(1, 1, 1, h)
        forwards = (channel * hp + row + dy) * wp + dx  # (span, span, C, H)
        # the mirrored run of the w pixels at q..q+w-1 starts at L - w - q in the reversed copy
        mirrored = length + (length - w - forwards)
        return torch.stack([forwards, mirrored], 2).reshape(span * span * 2, c * h)


@functools.lru_cache(maxsize=8)
def _sample_starts(b: int, pair: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return (torch.arange(b, device=device) * pair).view(b, 1)
