"""Batch sources for the trainer: the in-memory tensor path and the DataLoader path, same order.

Both paths draw the epoch's order from `epoch_order(seed, epoch)`, cut it into global batches
and give each process its `rank::world` share of every batch, so a run is the same whichever
path (or world size) feeds it, and a resume only needs (epoch, batch index). A source yields
`Batch`es: uint8 images (b, C, H, W) on the training device, their labels, their positions in
the epoch's order (what augmentation is keyed on) and the global batch's size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainkit.data.workers import check_shared_memory, worker_options
from trainkit.errors import TrainkitError


class Batch(NamedTuple):
    images: torch.Tensor  # (b, C, H, W) uint8, this process's share
    labels: torch.Tensor  # (b,) int64
    positions: torch.Tensor  # (b,) the rows' places in this epoch's order
    global_size: int  # samples in the global batch, summed over processes


class BatchSource(Protocol):
    """What the trainer and `evaluate` need from a source of batches."""

    device: torch.device
    batch_size: int  # global batch size
    size: int  # samples per epoch

    def __len__(self) -> int: ...  # global batches per epoch

    def global_sizes(self) -> list[int]: ...  # the size of each global batch of an epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...  # from global batch `start`


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(size)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(size, generator=generator)


class _Batching:
    """Order, global batch cutting and rank sharding: the one home of the `rank::world` rule.

    With `drop_last` a short last batch of the epoch is left out (BatchNorm cannot train on a
    single sample)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int,
        world: int,
        drop_last: bool = False,
    ):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world, self.drop_last = rank, world, drop_last

    def __len__(self) -> int:
        whole = self.size // self.batch_size
        return whole if self.drop_last and whole else math.ceil(self.size / self.batch_size)

    def global_sizes(self) -> list[int]:
        return [min(self.batch_size, self.size - i * self.batch_size) for i in range(len(self))]

    def share_size(self, batch: int) -> int:
        """This rank's number of samples in global batch `batch` (0 in a short last batch)."""
        return len(range(self.rank, min(self.batch_size, self.size - batch * self.batch_size), self.world))

    def shares(self, values: torch.Tensor, start: int) -> list[torch.Tensor]:
        """This rank's part of each global batch of an epoch, from batch `start`: views of
        `values` (N,) cut in batch_size chunks, every world-th row from this rank's."""
        chunks = values.split(self.batch_size)[start : len(self)]
        return list(chunks) if self.world == 1 else [chunk[self.rank :: self.world] for chunk in chunks]

    def index_batches(self, epoch: int, start: int, device: torch.device | None = None) -> list[torch.Tensor]:
        """This rank's rows of each global batch from `start`, on `device` (default the CPU)."""
        order = epoch_order(self.size, self.seed, epoch, self.shuffle)
        return self.shares(order if device is None else order.to(device), start)

    def positions(self, start: int, device: torch.device) -> list[torch.Tensor]:
        """(b,) places in the epoch's order of this rank's rows, for each global batch from
        `start` (what augmentation is keyed on)."""
        return self.shares(torch.arange(self.size, device=device), start)


class TensorSource(_Batching):
    """The fast path: the whole split as one uint8 tensor on the training device."""

    def __init__(self, images, labels, batch_size, seed, shuffle, device, rank=0, world=1, drop_last=False):
        super().__init__(images.shape[0], batch_size, seed, shuffle, rank, world, drop_last)
        self.images = images.to(device)  # (N, C, H, W) uint8
        self.labels = labels.to(device)  # (N,)
        self.device = self.images.device

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        # The epoch's batches are cut up front, as views: a step's gather is two index_selects
        # (per-batch slicing, arange and host-to-device copies cost ~30 us a step on CPU).
        sizes = self.global_sizes()[start:]
        indices, positions = self.index_batches(epoch, start, self.device), self.positions(start, self.device)
        for index, places, size in zip(indices, positions, sizes):
            yield Batch(self.images.index_select(0, index), self.labels.index_select(0, index), places, size)


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

    def __init__(
        self,
        dataset: Dataset,
        batch_size,
        seed,
        shuffle,
        device,
        num_workers,
        rank=0,
        world=1,
        drop_last=False,
    ):
        super().__init__(len(dataset), batch_size, seed, shuffle, rank, world, drop_last)
        self.device = torch.device(device)
        self.sampler = _EpochBatchSampler(self)
        prefetch = 4
        if num_workers > 0:  # batches cross from the workers through /dev/shm: do they fit?
            channels, size = getattr(dataset, "channels", 3), getattr(dataset, "size", 0) or 0
            share = math.ceil(batch_size / world) * channels * size * size  # uint8 bytes per batch
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # ranks on this machine
            check_shared_memory(num_workers * prefetch * share * local, "data.num_workers")
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
            **worker_options(num_workers),
            # its own generator: each iter() draws a worker base seed, which from the global
            # RNG would shift dropout after a resume (decoding itself uses no randomness)
            generator=torch.Generator().manual_seed(seed),
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start)
        sizes = self.global_sizes()
        loaded = iter(self.loader)
        places = self.positions(start, self.device)
        for i in range(start, len(sizes)):
            positions = places[i - start]
            if self.share_size(i) == 0:  # this rank's share of a short last batch (DDP)
                shape = self.loader.dataset[0][0].shape  # (C, H, W)
                empty = torch.empty(0, *shape, dtype=torch.uint8, device=self.device)
                yield Batch(empty, torch.empty(0, dtype=torch.int64, device=self.device), positions, sizes[i])
                continue
            try:
                images, labels = next(loaded)
            except TrainkitError as error:  # from a worker: "Caught TrainkitError in ..." + traceback
                last = str(error).strip().splitlines()[-1]
                raise TrainkitError(last.split("TrainkitError: ", 1)[-1]) from error
            images = images.to(self.device, non_blocking=True)
            yield Batch(images, labels.to(self.device, non_blocking=True), positions, sizes[i])
