"""Where predictions go besides the screen: a CSV or JSON-lines file, and sorted folders.

`--sort-into DIR` puts each image in DIR/<label>/. Labels come from the checkpoint and file
names from the disk, so both are made into safe single path components first, and every
entry is created relative to an open folder descriptor with O_NOFOLLOW / O_EXCL: nothing is
written through a symlink, outside DIR, or over an existing file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import unicodedata
from pathlib import Path
from typing import Any

from trainkit.errors import ConfigError, TrainkitError
from trainkit.text import printable, write_file

MAX_COMPONENT_BYTES = 200  # below NAME_MAX (255) with room for a "-N" suffix


def safe_component(name: str) -> str:
    """A label or file name → one harmless path component: no separators, no NUL or control
    characters, never '', '.' or '..', not hidden, at most MAX_COMPONENT_BYTES bytes."""
    text = unicodedata.normalize("NFC", str(name))
    text = "".join("_" if (c in "/\\\0" or not c.isprintable()) else c for c in text).strip()
    while text.startswith("."):
        text = "_" + text[1:]
    encoded = text.encode("utf-8")[:MAX_COMPONENT_BYTES]
    text = encoded.decode("utf-8", errors="ignore")
    return text or "_"


class PredictionFile:
    """--out FILE.csv | FILE.jsonl: rows gathered, written atomically once at the end."""

    def __init__(self, path: str, topk: int):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise ConfigError("--out", f"{printable(path)}: use a .csv or .jsonl file name")
        if self.path.is_dir():
            raise ConfigError("--out", f"{printable(path)} is a folder")
        if not self.path.parent.is_dir():
            raise TrainkitError(f"--out: folder {printable(self.path.parent)} does not exist")
        self.kind, self.topk, self.records = suffix[1:], topk, []

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        if self.kind == "jsonl":
            text = "".join(json.dumps(record) + "\n" for record in self.records)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            extra = [f"{kind}_{i}" for i in range(2, self.topk + 1) for kind in ("label", "prob")]
            writer.writerow(["path", "label", "index", "prob", *extra])
            for record in self.records:
                rest = [v for item in record["topk"][1:] for v in (item["label"], f"{item['prob']:.6f}")]
                writer.writerow(
                    [record["path"], record["label"], record["index"], f"{record['prob']:.6f}", *rest]
                )
            # a file name's bytes that are not UTF-8 (held as lone surrogates) as \udcNN, as
            # the screen shows them: the CSV stays valid UTF-8 for every reader (the JSON-lines
            # file keeps them exactly, as \udcNN escapes that json.loads turns back)
            text = buffer.getvalue().encode("utf-8", "backslashreplace")
        write_file(self.path, text)


class Sorter:
    """--sort-into DIR: a hard link to each image (a copy across filesystems) in DIR/<label>/."""

    def __init__(self, directory: str, copy: bool = False):
        self.root = Path(directory)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise TrainkitError(
                f"--sort-into: cannot use {printable(directory)}: {error.strerror}"
            ) from error
        self.copy = copy
        self.label_fds: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.copied = 0

    def _label_fd(self, label: str) -> int:
        component = safe_component(label)
        if component not in self.label_fds:
            try:
                os.mkdir(component, 0o777, dir_fd=self.root_fd)
            except FileExistsError:
                pass
            try:  # O_NOFOLLOW: a symlink planted as DIR/<label> is refused, not followed
                fd = os.open(component, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.root_fd)
            except OSError as error:
                where = printable(self.root / component)
                raise TrainkitError(
                    f"--sort-into: {where} is not a plain folder ({error.strerror})"
                ) from error
            self.label_fds[component] = fd
        return self.label_fds[component]

    def add(self, source: Path, label: str) -> Path:
        folder = self._label_fd(label)
        stem, suffix = os.path.splitext(safe_component(source.name))
        for n in range(1, 10_000):
            name = stem + (f"-{n}" if n > 1 else "") + suffix  # two images named alike: a.jpg, a-2.jpg
            try:
                self._place(source, folder, name)
                break
            except FileExistsError:
                continue
        else:
            raise TrainkitError(f"--sort-into: too many files named {printable(source.name)}")
        self.counts[label] = self.counts.get(label, 0) + 1
        return self.root / safe_component(label) / name

    def _place(self, source: Path, folder: int, name: str) -> None:
        if not self.copy:
            try:  # os.link fails with FileExistsError on any existing entry, symlinks included
                os.link(source, name, dst_dir_fd=folder, follow_symlinks=True)
                return
            except FileExistsError:
                raise
            except OSError:  # another filesystem, or links not allowed: copy instead
                pass
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=folder)
        with open(source, "rb") as reader, os.fdopen(fd, "wb") as writer:
            shutil.copyfileobj(reader, writer)
        self.copied += 1

    def close(self) -> None:
        for fd in self.label_fds.values():
            os.close(fd)
        os.close(self.root_fd)
        self.label_fds = {}
