"""Data for a run: splits → (tensor or DataLoader) batch sources + the preprocessing record."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainkit.config import DataConfig
from trainkit.data.datasets import Split, Splits, build_splits, check_dataset_name
from trainkit.data.loader import BatchTransform, LoaderSource, TensorSource
from trainkit.errors import ConfigError
from trainkit.data.preprocess import Preprocess, compute_stats, stats_for
from trainkit.reporting import say


@dataclass
class DataBundle:
    splits: Splits
    preprocess: Preprocess
    in_memory: bool  # the fast tensor path (else DataLoader)


def use_memory(data: DataConfig, parts: list[Split], channels: int, image_size: int) -> bool:
    """The fast tensor path (data.cache: memory, or auto and the parts fit the budget)? When
    not, the parts' images are checked first: the tensor path decodes everything up front."""
    total = sum(part.nbytes(channels, image_size) for part in parts)
    budget = data.cache_memory_gb * 1e9
    if data.cache == "memory" and total > budget:  # refused before anything is allocated
        raise ConfigError(
            "data.cache",
            f"memory needs {total / 1e9:.1f} GB for {sum(len(p) for p in parts)} images at "
            f"{channels}x{image_size}x{image_size}, over data.cache_memory_gb={data.cache_memory_gb:g}; "
            "raise it, lower data.image_size, or set data.cache=none",
        )
    if data.cache != "auto":
        in_memory = data.cache == "memory"
    else:
        in_memory = total <= budget
    if not in_memory:
        for part in parts:
            part.check()
    return in_memory


def _sample_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from up to 2000 images, streamed one at a time: at a large image_size the
    sample would not fit in memory at once (2000 x 3x4096x4096 is 100 GB)."""
    items = split.dataset()
    count = min(len(items), 2000)
    index = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:count]
    return compute_stats(items[int(i)][0].unsqueeze(0) for i in index)


def build_data(data: DataConfig, seed: int, splits_needed=("train", "val")) -> DataBundle:
    splits = build_splits(data, seed)
    parts = [splits.get(name) for name in dict.fromkeys(splits_needed)]
    in_memory = use_memory(data, parts, splits.channels, splits.image_size)
    stats = stats_for(data.normalization, data.name, splits.channels, splits.native_channels)
    if stats is None:
        if in_memory:
            stats = splits.train.pixel_stats()
        else:
            stats = _sample_stats(splits.train)
        say(f"normalization: mean {list(stats[0])} std {list(stats[1])} (from train)")
    preprocess = Preprocess(splits.channels, splits.image_size, stats[0], stats[1])
    return DataBundle(splits, preprocess, in_memory)


def make_source(
    split: Split,
    in_memory: bool,
    batch_size: int,
    seed: int,
    shuffle: bool,
    device: torch.device,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
):
    if in_memory:
        images, labels = split.tensors()
        return TensorSource(images, labels, batch_size, seed, shuffle, device, rank, world)
    return LoaderSource(split.dataset(), batch_size, seed, shuffle, device, num_workers, rank, world)
