"""Checkpoints, and the one home of how trainkit writes and reads files.

Writing: every file trainkit writes goes through `atomic_write` (or `open_append` for logs that
grow): a temp file with an unpredictable name is created exclusively (O_EXCL | O_NOFOLLOW) in the
target's own directory, fsynced and renamed over the target, so a crash leaves the old or the new
file, and a symbolic link planted at the target, at its directory or at a guessable temp name is
never written through. trainkit creates no symbolic links, so any link found there is refused.

Reading: a checkpoint is a plain dict of tensors and primitives, read by `torch_load` (the one
loader: torch version guard, size bounds, `weights_only=True`) and then checked field by field
before anything is allocated from it.
"""

from __future__ import annotations

import errno
import math
import os
import re
import secrets
import shutil
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from trainkit.callbacks import Callback
from trainkit.errors import NonFiniteLoss, TrainkitError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "model_spec", "preprocess", "classes", "config")
# A zip-format torch file stores its entries uncompressed; a checkpoint whose entries expand to
# more than this multiple of its size on disk (plus slack for tiny files) is refused unread.
MAX_EXPANSION = 2
EXPANSION_SLACK_BYTES = 16 << 20
MAX_ZIP_ENTRIES = 100_000
MAX_CLASSES = 100_000
MAX_CLASS_NAME_CHARS = 1000
MAX_IMAGE_SIZE = 8192


# --------------------------------------------------------------------------- writing files

# `.<name>.tmp-<16 hex>`; the pid-numbered form is what earlier versions left behind.
_TEMP_NAME = re.compile(r"^\..+\.tmp-(?:[0-9a-f]{16}|[0-9]+)$")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temp_path_for(path: Path) -> Path:
    """A fresh, unguessable temp name beside `path` (the one temp-name rule)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


def is_temp_file(path: str | Path) -> bool:
    """True for a name that trainkit's writer uses for its temp files."""
    return bool(_TEMP_NAME.match(Path(path).name))


def stale_temp_files(directory: str | Path) -> list[Path]:
    """trainkit temp files (not links, not folders) left in `directory` by killed writers.
    Only the holder of the directory (a run's lock, the cache's) should delete them."""
    directory = Path(directory)
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if is_temp_file(entry.name) and entry.is_file(follow_symlinks=False):
            found.append(Path(entry.path))
    return sorted(found)


def remove_stale_temp_files(directory: str | Path) -> int:
    removed = 0
    for stale in stale_temp_files(directory):
        try:
            stale.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _link_refused(path: Path) -> OSError:
    return OSError(errno.ELOOP, "refusing to write through a symbolic link", str(path))


