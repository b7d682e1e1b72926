"""Data for a run: splits → (tensor or DataLoader) batch sources + the preprocessing record."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainkit.config import DataConfig
from trainkit.data.augment import BatchTransform
from trainkit.data.datasets import Split, Splits, build_splits
from trainkit.data.loader import BatchSource, LoaderSource, TensorSource
from trainkit.data.preprocess import Preprocess, compute_stats, stats_for
from trainkit.errors import ConfigError
from trainkit.reporting import Console

__all__ = ["BatchTransform", "DataBundle", "build_data", "check_parts", "fits_in_memory", "make_source"]


@dataclass
class DataBundle:
    splits: Splits
    preprocess: Preprocess
    in_memory: bool  # the fast tensor path (else DataLoader)


def fits_in_memory(data: DataConfig, parts: list[Split], channels: int, image_size: int) -> bool:
    """The fast tensor path: data.cache memory, or auto and the parts fit cache_memory_gb.
    `memory` over the budget is refused here, before anything is allocated."""
    total = sum(part.nbytes(channels, image_size) for part in parts)
    budget = data.cache_memory_gb * 1e9
    if data.cache == "memory" and total > budget:
        raise ConfigError(
            "data.cache",
            f"memory needs {total / 1e9:.1f} GB for {sum(len(p) for p in parts)} images at "
            f"{channels}x{image_size}x{image_size}, over data.cache_memory_gb={data.cache_memory_gb:g}; "
            "raise it, lower data.image_size, or set data.cache=none",
        )
    if data.cache != "auto":
        return data.cache == "memory"
    return total <= budget


def check_parts(parts: list[Split]) -> None:
    """Before a DataLoader run: decode every image once (the tensor path decodes them all up
    front anyway), so that a corrupt file is named now, not an hour into training."""
    for part in parts:
        part.check()


def _sample_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from up to 2000 images, streamed one at a time: at a large image_size the
    sample would not fit in memory at once (2000 x 3x4096x4096 is 100 GB)."""
    items = split.dataset()
    count = min(len(items), 2000)
    index = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:count]
    return compute_stats(items[int(i)][0].unsqueeze(0) for i in index)


def build_data(data: DataConfig, seed: int, console: Console, splits_needed=("train", "val")) -> DataBundle:
    splits = build_splits(data, seed)
    parts = [splits.get(name) for name in dict.fromkeys(splits_needed)]
    in_memory = fits_in_memory(data, parts, splits.channels, splits.image_size)
    if not in_memory:
        check_parts(parts)
    stats = stats_for(data.normalization, data.name, splits.channels, splits.native_channels)
    if stats is None:
        stats = splits.train.pixel_stats() if in_memory else _sample_stats(splits.train)
        console.say(f"normalization: mean {list(stats[0])} std {list(stats[1])} (from train)")
    preprocess = Preprocess(splits.channels, splits.image_size, stats[0], stats[1])
    return DataBundle(splits, preprocess, in_memory)


def make_source(
    split: Split,
    *,
    in_memory: bool,
    batch_size: int,
    seed: int,
    shuffle: bool,
    device: torch.device,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
) -> BatchSource:
    if in_memory:
        images, labels = split.tensors()
        return TensorSource(images, labels, batch_size, seed, shuffle, device, rank, world, drop_last)
    dataset = split.dataset()
    return LoaderSource(dataset, batch_size, seed, shuffle, device, num_workers, rank, world, drop_last)
