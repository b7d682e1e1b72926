"""Checkpoints: plain dicts of tensors and primitives, saved atomically, loaded weights_only.

A checkpoint never holds pickled classes, so `torch.load(path, weights_only=True)` reads it with
no allowlist, and a file that asks to run code is refused by torch's restricted unpickler.
"""

from __future__ import annotations

import errno
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainkit.errors import TrainkitError

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
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files left by a save that was killed (called when a run starts)."""
    removed = 0
    if directory.is_dir():
        for stale in directory.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same directory, fsync, os.replace, fsync the directory:
    a crash at any moment leaves either the old file or the new one, never a torn one.
    The temp name is unpredictable and created exclusively (mkstemp: O_CREAT|O_EXCL), so a
    link planted under a guessed name is never written through; a final path that is a link
    is refused (os.replace would swap the link, but its target is someone else's file).
    On failure the temp file is removed and the OSError raised."""
    import tempfile

    if path.is_symlink():
        raise OSError(errno.ELOOP, "refusing to replace a symbolic link", str(path))
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        # reopened by name without following links (a swap after mkstemp is refused)
        with open(tmp, "wb", opener=lambda file, flags: os.open(file, flags | os.O_NOFOLLOW)) as handle:
            torch.save(state, handle)
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


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    try:
        atomic_save(state, path)
    except OSError as error:
        raise TrainkitError(f"could not save checkpoint {path}: {error.strerror or error}") from None


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
