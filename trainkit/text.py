"""Showing untrusted text (file names, class names) safely, and writing artefact files.

Class names come from folder names or checkpoints and file names from the disk: printed raw,
a name can carry terminal escape sequences, newlines that forge extra output lines, rich
markup, or matplotlib math (`$...$`). Everything shown passes through `printable` first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MAX_SHOWN = 200  # characters of one shown name


def printable(text: object, limit: int = MAX_SHOWN) -> str:
    """Control and other non-printable characters as visible escapes (`\\x1b`, `\\n`,
    `\\u202e`); a name longer than `limit` is cut with an ellipsis."""
    text = str(text)
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def plot_text(text: object, limit: int = 40) -> str:
    """A name for a matplotlib label: printable, short, and `$` escaped (no mathtext)."""
    return printable(text, limit).replace("$", r"\$")


def write_file(path: Path, data: bytes | str) -> None:
    """Write atomically: an unpredictable temp name in the same folder, fsync, os.replace.
    A symlink at `path` is replaced, never written through."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 → what open() would have given
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_dir(path: str | Path) -> Path:
    """Create a folder for artefacts (parents too); one-line error when that is impossible."""
    from trainkit.errors import TrainkitError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainkitError(f"cannot create {path}: {error.strerror or error}") from None
    if not path.is_dir():
        raise TrainkitError(f"{path}: not a folder")
    return path
