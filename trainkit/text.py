"""Showing untrusted text (file names, class names) safely, JSON without NaN, and writing
artefact files.

Class names come from folder names or checkpoints and file names from the disk: printed raw,
a name can carry terminal escape sequences, newlines that forge extra output lines, rich
markup, or matplotlib math (`$...$`). Everything shown passes through `printable` first.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

MAX_SHOWN = 200  # characters of one shown name


def printable(text: object, limit: int | None = MAX_SHOWN) -> str:
    """Control and other non-printable characters as visible escapes (`\\x1b`, `\\n`,
    `\\u202e`); a name longer than `limit` (None: no limit) is cut with an ellipsis."""
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
    return shown if limit is None or len(shown) <= limit else shown[: limit - 1] + "…"


def escape(text: object) -> str:
    """`printable` without a length limit: for output that is data (predict's lines, error
    messages), where a cut name could be mistaken for another."""
    return printable(text, None)


def finite_or_none(value: Any) -> Any:
    """NaN and ±inf become None (JSON null), recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def to_json(value: Any, **options: Any) -> str:
    """Strict JSON: a non-finite number is null, never the invalid `NaN`."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)


def size_text(nbytes: float) -> str:
    """A byte count for people: `1.2 GB`, `4.3 kB`, `512 B` (decimal units, as disks are sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def plot_text(text: object, limit: int = 40) -> str:
    """A name for a matplotlib label: printable, short, and `$` escaped (no mathtext)."""
    return printable(text, limit).replace("$", r"\$")


def write_file(path: Path, data: bytes | str) -> None:
    """Write atomically through the one file writer (`checkpoint.atomic_write`): an unguessable
    temp name created exclusively beside `path`, fsync, os.replace; a symbolic link at `path`
    or as its folder is refused, never written through."""
    from trainkit.checkpoint import atomic_write

    payload = data.encode("utf-8") if isinstance(data, str) else data
    refuse_links_on_the_way(Path(path).parent)
    atomic_write(Path(path), lambda handle: handle.write(payload))


def refuse_links_on_the_way(path: Path) -> None:
    """Refuse a folder path that passes through a symbolic link someone else planted: with
    `--save /shared/link/sub`, `sub` would be created inside the link's target. Links owned by
    the user or by root (a `runs -> /mnt/big/runs` of one's own, macOS /tmp -> /private/tmp)
    are followed; a link owned by another user is refused before anything is created."""
    from trainkit.errors import TrainkitError

    current = Path(path).absolute()
    for part in [*reversed(current.parents), current]:
        try:
            info = os.lstat(part)
        except FileNotFoundError:
            return  # the rest does not exist yet: trainkit creates it
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in (0, os.getuid()):
            raise TrainkitError(
                f"{printable(str(part))} is a symbolic link of another user; refusing to write through it"
            )


def output_dir(path: str | Path) -> Path:
    """Create a folder for artefacts (parents too), never through a symbolic link; one-line
    error when that is impossible."""
    from trainkit.errors import TrainkitError

    path = Path(path)
    refuse_links_on_the_way(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainkitError(f"cannot create {path}: {error.strerror or error}") from error
    if not path.is_dir():
        raise TrainkitError(f"{path}: not a folder")
    return path