def _open_directory(directory: Path) -> int:
    """An fd on `directory` itself, refusing a directory that is a symbolic link."""
    try:
        return os.open(directory, _DIR_FLAGS | _CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
            raise _link_refused(directory) from error
        raise


def _refuse_link_at(dir_fd: int, name: str, path: Path) -> None:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise _link_refused(path)
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _replace_at(dir_fd: int, tmp: str, name: str) -> None:
    """Rename the finished temp file over `name` (both in `dir_fd`), then fsync the directory so
    the rename survives a power cut; on failure the temp file is removed, never left behind."""
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(tmp, dir_fd)
        raise
    try:
        os.fsync(dir_fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename itself is done
        pass


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(handle)` on a fresh temp file beside `path`, fsync it, rename it over `path`
    and fsync the directory: a crash at any moment leaves the old file or the new one. Raises
    OSError (the temp file removed) on failure, or when `path` or its directory is a link."""
    path = Path(path)
    dir_fd = _open_directory(path.parent)
    try:
        _refuse_link_at(dir_fd, path.name, path)
        tmp = temp_path_for(path).name

        def opener(_: str, flags: int) -> int:  # "x" mode: O_CREAT | O_EXCL; never a link
            return os.open(tmp, flags | _NOFOLLOW | _CLOEXEC, 0o666, dir_fd=dir_fd)

        try:
            with open(path.parent / tmp, "xb", opener=opener) as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            _unlink_quietly(tmp, dir_fd)
            raise
        _replace_at(dir_fd, tmp, path.name)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_save(state: dict[str, Any], path: str | Path) -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def open_append(path: str | Path) -> IO[str]:
    """A text handle appending to `path` (created if missing) that never follows a symbolic
    link, never blocks on a FIFO and refuses anything but a plain file with one name."""
    path = Path(path)
    dir_fd = _open_directory(path.parent)
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path.name, flags, 0o666, dir_fd=dir_fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise _link_refused(path) from error
            raise
    finally:
        os.close(dir_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise OSError(
            errno.EPERM, "refusing to append to a file that is not a plain, singly linked file", str(path)
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", newline="", encoding="utf-8")


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
    """Point `target` at `source`'s current bytes atomically, under the same rules as
    `atomic_write`: a hard link (shares the inode; the next save of `source` replaces its inode,
    so `target` keeps this version) made at an unguessable temp name and renamed over `target`;
    where hard links are not possible, a full copy through `atomic_write`."""
    target = Path(target)
    try:
        dir_fd = _open_directory(target.parent)
        try:
            _refuse_link_at(dir_fd, target.name, target)
            tmp = temp_path_for(target).name
            try:
                os.link(source, tmp, dst_dir_fd=dir_fd, follow_symlinks=False)  # exclusive
            except OSError:  # no hard links here (some network filesystems): a full copy
                with open(source, "rb") as original:
                    atomic_write(target, lambda handle: shutil.copyfileobj(original, handle))
                return
            _replace_at(dir_fd, tmp, target.name)
        finally:
            os.close(dir_fd)
    except OSError as error:
        raise save_error(target, error) from error


# --------------------------------------------------------------------------- reading files


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes removed."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


# First bytes of files people hand to `eval` by mistake → what they are.
_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"RIFF", "a RIFF file (WebP image?)"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x08", "a protobuf file (ONNX model?)"),
)


def _what_is(head: bytes) -> str:
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 9 and head[8:9] == b"{":
        return "a safetensors file (weights only, no trainkit metadata)"
    if head[:8].isascii() and head[:8].decode("ascii").strip().isprintable():
        return "a text file"
    return "unknown contents"


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory stands for its checkpoints/best.pt."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise TrainkitError(f"{path}: a folder without checkpoints/best.pt; name a checkpoint file")
    return path


def _check_archive(path: Path, size_on_disk: int) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise TrainkitError(f"{path}: cannot load checkpoint: corrupt zip archive ({error})") from error
    names = [entry.filename for entry in entries]
    if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
        raise TrainkitError(f"{path}: a TorchScript archive, refused (it can run code)")
    if len(entries) > MAX_ZIP_ENTRIES:
        raise TrainkitError(f"{path}: refused, {len(entries)} archive entries")
    expanded = sum(entry.file_size for entry in entries)
    if expanded > MAX_EXPANSION * size_on_disk + EXPANSION_SLACK_BYTES:
        raise TrainkitError(
            f"{path}: refused, its entries expand to {expanded / 1e6:,.0f} MB from "
            f"{size_on_disk / 1e6:,.1f} MB on disk (torch stores checkpoints uncompressed)"
        )


def _describe_unpickling_error(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "unsupported global" in line.lower():
            return line.rstrip(".") + " (refused: checkpoints must not contain code)"
    for line in lines:  # torch's weights-only essay names the real problem on this line
        if line.startswith("WeightsUnpickler error:"):
            return f"refused by the weights-only loader ({line[len('WeightsUnpickler error:') :].strip()})"
    first = re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else ""
    if len(first) > 120:
        first = first[:120].rsplit(" ", 1)[0] + " …"
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
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


def torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The one way trainkit reads a torch file (checkpoint, cache, weights): refuses a torch
    with a vulnerable weights-only loader, anything but a plain file, a TorchScript archive, a
    zip that expands far beyond its size, and non-torch files; then `weights_only=True`."""
    from trainkit.versions import require_safe_torch

    require_safe_torch()
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError as error:
        raise TrainkitError(f"checkpoint not found: {path}") from error
    except OSError as error:
        raise TrainkitError(f"{path}: cannot read ({error.strerror or error})") from error
    if not stat.S_ISREG(info.st_mode):
        raise TrainkitError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise TrainkitError(f"{path}: empty file, not a checkpoint")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise TrainkitError(f"{path}: cannot read ({error.strerror or error})") from error
    if head.startswith(b"PK\x03\x04"):
        _check_archive(path, info.st_size)
    elif not head.startswith(b"\x80"):  # the legacy format is a pickle stream: protocol opcode
        raise TrainkitError(f"{path}: not a torch checkpoint ({_what_is(head)})")
    try:
        # torch warns (on stderr, once per process) about odd pickle protocols in junk
        # files before failing; the one-line error below says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for hostile or broken files
        if "global" in str(error).lower() and _pickles_a_module(path):
            raise TrainkitError(f"{path}: {WHOLE_MODEL_HINT}") from error
        raise TrainkitError(f"{path}: cannot load checkpoint: {_describe_unpickling_error(error)}") from error


def _positive_int(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


def _finite_numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def check_checkpoint_fields(state: Any, path: str | Path) -> None:
    """Every field eval and predict use, checked for type and range (a TrainkitError naming it)."""

    def bad(field: str, why: str) -> TrainkitError:
        return TrainkitError(f"{path}: checkpoint field '{field}' {why}")

    version = state["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("format_version", f"is not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise TrainkitError(
            f"{path}: checkpoint format {version} is newer than this trainkit reads "
            f"({FORMAT_VERSION}); upgrade trainkit"
        )
    if version < 1:
        raise bad("format_version", f"is not a valid format ({version})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise TrainkitError(f"{path}: checkpoint is missing {', '.join(missing)}")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise bad("model", "is not a state_dict (names → tensors)")
    spec = state["model_spec"]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad("model_spec", "is not a model spec with a name")
    if not _positive_int(spec.get("num_classes"), MAX_CLASSES):
        raise bad("model_spec.num_classes", f"is not a class count ({spec.get('num_classes')!r})")
    for key, limit in (("in_channels", 64), ("input_size", MAX_IMAGE_SIZE)):
        if not _positive_int(spec.get(key), limit):
            raise bad(f"model_spec.{key}", f"is not an integer in 1..{limit} ({spec.get(key)!r})")
    classes = state["classes"]
    if (
        not isinstance(classes, (list, tuple))
        or not all(isinstance(name, str) and 0 < len(name) <= MAX_CLASS_NAME_CHARS for name in classes)
        or not 0 < len(classes) <= spec["num_classes"]
    ):
        raise bad("classes", f"is not a list of 1..{spec['num_classes']} class names (the model's outputs)")
    pre = state["preprocess"]
    if (
        not isinstance(pre, dict)
        or pre.get("channels") not in (1, 3)
        or isinstance(pre.get("channels"), bool)
    ):
        raise bad("preprocess.channels", "is not 1 or 3")
    if not _positive_int(pre.get("image_size"), MAX_IMAGE_SIZE):
        raise bad("preprocess.image_size", f"is not an integer in 1..{MAX_IMAGE_SIZE}")
    for key in ("mean", "std"):
        if not _finite_numbers(pre.get(key), pre["channels"]):
            raise bad(f"preprocess.{key}", f"is not {pre['channels']} finite numbers")
    if not all(s > 0 for s in pre["std"]):
        raise bad("preprocess.std", "has a value <= 0")
    if not isinstance(state["config"], dict):
        raise bad("config", "is not a mapping")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a trainkit checkpoint; any problem is one TrainkitError line."""
    path = Path(path)
    state = torch_load(path, map_location=map_location)
    if not isinstance(state, dict) or "format_version" not in state:
        hint = ""
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = (
                "; a plain state dict: eval and predict take it with --config CONFIG.yaml (model, data, "
                "preprocessing), train starts from it with model.init"
            )
        raise TrainkitError(f"{path}: not a trainkit checkpoint (no format_version){hint}")
    check_checkpoint_fields(state, path)
    state["model"] = strip_module_prefix(state["model"])
    return state


def _list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def require_code_permission(state: dict[str, Any], path: str | Path, trust_code: bool) -> None:
    """A checkpoint whose model is the user's own code: one line naming it and --trust-code,
    before anything is imported (call it before any other work)."""
    from trainkit.models.custom import is_code_reference, untrusted_message

    name = str(state["model_spec"].get("name", ""))
    if is_code_reference(name) and not trust_code:
        raise TrainkitError(f"{path}: the model {untrusted_message(name)}")


def build_model_from_checkpoint(
    state: dict[str, Any], path: str | Path = "checkpoint", trust_code: bool = False
):
    """The checkpoint's model with its weights. The spec is first built on the meta device (no
    memory) and its parameter names and shapes compared with the checkpoint's tensors, so a
    spec that asks for more than the file holds is refused before anything is allocated."""
    from trainkit.errors import ConfigError
    from trainkit.models import build_model

    require_code_permission(state, path, trust_code)
    spec = dict(state["model_spec"])
    try:
        with torch.device("meta"):
            skeleton = build_model(dict(spec), trust_code)
    except (ConfigError, RuntimeError) as error:
        raise TrainkitError(f"{path}: cannot build its model: {error}") from error
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    weights = state["model"]
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong = [
        f"{key} {tuple(weights[key].shape)} (model {expected[key]})"
        for key in expected
        if key in weights and tuple(weights[key].shape) != expected[key]
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {_list(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        ]
        raise TrainkitError(f"{path}: weights do not fit its {spec['name']} model; " + "; ".join(parts))
    model = build_model(spec, trust_code)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise TrainkitError(f"{path}: weights do not fit the model: {first}") from error
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
