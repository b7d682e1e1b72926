"""Dataset builders: name → splits of labelled uint8 images at the model's channels and size.

Every split offers two views of the same pixels:
- `tensors()`: all images decoded once into uint8 (N, C, H, W) + int64 labels (the fast path);
- `dataset()`: a per-item torch Dataset of (uint8 (C, H, W), label) for the DataLoader path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from trainkit.config import DataConfig
from trainkit.data.preprocess import (
    IMAGE_EXTENSIONS,
    compute_stats,
    decode_image,
    fit_image,
    image_files,
    stored_side,
    to_channels,
)
from trainkit.errors import ConfigError, TrainkitError, unknown_choice



class Split:
    """One split of a dataset. Subclasses give `__len__`, `labels`, `tensors`, `dataset`."""

    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def nbytes(self, channels: int, image_size: int) -> int:
        return len(self) * channels * image_size * image_size

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def dataset(self) -> Dataset:
        raise NotImplementedError

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the decoded images in [0, 1]."""
        return compute_stats(self.tensors()[0])

    def check(self) -> None:
        """Before a DataLoader run: fail now (or drop) on images that cannot be decoded."""

    def subset(self, indices: torch.Tensor) -> Split:
        return SubsetSplit(self, indices)


class _ArrayItems(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int, size: int, mode: str):
        self.images, self.labels, self.channels, self.size, self.mode = images, labels, channels, size, mode

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int):
        image = fit_image(to_channels(self.images[index], self.channels), self.size, self.mode)
        return image.contiguous(), int(self.labels[index])


class ArraySplit(Split):
    """Images already in memory (torchvision's arrays, synthetic), any channels and size."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, channels: int, size: int, mode: str = "squash"
    ):
        self.images = images  # (N, C0, H0, W0) uint8, possibly a view
        self.labels = labels.to(torch.int64)
        self.channels, self.size, self.mode = channels, size, mode

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images.shape[1] == self.channels and self.images.shape[-1] == self.size:
            return self.images.contiguous(), self.labels
        out = torch.empty(len(self), self.channels, self.size, self.size, dtype=torch.uint8)
        for start in range(0, len(self), 2048):
            chunk = self.images[start : start + 2048]
            out[start : start + chunk.shape[0]] = fit_image(to_channels(chunk, self.channels), self.size, self.mode)
        return out, self.labels

    def dataset(self) -> Dataset:
        return _ArrayItems(self.images, self.labels, self.channels, self.size, self.mode)


@dataclass
class FileList:
    """An image folder's files in sorted order, with (size, mtime_ns) stamps for the cache key."""

    paths: list[str]
    labels: list[int]
    stamps: list[tuple[int, int]]


class _FileItems(Dataset):
    def __init__(self, paths: list[str], labels: torch.Tensor, channels: int, size: int, mode: str):
        self.paths, self.labels, self.channels, self.size, self.mode = paths, labels, channels, size, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = decode_image(self.paths[index], self.channels, self.size, self.mode)
        return image, int(self.labels[index])


class FileSplit(Split):
    """Image files decoded with PIL; `tensors()` goes through the on-disk decoded cache."""

    def __init__(self, files: FileList, channels: int, size: int, cache: Any, mode: str = "squash"):
        self.paths, self.stamps = files.paths, files.stamps
        self.all_labels = torch.tensor(files.labels, dtype=torch.int64)
        self.channels, self.size, self.mode = channels, size, mode
        self.cache = cache  # a trainkit.data.cache.CacheSettings
        self.kept: torch.Tensor | None = None  # indices that decoded, once some were skipped
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._images: torch.Tensor | None = None  # train and val subsets share one load
        self._checked = False

    @property
    def labels(self) -> torch.Tensor:
        return self.all_labels if self.kept is None else self.all_labels[self.kept]

    def check(self) -> None:
        from trainkit.data.cache import check_images

        if not self._checked:
            self.kept = check_images(self._items(), self.paths, self.stamps, self.cache)
            self._checked = True

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._stats is None:
            self.tensors()
        return self._stats  # computed once when the cache was built, stored with it

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        from trainkit.data.cache import load_or_build_cache

        if self._images is None:
            self._images, self.kept, self._stats = load_or_build_cache(
                self._items(), self.paths, self.stamps, self.channels, self.size, self.cache, self.mode
            )
        return self._images, self.labels  # without the files skipped (data.skip_bad_images)

    def _items(self) -> Dataset:
        return _FileItems(self.paths, self.all_labels, self.channels, self.size, self.mode)

    def dataset(self) -> Dataset:
        if self.kept is None:
            return self._items()
        kept = self.kept.tolist()
        return _FileItems([self.paths[i] for i in kept], self.labels, self.channels, self.size, self.mode)


