"""Batches for the trainer: the in-memory tensor path and the DataLoader path, same order.

Both paths draw the epoch's order from `epoch_order(seed, epoch)`, cut it into global batches
and give each process its `rank::world` share of every batch, so a run is the same whichever
path (or world size) feeds it, and a resume only needs (epoch, batch index). Images arrive as
uint8 (B, C, H, W) on the training device; `BatchTransform` augments and normalizes them there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainkit.config import AugmentConfig
from trainkit.data.preprocess import Preprocess
from trainkit.errors import TrainkitError

Batch = tuple[torch.Tensor, torch.Tensor, int]  # images (b, C, H, W) uint8, labels (b,), global b


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(size)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(size, generator=generator)


class _Batching:
    """Order, global batch cutting and rank sharding shared by both sources."""

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool, rank: int, world: int):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def global_sizes(self) -> list[int]:
        full, rest = divmod(self.size, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])

    def share_size(self, batch: int) -> int:
        """This rank's number of samples in global batch `batch` (0 in a short last batch)."""
        return len(range(self.rank, min(self.batch_size, self.size - batch * self.batch_size), self.world))

    def index_batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        order = epoch_order(self.size, self.seed, epoch, self.shuffle)
        for i in range(start, len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]


class TensorSource(_Batching):
    """The fast path: the whole split as one uint8 tensor on the training device."""

    def __init__(self, images, labels, batch_size, seed, shuffle, device, rank=0, world=1):
        super().__init__(images.shape[0], batch_size, seed, shuffle, rank, world)
        self.images = images.to(device)  # (N, C, H, W) uint8
        self.labels = labels.to(device)  # (N,)
        self.device = self.images.device

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        sizes = self.global_sizes()
        for i, index in enumerate(self.index_batches(epoch, start), start):
            index = index.to(self.device, non_blocking=True)
            yield self.images.index_select(0, index), self.labels.index_select(0, index), sizes[i]


class _EpochBatchSampler(Sampler):
    def __init__(self, batching: _Batching):
        self.batching, self.epoch, self.start = batching, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return sum(1 for i in range(self.start, len(self.batching)) if self.batching.share_size(i))

    def __iter__(self):
        for index in self.batching.index_batches(self.epoch, self.start):
            if len(index):  # an empty share is made up by LoaderSource.epoch, not loaded
                yield index.tolist()


class LoaderSource(_Batching):
    """The DataLoader path: per-image decode in worker processes, same batches as above."""

    def __init__(self, dataset: Dataset, batch_size, seed, shuffle, device, num_workers,
                 rank=0, world=1):
        super().__init__(len(dataset), batch_size, seed, shuffle, rank, world)
        self.device = torch.device(device)
        self.sampler = _EpochBatchSampler(self)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            # its own generator: each iter() draws a worker base seed, which from the global
            # RNG would shift dropout after a resume (decoding itself uses no randomness)
            generator=torch.Generator().manual_seed(seed),
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start)
        sizes = self.global_sizes()
        loaded = iter(self.loader)
        for i in range(start, len(sizes)):
            if self.share_size(i) == 0:  # this rank's share of a short last batch (DDP)
                shape = self.loader.dataset[0][0].shape  # (C, H, W)
                yield (torch.empty(0, *shape, dtype=torch.uint8, device=self.device),
                       torch.empty(0, dtype=torch.int64, device=self.device), sizes[i])
                continue
            try:
                images, labels = next(loaded)
            except TrainkitError as error:  # from a worker: "Caught TrainkitError in ..." + traceback
                last = str(error).strip().splitlines()[-1]
                raise TrainkitError(last.split("TrainkitError: ", 1)[-1]) from None
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                sizes[i],
            )


class BatchTransform:
    """uint8 batch → normalized float batch, with batched random augmentation when training.

    `start_epoch` draws every sample's random parameters for the epoch at once, from a CPU
    generator seeded by (seed, epoch), indexed by the sample's position in the epoch order. So a
    sample is augmented the same whatever the batch size, accumulation, world size or resume
    point, and there is no augmentation RNG state to save.
    """

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
            params["flips"] = torch.rand(size, generator=g) < 0.5 if a.hflip else torch.zeros(size, dtype=torch.bool)
        if a.brightness:
            params["brightness"] = 1 + (torch.rand(size, generator=g) * 2 - 1) * a.brightness
        if a.contrast:
            params["contrast"] = 1 + (torch.rand(size, generator=g) * 2 - 1) * a.contrast
        if a.random_resized_crop:  # drawn last: the draws above stay as they were without it
            params["boxes"] = random_crop_boxes(size, self.preprocess.stored_size, a.scale, a.ratio, g)
        self.params = {name: value.to(device) for name, value in params.items()}

    def __call__(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """images (b, C, S, S) uint8; positions (b,) of the rows in this epoch's order."""
        if not self.active or positions is None:
            return self.preprocess.prepare(images)
        a, params = self.augment, self.params
        positions = positions.to(images.device)
        if "boxes" in params:  # (b, C, image_size, image_size) float in 0..255
            images = crop_resize(images, params["boxes"].index_select(0, positions), self.preprocess.image_size)
        else:
            images = self.preprocess.center_crop(images)
        if "offsets" in params:
            offsets = params["offsets"].index_select(0, positions).long()
            images = crop_and_flip(images, offsets, params["flips"].index_select(0, positions), a.crop_padding)
        if not (a.brightness or a.contrast):
            return self.preprocess.normalize(images)
        x = images.float().div_(255.0)  # (b, C, H, W) in [0, 1]
        if a.brightness:
            x = x * params["brightness"].index_select(0, positions).view(-1, 1, 1, 1)
        if a.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * params["contrast"].index_select(0, positions).view(-1, 1, 1, 1) + mean
        x = x.clamp_(0, 1)
        mean = torch.tensor(self.preprocess.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def random_crop_boxes(
    count: int, side: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """torchvision's RandomResizedCrop draw, for `count` samples of a side x side square at once:
    an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, ten tries each, the
    first that fits wins (else the whole square), at a uniform position. → (count, 4) float
    boxes (x1, y1, x2, y2) in pixels."""
    tries = 10
    area = side * side * torch.empty(count, tries).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(count, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
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
    return roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


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
