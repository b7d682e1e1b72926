"""On-disk decoded cache for image files: decode once, then load a uint8 tensor in a blink.

A cache file is keyed by the file list, each file's size and modification time, and the
target channels and size, so any change to the images (or the preprocessing) rebuilds it.

Where it goes (`cache_directory`, the one home of this rule):
- `data.cache_dir` when set;
- else `<root>/.trainkit_cache` when the dataset folder belongs to the user running trainkit
  and is writable (a dataset of one's own: the cache travels and is deleted with it);
- else the user cache directory, `$XDG_CACHE_HOME/trainkit/<folder>-<digest>` (default
  `~/.cache/trainkit/…`): a read-only dataset, or one owned by someone else (shared), is
  never written into.

Each cache directory holds at most `data.cache_max_gb`; past it, the least recently used
cache files are removed. Writers hold an flock on `<dir>/.lock`, so two runs never fight
over one file, and temp files a killed run left behind are removed by the next holder.
Nothing is written through a symbolic link: a cache directory or cache file that is a link
is refused. Only successes are cached for good: images that failed to decode are tried
again by the next run (a `chmod` or a repaired file is picked up).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from trainkit.data.preprocess import compute_stats, decode_image
from trainkit.data.workers import from_arrays, to_arrays, worker_options
from trainkit.errors import TrainkitError
from trainkit.reporting import note, warn
from trainkit.runtime import is_main_process
from trainkit.text import escape, size_text, write_file

Stats = tuple[tuple[float, ...], tuple[float, ...]]

CACHE_FORMAT = 3  # 3: failures stored (retried by the next run), file count checked on load
BESIDE_NAME = ".trainkit_cache"
LOCK_NAME = ".lock"
ROOT_NOTE = "root.txt"  # in a user-cache directory: which dataset folder it caches
KNOWN_PLACES = "places.txt"  # in the user cache: cache folders elsewhere, for `trainkit cache list`
DECODE_BATCH_BYTES = 256 * 2**20  # decoding batches stay under this many bytes


@dataclass(frozen=True)
class CacheSettings:
    root: str
    cache_dir: str | None
    num_workers: int
    skip_bad_images: bool
    max_bytes: float = 20e9

    @classmethod
    def from_config(cls, data) -> CacheSettings:
        return cls(data.root, data.cache_dir, data.num_workers, data.skip_bad_images, data.cache_max_gb * 1e9)


def cache_key(
    paths: list[str], stamps: list[tuple[int, int]], channels: int, size: int, resize: str = "squash"
) -> str:
    """Digest of the format, target shape, resize mode and every file's path, size and mtime (ns)."""
    mode = "" if resize == "squash" else f" r{resize}"  # squash keys as before resize modes
    digest = hashlib.sha256(f"v{CACHE_FORMAT} c{channels} s{size}{mode}\n".encode())
    digest.update(
        "".join(f"{path}\0{nbytes}\0{mtime}\n" for path, (nbytes, mtime) in zip(paths, stamps)).encode()
    )
    return digest.hexdigest()[:24]


# --------------------------------------------------------------------------- where


def user_cache_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trainkit"


def user_cache_for(root: str) -> Path:
    """The user-cache directory of one dataset folder: readable name + digest of its path."""
    resolved = os.path.realpath(root)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(resolved).name)[:40] or "root"
    return user_cache_base() / f"{name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def _own_and_writable(folder: Path) -> bool:
    try:
        info = folder.stat()
    except OSError:
        return False
    return info.st_uid == os.geteuid() and os.access(folder, os.W_OK)


def cache_directory(settings: CacheSettings) -> Path:
    """The rule in the module docstring; nothing is created here."""
    if settings.cache_dir:
        return Path(settings.cache_dir)
    root = Path(settings.root)
    beside = root / BESIDE_NAME
    if beside.is_symlink():  # planted in a shared folder: refused, never followed
        _refuse_link(beside)
    if _own_and_writable(root):
        return beside
    return user_cache_for(settings.root)


def _refuse_link(path: Path) -> None:
    raise TrainkitError(
        f"{path} is a symbolic link; trainkit never writes through links "
        "(remove it, or set data.cache_dir to a real directory)"
    )


