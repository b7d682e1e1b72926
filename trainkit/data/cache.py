"""On-disk decoded cache for image files: decode once, then load a uint8 tensor in a blink.

The cache file is keyed by the file list, each file's size and modification time, and the
target channels and size, so any change to the images (or the preprocessing) rebuilds it. It
lives in `data.cache_dir`, else `<root>/.trainkit_cache`, else — when root is read-only — the
user cache directory (`$XDG_CACHE_HOME/trainkit` or `~/.cache/trainkit`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from trainkit.data.preprocess import compute_stats
from trainkit.errors import TrainkitError
from trainkit.reporting import note, warn
from trainkit.runtime import is_main_process

Stats = tuple[tuple[float, ...], tuple[float, ...]]

CACHE_FORMAT = 2  # 2: normalization statistics stored with the images


@dataclass(frozen=True)
class CacheSettings:
    root: str
    cache_dir: str | None
    num_workers: int
    skip_bad_images: bool

    @classmethod
    def from_config(cls, data) -> CacheSettings:
        return cls(data.root, data.cache_dir, data.num_workers, data.skip_bad_images)


def cache_key(
    paths: list[str], stamps: list[tuple[int, int]], channels: int, size: int, resize: str = "squash"
) -> str:
    """Digest of the format, target shape, resize mode and every file's path, size and mtime (ns)."""
    mode = "" if resize == "squash" else f" r{resize}"  # squash keys as before resize modes
    digest = hashlib.sha256(f"v{CACHE_FORMAT} c{channels} s{size}{mode}\n".encode())
    digest.update("".join(f"{path}\0{nbytes}\0{mtime}\n" for path, (nbytes, mtime) in zip(paths, stamps)).encode())
    return digest.hexdigest()[:24]


def _writable_dir(candidate: Path) -> bool:
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(candidate, os.W_OK)


def cache_directory(settings: CacheSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir)
    beside = Path(settings.root) / ".trainkit_cache"
    if _writable_dir(beside):
        return beside
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trainkit"


class _Guarded(Dataset):
    """Return decode errors as values so one bad file is reported by name, not as a crash."""

    def __init__(self, base: Dataset, channels: int, size: int):
        self.base, self.shape = base, (channels, size, size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        try:
            return self.base[index][0], ""
        except TrainkitError as error:
            return torch.zeros(self.shape, dtype=torch.uint8), str(error)


def _collate(batch):
    return torch.stack([image for image, _ in batch]), [error for _, error in batch]


def decode_all(
    items: Dataset, channels: int, size: int, num_workers: int, keep: bool = True
) -> tuple[torch.Tensor | None, list[tuple[int, str]]]:
    """Decode every item into one uint8 (N, C, H, W) tensor; return it and the failures.
    With keep=False the pixels are dropped as they come (a check that every image decodes)."""
    count = len(items)
    images = torch.empty(count, channels, size, size, dtype=torch.uint8) if keep else None
    failures: list[tuple[int, str]] = []
    loader = DataLoader(
        _Guarded(items, channels, size),
        batch_size=256,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    start, done = time.perf_counter(), 0
    progress = _Progress(count, "decoding" if keep else "checking")
    for batch, errors in loader:
        if images is not None:
            images[done : done + batch.shape[0]] = batch
        failures += [(done + i, e) for i, e in enumerate(errors) if e]
        done += batch.shape[0]
        progress.update(done)
    progress.close(time.perf_counter() - start)
    return images, failures


class _Progress:
    """A rich bar on a terminal, one line at start and end otherwise (stderr)."""

    def __init__(self, total: int, verb: str = "decoding"):
        self.total, self.bar, self.verb = total, None, verb
        what = "into the tensor cache" if verb == "decoding" else "before training"
        if not is_main_process():
            return
        if sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task(f"{verb} {total} images", total=total)
        else:
            note(f"{verb} {total} images once {what}…")

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def close(self, seconds: float) -> None:
        if self.bar is not None:
            self.bar.stop()
        done = "decoded" if self.verb == "decoding" else "checked"
        note(f"{done} {self.total} images in {seconds:.1f} s")


def kept_after(failures: list[tuple[int, str]], count: int, skip: bool) -> torch.Tensor | None:
    """Unreadable images: one error naming the first (and how many more), or with
    data.skip_bad_images a warning each and the indices of the images kept."""
    if not failures:
        return None
    if not skip:
        index, message = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise TrainkitError(f"{message}{more}; set data.skip_bad_images=true to skip them")
    for _, message in failures:
        warn(f"skipped {message}")
    mask = torch.ones(count, dtype=torch.bool)
    mask[torch.tensor([i for i, _ in failures])] = False
    return torch.nonzero(mask).squeeze(1)


def check_images(
    items: Dataset, paths: list[str], stamps: list[tuple[int, int]], settings: CacheSettings
) -> torch.Tensor | None:
    """Before a DataLoader run: decode every image once, so that a corrupt file is named now,
    not an hour into training. The verdict is cached beside the tensor caches, under the same
    kind of key (file list, sizes, mtimes), so later runs skip the pass. → kept indices or None."""
    key = cache_key(paths, stamps, 0, 0)
    directory = cache_directory(settings)
    path = directory / f"{key}.checked.pt"
    failures = None
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") == CACHE_FORMAT:
                failures = [(int(i), str(m)) for i, m in state["failures"]]
        except Exception:  # a damaged verdict is redone, never trusted
            failures = None
    if failures is None:
        channels, size = items.channels, items.size
        _, failures = decode_all(items, channels, size, settings.num_workers, keep=False)
        if _writable_dir(directory):
            _save_state_atomic({"format": CACHE_FORMAT, "failures": [[i, m] for i, m in failures]}, path)
    return kept_after(failures, len(paths), settings.skip_bad_images)


def load_or_build_cache(
    items: Dataset, paths: list[str], stamps: list[tuple[int, int]], channels: int, size: int,
    settings: CacheSettings, resize: str = "squash",
) -> tuple[torch.Tensor, torch.Tensor | None, Stats]:
    """→ (images uint8 (N', C, H, W), kept indices or None when every image decoded, and the
    images' per-channel (mean, std), computed once here so later runs skip that pass)."""
    key = cache_key(paths, stamps, channels, size, resize)
    directory = cache_directory(settings)
    path = directory / f"{key}.pt"
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if state.get("format") == CACHE_FORMAT:
                return state["images"], state.get("kept"), tuple(map(tuple, state["stats"]))
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    images, failures = decode_all(items, channels, size, settings.num_workers)
    kept = kept_after(failures, len(paths), settings.skip_bad_images)
    if kept is not None:
        images = images[kept]
    stats = compute_stats(images)
    if _writable_dir(directory):
        state = {"format": CACHE_FORMAT, "images": images, "stats": [list(s) for s in stats]}
        if kept is not None:
            state["kept"] = kept
        _save_state_atomic(state, path)
    return images, kept, stats


def _save_state_atomic(state: dict, path: Path) -> None:
    from trainkit.checkpoint import atomic_save

    try:
        atomic_save(state, path)
    except OSError as error:  # the run goes on without a cache
        warn(f"could not write the decoded cache {path}: {error}")
