"""Checkpoints: plain dicts of tensors and primitives, saved atomically, loaded weights_only.

A checkpoint never holds pickled classes, so `torch.load(path, weights_only=True)` reads it with
no allowlist, and a file that asks to run code is refused by torch's restricted unpickler.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from trainkit.callbacks import Callback
from trainkit.errors import NonFiniteLoss, TrainkitError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "model_spec", "preprocess", "classes", "config")


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes removed."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A fresh, unguessable temp name beside `path` (the one temp-name rule)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files left by a save that was killed (called when a run starts)."""
    removed = 0
    if directory.is_dir():
        for stale in directory.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """The one file writer: `write(handle)` fills a temp file in the same directory, then
    fsync, os.replace, fsync the directory: a crash at any moment leaves either the old file
    or the new one, never a torn one. The temp name is unpredictable and created exclusively
    (mkstemp: O_CREAT|O_EXCL), so a link planted under a guessed name is never written through;
    a final path that is a link is refused (os.replace would swap the link, but its target is
    someone else's file). On failure the temp file is removed and the OSError raised."""
    import tempfile

    if path.is_symlink():
        raise OSError(errno.ELOOP, "refusing to replace a symbolic link", str(path))
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        # reopened by name without following links (a swap after mkstemp is refused)
        with open(tmp, "wb", opener=lambda file, flags: os.open(file, flags | os.O_NOFOLLOW)) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_directory(path.parent)


def save_error(path: Path, error: OSError) -> TrainkitError:
    """The one wording of a failed checkpoint write."""
    return TrainkitError(f"could not save checkpoint {path}: {error.strerror or error}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    try:
        atomic_save(state, path)
    except OSError as error:
        raise save_error(path, error) from error
    except RuntimeError as error:  # torch's zip writer, broken off by a KeyboardInterrupt
        if isinstance(error.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from error
        raise


def link_or_copy(source: Path, target: Path) -> None:
    """Point `target` at `source`'s current bytes atomically, through the same temp files as
    `atomic_save`. A hard link shares the inode, and the next save of `source` replaces its
    inode, so `target` keeps this version."""
    tmp = temp_path_for(target)  # unguessable; os.link creates it exclusively, never through a link
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network filesystems): a full copy
            with open(source, "rb") as data:
                atomic_write(target, lambda handle: shutil.copyfileobj(data, handle))
            return
        if target.is_symlink():
            raise OSError(errno.ELOOP, "refusing to replace a symbolic link", str(target))
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise save_error(target, error) from error
    _fsync_directory(target.parent)


def _describe_unpickling_error(error: Exception) -> str:
    text = str(error)
    for line in text.splitlines():
        line = line.strip()
        if "Unsupported global" in line or "unsupported global" in line.lower():
            return line.rstrip(".") + " (refused: checkpoints must not contain code)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = f"{type(error).__name__}: {first[:120]}" if first else type(error).__name__
    return f"corrupt, truncated or not a torch file ({detail})"


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a trainkit checkpoint; any problem is one TrainkitError line."""
    path = Path(path)
    if not path.is_file():
        raise TrainkitError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise TrainkitError(f"{path}: empty file, not a checkpoint")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
        if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
            raise TrainkitError(f"{path}: a TorchScript archive, refused (it can run code)")
    try:
        # torch warns (on stderr, once per process) about odd pickle protocols in junk
        # files before failing; the one-line error below says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for hostile or broken files
        raise TrainkitError(f"{path}: cannot load checkpoint: {_describe_unpickling_error(error)}") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise TrainkitError(f"{path}: not a trainkit checkpoint (no format_version)")
    version = state["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TrainkitError(
            f"{path}: checkpoint format {version} is newer than this trainkit reads "
            f"({FORMAT_VERSION}); upgrade trainkit"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise TrainkitError(f"{path}: checkpoint is missing {', '.join(missing)}")
    if not isinstance(state["model"], dict):
        raise TrainkitError(f"{path}: checkpoint 'model' is not a state_dict")
    state["model"] = strip_module_prefix(state["model"])
    return state


def build_model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint"):
    from trainkit.models import build_model

    model = build_model(dict(state["model_spec"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise TrainkitError(f"{path}: weights do not fit the model: {first}") from None
    return model


# --------------------------------------------------------------------------- the writer policy


class CheckpointWriter(Callback):
    """Which checkpoints a run keeps (a callback, given to the main process only):

    - `last.pt` after every epoch and when a stop is requested: where a resume starts;
    - `best.pt` whenever the monitored metric improved;
    - `epoch-<N>.pt` for the `top_k` best evaluated epochs and every `every_epochs` epochs.

    The extra files are hard links to `last.pt` where the filesystem allows, so they cost no
    space until `last.pt` moves on. A checkpoint with non-finite weights is never written.
    """

    state_key = "checkpoint_writer"

    def __init__(self, directory: Path, *, top_k: int = 0, every_epochs: int | None = None):
        self.directory, self.top_k, self.every_epochs = directory, top_k, every_epochs
        self.ranked: list[tuple[float, int]] = []  # (monitored value, epoch) of the kept top-k

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        value = row.get(trainer.monitor.name)
        dropped = self._rank(trainer.monitor, value, epoch) if value is not None else []
        self.save_last(trainer)
        if trainer.state.best_epoch == epoch:  # improved at this epoch
            link_or_copy(self.last, self.directory / "best.pt")
        if self._keeps(epoch):
            link_or_copy(self.last, self.epoch_path(epoch))
        for gone in dropped:
            if not self._keeps(gone):
                self.epoch_path(gone).unlink(missing_ok=True)

    def on_interrupt(self, trainer) -> None:
        self.save_last(trainer)
        s = trainer.state
        trainer.console.say(
            f"saved {self.last} at epoch {s.epoch + 1}, step {s.global_step}; continue with --resume"
        )

    def save_last(self, trainer) -> None:
        state = trainer.checkpoint_state()
        for value in state["model"].values():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteLoss("model weights are not finite; refusing to write a checkpoint")
        save_checkpoint(state, self.last)

    def epoch_path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch}.pt"

    def _keeps(self, epoch: int) -> bool:
        every = self.every_epochs and epoch % self.every_epochs == 0
        return bool(every) or any(kept == epoch for _, kept in self.ranked)

    def _rank(self, monitor, value: float, epoch: int) -> list[int]:
        """Enter this epoch's value into the top-k; → the epochs that fell out."""
        if not self.top_k or math.isnan(value):
            return []
        self.ranked.append((float(value), epoch))
        # best first; among equal values the earlier epoch
        self.ranked.sort(key=lambda item: (-item[0] if monitor.mode == "max" else item[0], item[1]))
        dropped = [kept for _, kept in self.ranked[self.top_k :]]
        del self.ranked[self.top_k :]
        return dropped

    def state_dict(self) -> dict[str, Any]:
        return {"ranked": [[value, epoch] for value, epoch in self.ranked]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranked = [(float(value), int(epoch)) for value, epoch in state.get("ranked", [])]