def _prepare_directory(directory: Path, root: str | None) -> bool:
    """Create the cache directory (no link anywhere we create); False when it cannot be."""
    if directory.is_symlink():
        _refuse_link(directory)
    try:
        in_user_cache = directory.parent == user_cache_base()
        if in_user_cache and user_cache_base().is_symlink():
            _refuse_link(user_cache_base())
        directory.mkdir(parents=True, exist_ok=True, mode=0o700 if in_user_cache else 0o777)
        if in_user_cache and root is not None and not (directory / ROOT_NOTE).exists():
            _write_text(directory / ROOT_NOTE, os.path.realpath(root) + "\n")
    except OSError:
        return False
    if directory.is_symlink() or not directory.is_dir():  # swapped under us
        _refuse_link(directory)
    return os.access(directory, os.W_OK)


def _write_text(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Exclusive flock on `<dir>/.lock` for building, writing, evicting; on entry, temp files
    that a killed writer left are removed (every writer holds this lock, so any temp file
    seen now is stale)."""
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            _refuse_link(path)
        raise TrainkitError(f"cannot lock the cache {directory}: {error.strerror or error}") from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"waiting for another trainkit process using the cache {directory}…")
            fcntl.flock(fd, fcntl.LOCK_EX)
        removed = 0
        for stale in directory.glob(".*.tmp-*"):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed += 1
        if removed:
            note(f"removed {removed} temp file(s) left in {directory} by an interrupted run")
        yield
    finally:
        os.close(fd)  # releases the flock


# --------------------------------------------------------------------------- decoding


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
    # numpy through the worker's pipe: a 256 MB batch would not fit a container's /dev/shm
    return to_arrays(torch.stack([image for image, _ in batch])), [error for _, error in batch]


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
        batch_size=max(1, min(256, DECODE_BATCH_BYTES // (channels * size * size))),
        num_workers=num_workers,
        collate_fn=_collate,
        **worker_options(num_workers),
    )
    start, done = time.perf_counter(), 0
    progress = _Progress(count, "decoding" if keep else "checking")
    for batch, errors in loader:
        batch = from_arrays(batch)
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


def _now_readable(failures: list[tuple[int, str]], paths: list[str]) -> bool:
    """Does any image that failed last time decode now (permissions fixed, file repaired)?"""
    for index, _ in failures:
        try:
            decode_image(paths[index], 1, 8)
            return True
        except TrainkitError:
            continue
    return False


def _load_state(path: Path, mmap: bool = False) -> dict | None:
    """A cache file's state, or None when absent or unreadable (a damaged cache is rebuilt,
    never trusted). A link in place of a cache file is refused, never read."""
    if path.is_symlink():
        _refuse_link(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - any damage means rebuild
        warn(f"the decoded cache {path} is damaged; rebuilding it")
        return None
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # its mtime is its last use, for least-recently-used eviction
    return state


def _failures_of(state: dict) -> list[tuple[int, str]]:
    return [(int(i), str(m)) for i, m in state.get("failures", [])]


def check_images(
    items: Dataset, paths: list[str], stamps: list[tuple[int, int]], settings: CacheSettings
) -> torch.Tensor | None:
    """Before a DataLoader run: decode every image once, so that a corrupt file is named now,
    not an hour into training. The verdict is cached beside the tensor caches, under the same
    kind of key (file list, sizes, mtimes), so later runs skip the pass. → kept indices or None."""
    key = cache_key(paths, stamps, 0, 0)
    directory = cache_directory(settings)
    path = directory / f"{key}.checked.pt"
    writable = _prepare_directory(directory, settings.root)
    with cache_lock(directory) if writable else contextlib.nullcontext():
        state = _load_state(path)
        failures = None
        if state is not None and state.get("count") == len(paths):
            failures = _failures_of(state)
            if any(not 0 <= i < len(paths) for i, _ in failures):
                warn(f"the image check {path} disagrees with the file list; checking again")
                failures = None
            elif failures and _now_readable(failures, paths):
                note("images that failed to decode last time may read now; checking again")
                failures = None
        if failures is None:
            _, failures = decode_all(items, items.channels, items.size, settings.num_workers, keep=False)
            if writable:
                state = {
                    "format": CACHE_FORMAT,
                    "count": len(paths),
                    "failures": [[i, m] for i, m in failures],
                }
                _save_state(state, path, settings, announce=False)
    return kept_after(failures, len(paths), settings.skip_bad_images)


def _consistent(state: dict, count: int, channels: int, size: int) -> bool:
    """Does a loaded cache match the file list it is keyed on (count, kept indices, shape)?"""
    images, kept = state.get("images"), state.get("kept")
    if state.get("count") != count or not isinstance(images, torch.Tensor):
        return False
    expected = count if kept is None else int(kept.shape[0])
    if kept is not None and (kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= count)):
        return False
    return images.dtype == torch.uint8 and tuple(images.shape) == (expected, channels, size, size)


def load_or_build_cache(
    items: Dataset,
    paths: list[str],
    stamps: list[tuple[int, int]],
    channels: int,
    size: int,
    settings: CacheSettings,
    resize: str = "squash",
) -> tuple[torch.Tensor, torch.Tensor | None, Stats]:
    """→ (images uint8 (N', C, H, W), kept indices or None when every image decoded, and the
    images' per-channel (mean, std), computed once here so later runs skip that pass)."""
    key = cache_key(paths, stamps, channels, size, resize)
    directory = cache_directory(settings)
    path = directory / f"{key}.pt"
    writable = _prepare_directory(directory, settings.root)
    with cache_lock(directory) if writable else contextlib.nullcontext():
        state = _load_state(path, mmap=True)
        if state is not None:
            failures = _failures_of(state)
            if not _consistent(state, len(paths), channels, size):
                found = state["images"].shape[0] if isinstance(state.get("images"), torch.Tensor) else "no"
                warn(
                    f"the decoded cache {path} disagrees with the file list ({found} images for "
                    f"{len(paths)} files); rebuilding it"
                )
            elif failures and _now_readable(failures, paths):
                note("images that failed to decode last time may read now; decoding again")
            else:
                kept_after(failures, len(paths), settings.skip_bad_images)  # same verdict as then
                return state["images"], state.get("kept"), tuple(map(tuple, state["stats"]))
        images, failures = decode_all(items, channels, size, settings.num_workers)
        kept = kept_after(failures, len(paths), settings.skip_bad_images)
        if kept is not None:
            images = images[kept]
        stats = compute_stats(images)
        if writable:
            state = {
                "format": CACHE_FORMAT,
                "count": len(paths),
                "images": images,
                "stats": [list(s) for s in stats],
                "failures": [[i, m] for i, m in failures],
            }
            if kept is not None:
                state["kept"] = kept
            _save_state(state, path, settings, announce=True, nbytes=images.numel())
    return images, kept, stats


def _save_state(state: dict, path: Path, settings: CacheSettings, announce: bool, nbytes: int = 0) -> None:
    """Write one cache file (under the directory's lock), then keep the directory within its
    budget. A cache larger than the whole budget is not written (the run goes on without)."""
    from trainkit.checkpoint import atomic_save

    if nbytes > settings.max_bytes:
        warn(
            f"not caching the decoded images ({size_text(nbytes)}): over data.cache_max_gb "
            f"({size_text(settings.max_bytes)}); they will be decoded again next run"
        )
        return
    evicted = _evict(path.parent, settings.max_bytes - nbytes, keep=path)
    try:
        atomic_save(state, path)
    except OSError as error:  # the run goes on without a cache
        warn(f"could not write the decoded cache {path}: {error.strerror or error}")
        return
    if announce:
        _remember(path.parent)
        total = directory_bytes(path.parent)
        gone = f"; removed {evicted} least recently used" if evicted else ""
        note(
            f"decoded cache written: {path} ({size_text(path.stat().st_size)}; the folder holds "
            f"{size_text(total)} of its {size_text(settings.max_bytes)} budget{gone}; "
            "`trainkit cache clean` removes it)"
        )


def _known_places() -> list[str]:
    known = user_cache_base() / KNOWN_PLACES
    if known.is_symlink() or not known.is_file():
        return []
    return [line for line in known.read_text().splitlines() if line.strip()]


def _remember(directory: Path) -> None:
    """Note a cache folder outside the user cache (beside a dataset, or data.cache_dir) so that
    `trainkit cache list` finds it without being told where (best effort, never fatal)."""
    place = os.path.realpath(directory)
    base = user_cache_base()
    if place.startswith(str(base) + os.sep):
        return
    try:
        places = [known for known in _known_places() if os.path.isdir(known)]  # the gone dropped
        if place in places:
            return
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file(base / KNOWN_PLACES, "".join(f"{p}\n" for p in [*places, place]))
    except (OSError, TrainkitError):  # write_file refuses another user's link: still never fatal
        pass


def cache_files(directory: Path) -> list[Path]:
    """trainkit's cache files in a directory (never anything else of the user's)."""
    if not directory.is_dir() or directory.is_symlink():
        return []
    return [p for p in directory.glob("*.pt") if not p.is_symlink() and p.is_file()]


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in cache_files(directory))


def _evict(directory: Path, budget: float, keep: Path) -> int:
    """Remove least-recently-used cache files (mtime = last use) until the rest fit `budget`."""
    files = sorted((p for p in cache_files(directory) if p != keep), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    removed = 0
    for victim in files:
        if total <= budget:
            break
        total -= victim.stat().st_size
        with contextlib.suppress(OSError):
            victim.unlink()
            removed += 1
    return removed


# --------------------------------------------------------------------------- trainkit cache


@dataclass
class CacheDirectory:
    path: Path
    root: str | None  # the dataset folder it caches, when known
    files: int
    nbytes: int
    last_used: float | None


def _describe(path: Path, root: str | None) -> CacheDirectory:
    files = cache_files(path)
    last = max((p.stat().st_mtime for p in files), default=None)
    return CacheDirectory(path, root, len(files), sum(p.stat().st_size for p in files), last)


def find_cache_directories(root: str | None = None) -> list[CacheDirectory]:
    """Cache directories of one dataset folder (beside it and in the user cache), or, without
    a root, every one trainkit knows: those in the user cache and those it wrote elsewhere
    (remembered in the user cache's places.txt). A path that is itself a cache directory (one set with
    data.cache_dir) is taken as one."""
    found = []
    if root is not None:
        folder = Path(root).resolve()
        if cache_files(folder) or (folder / LOCK_NAME).is_file():
            found.append(_describe(folder, None))
        for candidate in (folder / BESIDE_NAME, user_cache_for(root)):
            if candidate.is_dir() and not candidate.is_symlink():
                found.append(_describe(candidate, str(folder)))
        return found
    for place in _known_places():
        folder = Path(place)
        if folder.is_dir() and not folder.is_symlink():
            beside = folder.parent if folder.name == BESIDE_NAME else None
            found.append(_describe(folder, str(beside) if beside else None))
    base = user_cache_base()
    if base.is_dir() and not base.is_symlink():
        for child in sorted(base.iterdir()):
            if child.is_dir() and not child.is_symlink():
                note_file = child / ROOT_NOTE
                named = note_file.read_text().strip() if note_file.is_file() else None
                found.append(_describe(child, named))
    return found


def remove_cache_directory(entry: CacheDirectory) -> int:
    """Delete trainkit's files in a cache directory (and the directory when it is then empty);
    other files are left alone. → bytes freed."""
    with cache_lock(entry.path):
        freed = 0
        for path in cache_files(entry.path):
            freed += path.stat().st_size
            path.unlink()
        with contextlib.suppress(OSError):
            (entry.path / ROOT_NOTE).unlink()
    with contextlib.suppress(OSError):
        (entry.path / LOCK_NAME).unlink()
    with contextlib.suppress(OSError):
        entry.path.rmdir()
    return freed


def run_cache(action: str, root: str | None) -> int:
    """`trainkit cache list|clean [ROOT]`."""
    if root is not None and not Path(root).is_dir():
        raise TrainkitError(f"{root}: not a directory")
    entries = find_cache_directories(root)
    if not entries:
        print(f"no trainkit cache for {escape(root)}" if root else "no trainkit caches known")
        return 0
    if action == "list":
        for entry in entries:
            used = (
                time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)) if entry.last_used else "-"
            )
            of = f"  ({escape(entry.root)})" if entry.root and entry.root != str(entry.path) else ""
            size = size_text(entry.nbytes)
            print(f"{size:>9}  {entry.files:3d} files  last used {used}  {escape(entry.path)}{of}")
        print(f"{size_text(sum(e.nbytes for e in entries)):>9}  in all")
        return 0
    freed = 0
    for entry in entries:
        freed += remove_cache_directory(entry)
        print(f"removed {escape(entry.path)}")
    print(f"freed {size_text(freed)}")
    return 0