class _SubsetItems(Dataset):
    def __init__(self, base: Dataset, indices: torch.Tensor):
        self.base, self.indices = base, indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


class SubsetSplit(Split):
    """Some of a split's items (a seeded val_fraction split); indices count all of the base's
    files, and are renumbered past any the base skipped as unreadable."""

    def __init__(self, base: Split, indices: torch.Tensor):
        self.base, self.indices = base, indices

    def _positions(self) -> torch.Tensor:
        kept = getattr(self.base, "kept", None)
        if kept is None:
            return self.indices
        position = torch.full((len(self.base.all_labels),), -1, dtype=torch.int64)
        position[kept] = torch.arange(len(kept))
        positions = position[self.indices]
        return positions[positions >= 0]

    @property
    def labels(self) -> torch.Tensor:
        return self.base.labels[self._positions()]

    def check(self) -> None:
        self.base.check()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.base.tensors()
        positions = self._positions()
        return images[positions], labels[positions]

    def dataset(self) -> Dataset:
        return _SubsetItems(self.base.dataset(), self._positions())


@dataclass
class Splits:
    """train / val / test splits plus what the model needs to know about them."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    channels: int  # after conversion (model input channels)
    image_size: int  # after resizing (model input side)
    native_channels: int
    stored_size: int  # side of the decoded squares (larger than image_size for resize=crop)

    def get(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ConfigError("split", unknown_choice("split", name, ["train", "val", "test"]))
        return getattr(self, name)


# --------------------------------------------------------------------------- builders
# A raw builder returns (train, val_or_None, test_or_None, classes, native_channels, native_size)
# with ArraySplit/FileSplit objects created lazily through `make(images...)` callbacks.


@dataclass
class RawSplits:
    train: tuple
    val: tuple | None
    test: tuple | None
    classes: list[str]
    native_channels: int
    native_size: int
    kind: str  # "array" or "files"
    cache_root: str | None = None  # where the decoded cache goes by default; None = data.root


def _synthetic(data: DataConfig) -> RawSplits:
    from trainkit.data.synthetic import CLASSES, make_synthetic

    cfg = data.synthetic
    train = make_synthetic(cfg.train_size, "train", cfg.image_size, cfg.channels, cfg.noise)
    test = make_synthetic(cfg.test_size, "test", cfg.image_size, cfg.channels, cfg.noise)
    return RawSplits(train, None, test, list(CLASSES), cfg.channels, cfg.image_size, "array")


_TORCHVISION_FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "mnist": "MNIST/raw",
    "fashion_mnist": "FashionMNIST/raw",
}


def _torchvision(name: str) -> Callable[[DataConfig], RawSplits]:
    def build(data: DataConfig) -> RawSplits:
        import torchvision.datasets as tvd

        cls = {
            "cifar10": tvd.CIFAR10,
            "cifar100": tvd.CIFAR100,
            "mnist": tvd.MNIST,
            "fashion_mnist": tvd.FashionMNIST,
        }[name]
        where = Path(data.root) / _TORCHVISION_FOLDERS[name]
        splits = []
        for train in (True, False):
            try:
                ds = cls(root=data.root, train=train, download=data.download)
            except Exception as error:  # RuntimeError when missing; URLError etc. when offline
                first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(":")
                if data.download:
                    raise TrainkitError(
                        f"{name}: download failed ({first}); without network, put the files in {where}"
                    ) from None
                if "not found" in str(error).lower():
                    raise TrainkitError(
                        f"{name} not found under {data.root}: put the files in {where} "
                        "or set data.download=true"
                    ) from None
                raise TrainkitError(f"{name}: {first}") from None
            images = torch.as_tensor(ds.data)
            # (N, H, W, 3) for CIFAR, (N, H, W) for MNIST → (N, C, H, W) views
            images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
            splits.append((images, torch.as_tensor(ds.targets, dtype=torch.int64)))
            classes = list(ds.classes)
        channels, size = splits[0][0].shape[1], splits[0][0].shape[-1]
        return RawSplits(splits[0], None, splits[1], classes, channels, size, "array")

    return build


def _scan_folder(folder: Path, classes: list[str] | None) -> tuple[FileList, list[str]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes or found
    if not classes:
        raise TrainkitError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    index = {name: i for i, name in enumerate(classes)}
    files = FileList([], [], [])
    for name in found:
        if name not in index:
            raise TrainkitError(f"{folder / name}: class not in the training classes")
        for path, size, mtime in image_files(str(folder / name)):
            files.paths.append(path)
            files.labels.append(index[name])
            files.stamps.append((size, mtime))
    if not files.paths:
        raise TrainkitError(f"{folder}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files, classes


def _native_shape(files: FileList) -> tuple[int, int]:
    """(channels, side) of a file list's images, from the first image's header."""
    from PIL import Image

    try:
        with Image.open(files.paths[0]) as first:
            mode, (width, height) = first.mode, first.size
    except OSError as error:
        raise TrainkitError(f"{files.paths[0]}: cannot read image ({error})") from None
    channels = 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    return channels, max(width, height)


def _imagefolder(data: DataConfig) -> RawSplits:
    root = Path(data.root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise TrainkitError(f"imagefolder: {train_dir} not found (expected {root}/train/<class>/...)")
    train, classes = _scan_folder(train_dir, None)
    val = _scan_folder(root / "val", classes)[0] if (root / "val").is_dir() else None
    test = _scan_folder(root / "test", classes)[0] if (root / "test").is_dir() else None
    channels, size = _native_shape(train)
    return RawSplits(train, val, test, classes, channels, size, "files")


MAX_CSV_BYTES = 1 << 30  # a list of a few million images; larger is refused, not read


def _read_csv(data: DataConfig, key: str, classes: list[str] | None) -> tuple[FileList, list[str]]:
    """A CSV list (header row; `path_column`, `label_column`) → files in row order and the class
    list (sorted label strings, or the training classes for val/test). Paths are relative to
    the CSV's folder. A missing image is an error, or with skip_bad_images a warning."""
    import csv

    from trainkit.reporting import warn

    path = Path(getattr(data, key))
    if not path.is_file():
        raise TrainkitError(f"data.{key}: {path} not found")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise TrainkitError(f"data.{key}: {path} is larger than {MAX_CSV_BYTES >> 20} MiB")
    columns = (data.path_column, data.label_column)
    rows: list[tuple[int, Path, str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            for column in columns:
                if column not in header:
                    shown = ", ".join(repr(name) for name in header[:10])
                    raise TrainkitError(
                        f"{path}: no {column!r} column (header: {shown}); set data.path_column / "
                        "data.label_column"
                    )
            for row in reader:
                file, label = ((row.get(column) or "").strip() for column in columns)
                if not file or not label:
                    raise TrainkitError(f"{path}:{reader.line_num}: empty {columns[0 if not file else 1]!r}")
                rows.append((reader.line_num, path.parent / file, label))
    except (UnicodeDecodeError, csv.Error) as error:
        raise TrainkitError(f"{path}: not a UTF-8 CSV file ({error})") from None
    if not rows:
        raise TrainkitError(f"{path}: no rows after the header")
    classes = classes or sorted({label for _, _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    files = FileList([], [], [])
    missing = []
    for line, file, label in rows:
        if label not in index:
            raise TrainkitError(f"{path}:{line}: label {label!r} is not one of the training classes")
        try:
            stat = file.stat()
        except OSError:
            missing.append(f"{path}:{line}: {file} not found")
            continue
        files.paths.append(str(file))
        files.labels.append(index[label])
        files.stamps.append((stat.st_size, stat.st_mtime_ns))
    if missing and not data.skip_bad_images:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TrainkitError(f"{missing[0]}{more}; set data.skip_bad_images=true to skip them")
    for message in missing:
        warn(f"skipped {message}")
    if not files.paths:
        raise TrainkitError(f"{path}: none of the listed images exists")
    return files, classes


def _csv(data: DataConfig) -> RawSplits:
    train, classes = _read_csv(data, "train_csv", None)
    val = _read_csv(data, "val_csv", classes)[0] if data.val_csv else None
    test = _read_csv(data, "test_csv", classes)[0] if data.test_csv else None
    channels, size = _native_shape(train)
    return RawSplits(train, val, test, classes, channels, size, "files", str(Path(data.train_csv).parent))


DATASETS: dict[str, Callable[[DataConfig], RawSplits]] = {
    "synthetic": _synthetic,
    "cifar10": _torchvision("cifar10"),
    "cifar100": _torchvision("cifar100"),
    "mnist": _torchvision("mnist"),
    "fashion_mnist": _torchvision("fashion_mnist"),
    "imagefolder": _imagefolder,
    "csv": _csv,
}
CSV_KEYS = ("train_csv", "val_csv", "test_csv")


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError("data.name", unknown_choice("dataset", name, DATASETS))


def check_data_section(data: DataConfig) -> None:
    """The dataset name, and the keys that belong to one dataset only."""
    check_dataset_name(data.name)
    if data.name == "csv" and not data.train_csv:
        raise ConfigError("data.train_csv", "required with data.name=csv (a CSV file with path,label rows)")
    if data.name != "csv":
        for key in CSV_KEYS:
            if getattr(data, key):
                raise ConfigError(f"data.{key}", f"only for data.name=csv (data.name is {data.name})")


def build_splits(data: DataConfig, seed: int) -> Splits:
    """Build the train/val/test splits. See the README for how val and test are chosen."""
    check_dataset_name(data.name)
    raw = DATASETS[data.name](data)
    channels = data.channels or raw.native_channels
    size = data.image_size or raw.native_size
    stored = stored_side(size, data.resize, data.resize_size)

    if raw.kind == "array":
        make = lambda part: ArraySplit(part[0], part[1], channels, stored, data.resize)  # noqa: E731
    else:
        from trainkit.data.cache import CacheSettings

        settings = CacheSettings.from_config(
            data if raw.cache_root is None else data.model_copy(update={"root": raw.cache_root})
        )
        make = lambda files: FileSplit(files, channels, stored, settings, data.resize)  # noqa: E731

    train = make(raw.train)
    val = make(raw.val) if raw.val else None
    test = make(raw.test) if raw.test else None
    fraction = data.val_fraction
    if fraction is None:
        fraction = 0.0 if (val or test) else 0.1
    if val is None and (fraction > 0 or test is None):
        if fraction <= 0:
            raise ConfigError("data.val_fraction", "this dataset has only a train split; set a fraction > 0")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        held = max(1, int(round(len(train) * fraction)))
        if held >= len(train):
            raise ConfigError("data.val_fraction", f"leaves no training images ({len(train)} in all)")
        val = train.subset(order[:held].sort().values)
        train = train.subset(order[held:].sort().values)
    val = val or test
    test = test or val
    return Splits(train, val, test, raw.classes, channels, size, raw.native_channels, stored)
