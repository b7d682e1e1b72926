"""Checkpoints: plain dicts of tensors and primitives, saved atomically, loaded weights_only.

A checkpoint never holds pickled classes, so `torch.load(path, weights_only=True)` reads it with
no allowlist, and a file that asks to run code is refused by torch's restricted unpickler.
"""

from __future__ import annotations

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
    On failure the temp file is removed and the OSError raised."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
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


WHOLE_MODEL_HINT = (
    "a whole pickled model (torch.save(model)), refused: unpickling it can run code; "
    "re-save the weights with torch.save(model.state_dict(), PATH)"
)


def _pickles_a_module(path: Path) -> bool:
    """Does the archive's pickle name torch.nn module classes (a whole saved model)? Only the
    bytes are searched: nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("data.pkl") and archive.getinfo(name).file_size < 64_000_000:
                    return b"torch.nn.modules" in archive.read(name)
    except (zipfile.BadZipFile, OSError):
        pass
    return False


def load_torch_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; a missing, empty, TorchScript, code-carrying or
    corrupt file is one TrainkitError line."""
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
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for hostile or broken files
        if "global" in str(error).lower() and _pickles_a_module(path):
            raise TrainkitError(f"{path}: {WHOLE_MODEL_HINT}") from None
        raise TrainkitError(f"{path}: cannot load checkpoint: {_describe_unpickling_error(error)}") from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a trainkit checkpoint; any problem is one TrainkitError line."""
    path = Path(path)
    state = load_torch_file(path, map_location)
    if not isinstance(state, dict) or "format_version" not in state:
        hint = ""
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = (
                "; a plain state dict: eval and predict take it with --config CONFIG.yaml (model, data, "
                "preprocessing), train starts from it with model.init"
            )
        raise TrainkitError(f"{path}: not a trainkit checkpoint (no format_version){hint}")
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


def build_model_from_checkpoint(
    state: dict[str, Any], path: str | Path = "checkpoint", trust_code: bool = False
):
    from trainkit.models import build_model
    from trainkit.models.custom import is_code_reference, untrusted_message

    name = str(state["model_spec"].get("name", ""))
    if is_code_reference(name) and not trust_code:  # before anything is imported
        raise TrainkitError(f"{path}: the model {untrusted_message(name)}")
    model = build_model(dict(state["model_spec"]), trust_code)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise TrainkitError(f"{path}: weights do not fit the model: {first}") from None
    return model
