"""`trainkit inspect`: counts, sizes and modes, unreadable files, duplicates across and within
splits (leakage), the suggested size, --json / --strict / --save, and the findings cache."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from conftest import write_config
from PIL import Image


def _png(path, seed: int, size=(12, 10), mode="RGB") -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def _tree(root):
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for name in ("ant", "bee\x1b[2J"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _png(folder / f"{i}.png", hash((split, name, i)) % 100_000)
    shutil.copy(root / "train" / "ant" / "0.png", root / "test" / "ant" / "copy.png")  # leakage
    _png(root / "train" / "ant" / "again.png", hash(("train", "ant", 1)) % 100_000)  # same pixels as 1.png
    _png(root / "train" / "ant" / "gray.png", 7, size=(40, 30), mode="L")
    (root / "train" / "ant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_inspect_finds_leakage_duplicates_and_broken_files(cli, tmp_path):
    data = tmp_path / "data"
    _tree(data)
    result = cli("inspect", data)
    assert result.exit_code == 0, result
    out = result.stdout
    assert "24 images, 2 classes" in out
    assert "exact duplicates across splits (leakage): 1 groups, 2 images" in out
    assert "exact duplicates within a split: 1 groups, 2 images" in out
    assert "unreadable files: 1" in out and "broken.png: cannot read image" in out
    assert "\x1b" not in out and "bee\\x1b[2J" in out
    assert "LEAKAGE" in out and "suggested data.image_size: 10" in out  # median short side 10 px

    strict = cli("inspect", data, "--strict", "--json", "--save", tmp_path / "look")
    assert strict.exit_code == 1
    report = json.loads(strict.stdout)
    assert report["decoded_now"] == 0  # the first run's findings were cached
    assert report["splits"]["train"]["class_counts"] == {"ant": 9, "bee\x1b[2J": 6}
    assert report["modes"] == {"RGB": 22, "L": 1} and report["channels"] == 3
    assert report["sizes"]["most_common"][0] == {"width": 12, "height": 10, "images": 22}
    assert report["tensor_bytes"] == 23 * 3 * 10 * 10
    group = report["duplicates_across_splits"]["examples"][0]
    assert {g["split"] for g in group} == {"train", "test"}
    assert (tmp_path / "look" / "samples.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "look" / "inspect.json").read_text())["leakage"] is True

    os.remove(data / "test" / "ant" / "copy.png")
    os.remove(data / "train" / "ant" / "broken.png")
    _png(data / "train" / "ant" / "gray.png", 8, size=(40, 30), mode="L")  # changed: looked at again
    os.utime(data / "train" / "ant" / "gray.png", ns=(1, 1))
    clean = cli("inspect", data, "--strict", "--json")
    assert clean.exit_code == 0, clean
    assert json.loads(clean.stdout)["decoded_now"] == 1


def test_inspect_a_config_of_a_builtin_dataset(cli, tmp_path):
    result = cli("inspect", write_config(tmp_path), "--json")
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    assert report["source"] == "synthetic" and report["images"] == 256 + 128
    assert report["leakage"] is False and report["sizes"]["most_common"][0]["width"] == 16
    missing = cli("inspect", tmp_path / "nothing")
    assert missing.exit_code == 1 and "no such file or folder" in missing.stderr
