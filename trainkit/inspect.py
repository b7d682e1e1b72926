"""`trainkit inspect DATA_CONFIG_OR_FOLDER`: look at the data before training on it.

Class counts and imbalance, image sizes and modes, unreadable files, exact duplicates (by a
hash of the decoded pixels) across train/val/test — leakage that inflates accuracy — and within
a split, a suggested image_size with the memory the tensor path would need, and a grid of
samples per class (--save DIR).

Each image is decoded once; its findings (pixel hash, size, mode, error) are cached beside
the decoded-tensor caches under the file's (size, mtime), so a second run only lists the
folders and reads the cache, and a changed file is looked at again.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from trainkit.errors import TrainkitError
from trainkit.text import output_dir, printable, size_text, write_file

INSPECT_CACHE_FORMAT = 1
SPLIT_NAMES = ("train", "val", "test")
STANDARD_SIZES = (28, 32, 48, 64, 96, 128, 160, 192, 224)
SHOWN = 5  # examples listed per finding
GRID_PER_CLASS = 8
GRID_MAX_CLASSES = 40


# --------------------------------------------------------------------------- one file


def examine(path: str) -> tuple[str, int, int, str, str]:
    """→ (pixel hash, width, height, mode, error or ''), decoding the whole image once."""
    from PIL import Image

    from trainkit.data.preprocess import image_error_reason, open_image

    try:
        with open_image(path) as image:
            image.seek(0)  # animated: the first frame, as training reads it
            image.load()
            digest = hashlib.blake2b(digest_size=16)
            digest.update(f"{image.mode} {image.size}\n".encode())
            digest.update(image.tobytes())
            return digest.hexdigest(), image.size[0], image.size[1], image.mode, ""
    except TrainkitError as error:
        return "", 0, 0, "", str(error)
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as error:
        reason = image_error_reason(error)
        return "", 0, 0, "", f"{path}: cannot read image ({reason})"


def _examine_many(paths: list[str]) -> list[tuple[str, int, int, str, str]]:
    return [examine(path) for path in paths]


# --------------------------------------------------------------------------- gathering


def _folder_splits(root: Path) -> dict[str, dict[str, list[tuple[str, int, int]]]]:
    """{split: {class: [(path, size, mtime_ns)]}} for root/<split>/<class>/… or root/<class>/…"""
    from trainkit.data.datasets import class_folders
    from trainkit.data.preprocess import image_files

    def classes_of(folder: Path) -> dict[str, list[tuple[str, int, int]]]:
        return {name: image_files(str(folder / name)) for name in class_folders(folder)}

    present = [name for name in SPLIT_NAMES if (root / name).is_dir()]
    if present:
        return {name: classes_of(root / name) for name in present}
    return {"all": classes_of(root)}


def _cache_path(root: Path) -> Path:
    from trainkit.data.cache import CacheSettings, cache_directory

    directory = cache_directory(CacheSettings(str(root), None, 0, False))
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return directory / f"inspect-{key}.json"


def _load_cache(path: Path) -> dict[str, list]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") == INSPECT_CACHE_FORMAT and isinstance(state.get("files"), dict):
            return state["files"]
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged: looked at again, never trusted
    return {}


def _examine_all(files: list[tuple[str, int, int]], root: Path, workers: int) -> tuple[dict[str, tuple], int]:
    """{path: (hash, w, h, mode, error)} for every file, from the cache where (size, mtime)
    match → (findings, number of files decoded now)."""
    cache_file = _cache_path(root)
    cached = _load_cache(cache_file)
    found: dict[str, tuple] = {}
    todo = []
    for path, size, mtime in files:
        entry = cached.get(path)
        if entry and entry[0] == size and entry[1] == mtime:
            found[path] = tuple(entry[2:])
        else:
            todo.append(path)
    if todo:
        from trainkit.reporting import note

        note(f"inspect: decoding {len(todo)} images (cached for the next run)…")
        chunks = [todo[i : i + 512] for i in range(0, len(todo), 512)]
        if workers > 1 and len(todo) > 2000:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = [r for chunk in pool.map(_examine_many, chunks) for r in chunk]
        else:
            results = [r for chunk in chunks for r in _examine_many(chunk)]
        found.update(zip(todo, results))
        stamps = {path: (size, mtime) for path, size, mtime in files}
        state = {
            "format": INSPECT_CACHE_FORMAT,
            "files": {path: [*stamps[path], *found[path]] for path in stamps},
        }
        try:
            output_dir(cache_file.parent)
            write_file(cache_file, json.dumps(state, separators=(",", ":")))
        except (OSError, TrainkitError):
            pass  # read-only everywhere: the next run decodes again
    return found, len(todo)


def _array_records(config) -> tuple[dict[str, dict[str, list]], dict[str, tuple], Any]:
    """Built-in datasets (synthetic, torchvision arrays): the same records from the tensors."""
    from trainkit.data.datasets import build_splits

    data = config.data.model_copy(update={"image_size": None, "channels": None})
    splits = build_splits(data, config.run.seed)
    parts, seen = {}, []
    for name in SPLIT_NAMES:
        part = splits.get(name)
        if any(part is other for other in seen):
            continue  # val is test (or a share of train) for this dataset: not a split of its own
        seen.append(part)
        parts[name] = part
    layout: dict[str, dict[str, list]] = {}
    findings: dict[str, tuple] = {}
    pixels = {}
    for name, part in parts.items():
        images, labels = part.tensors()
        mode = "L" if images.shape[1] == 1 else "RGB"
        layout[name] = {c: [] for c in splits.classes}
        for index in range(images.shape[0]):
            key = f"{name}#{index}"
            array = images[index]
            digest = hashlib.blake2b(array.numpy().tobytes(), digest_size=16).hexdigest()
            findings[key] = (digest, array.shape[-1], array.shape[-2], mode, "")
            layout[name][splits.classes[int(labels[index])]].append((key, 0, 0))
            pixels[key] = array
    return layout, findings, pixels


# --------------------------------------------------------------------------- the report


def suggest_size(sides: list[int]) -> int:
    """The largest standard size not above the median short side (224 at most): no upscaling
    for most images, and the size pretrained torchvision models expect at the top; images
    smaller than 28 px keep their own size."""
    if not sides:
        return 32
    median = statistics.median(sides)
    fitting = [s for s in STANDARD_SIZES if s <= median]
    return fitting[-1] if fitting else max(1, int(median))  # tiny images: their own size


def _resolve_target(target: str) -> tuple[Path | None, str, Any]:
    """A folder or a config → (image root or None for array datasets, source name, config or None)."""
    path = Path(target)
    if path.is_dir():
        return path, "folder", None
    if not path.is_file():
        raise TrainkitError(f"{printable(target)}: no such file or folder")
    from trainkit.config import load_config

    config = load_config(path)
    if config.data.name != "imagefolder":
        return None, config.data.name, config
    root = Path(config.data.root)
    if not root.is_dir():
        raise TrainkitError(f"data.root {printable(root)}: no such folder")
    return root, "imagefolder", config


def _split_summary(classes: dict[str, list]) -> dict[str, Any]:
    counts = {name: len(items) for name, items in classes.items()}
    nonzero = [n for n in counts.values() if n]
    return {
        "images": sum(counts.values()),
        "class_counts": counts,
        "imbalance": (max(nonzero) / min(nonzero)) if nonzero else None,
        "empty_classes": [name for name, n in counts.items() if n == 0],
    }


def _duplicate_groups(by_hash: dict[str, list[tuple[str, str, str]]]) -> tuple[list, list, list]:
    """→ (groups spanning splits, groups inside one split, groups whose copies disagree on the class)."""
    across, within, conflicting = [], [], []
    for members in by_hash.values():
        if len(members) < 2:
            continue
        group = [{"split": s, "class": c, "path": p} for s, c, p in members]
        if len({s for s, _, _ in members}) > 1:
            across.append(group)
        else:
            within.append(group)
        if len({c for _, c, _ in members}) > 1:
            conflicting.append(group)
    return across, within, conflicting


def _tally(layout: dict, findings: dict, splits: dict[str, Any]) -> tuple:
    """Fills `splits` with each split's counts → (sizes, modes, short sides, corrupt, by_hash, total)."""
    sizes: Counter = Counter()
    modes: Counter = Counter()
    short_sides: list[int] = []
    corrupt = []
    by_hash: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # hash → [(split, class, path)]
    total = 0
    for split, classes in layout.items():
        splits[split] = _split_summary(classes)
        for name, items in classes.items():
            for file, _, _ in items:
                digest, width, height, mode, error = findings[file]
                total += 1
                if error:
                    corrupt.append({"split": split, "class": name, "path": file, "error": error})
                    continue
                sizes[(width, height)] += 1
                modes[mode] += 1
                short_sides.append(min(width, height))
                by_hash[digest].append((split, name, file))
    return sizes, modes, short_sides, corrupt, by_hash, total


def inspect_data(target: str, workers: int | None = None) -> tuple[dict[str, Any], Any]:
    """→ (the report as plain data, a loader of sample pixels for the grid)."""
    workers = workers or min(8, os.cpu_count() or 1)
    root, source, config = _resolve_target(target)
    pixels = None
    decoded_now = 0
    if root is not None:
        layout = _folder_splits(root)
        files = [f for classes in layout.values() for items in classes.values() for f in items]
        if not files:
            raise TrainkitError(f"{printable(root)}: no images found (expected <split>/<class>/<image>)")
        findings, decoded_now = _examine_all(files, root, workers)
    else:
        layout, findings, pixels = _array_records(config)

    report: dict[str, Any] = {"source": source, "root": str(root) if root else None, "splits": {}}
    report["classes"] = sorted({c for classes in layout.values() for c in classes})
    sizes, modes, short_sides, corrupt, by_hash, total = _tally(layout, findings, report["splits"])
    across, within, conflicting = _duplicate_groups(by_hash)
    widths = [w for (w, _), n in sizes.items() for _ in range(n)]
    heights = [h for (_, h), n in sizes.items() for _ in range(n)]
    channels = 1 if modes and all(m in ("1", "L", "LA", "I", "I;16", "F") for m in modes) else 3
    size = suggest_size(short_sides)
    readable = total - len(corrupt)
    report.update(
        images=total,
        decoded_now=decoded_now,
        sizes={
            "most_common": [{"width": w, "height": h, "images": n} for (w, h), n in sizes.most_common(SHOWN)],
            "width": _spread(widths),
            "height": _spread(heights),
            "distinct": len(sizes),
        },
        modes=dict(modes.most_common()),
        corrupt=corrupt,
        duplicates_across_splits=_group_summary(across),
        duplicates_within_split=_group_summary(within),
        duplicates_with_different_labels={"groups": len(conflicting), "examples": conflicting[:SHOWN]},
        suggested_image_size=size,
        channels=channels,
        tensor_bytes=readable * channels * size * size,
    )
    report["leakage"] = bool(across)
    return report, (layout, findings, pixels)


def _group_summary(groups: list[list[dict]]) -> dict[str, Any]:
    return {"groups": len(groups), "images": sum(len(g) for g in groups), "examples": groups[:SHOWN]}


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _samples_png(report: dict, gathered) -> bytes:
    import torch

    from trainkit.data.preprocess import decode_image
    from trainkit.plots import class_grid_png

    layout, findings, pixels = gathered
    split = "train" if "train" in layout else next(iter(layout))
    side = min(report["suggested_image_size"], 64)
    rows = []
    for name in sorted(layout[split])[:GRID_MAX_CLASSES]:
        images = []
        for file, _, _ in layout[split][name]:
            if len(images) >= GRID_PER_CLASS:
                break
            if findings[file][4]:
                continue
            if pixels is not None:
                image = pixels[file]
                image = image.expand(3, *image.shape[1:]) if image.shape[0] == 1 else image
                images.append(image)
            else:
                try:
                    images.append(decode_image(file, 3, side))
                except TrainkitError:
                    continue
        rows.append((name, [torch.as_tensor(i) for i in images]))
    return class_grid_png(rows, GRID_PER_CLASS)


# --------------------------------------------------------------------------- output


def run_inspect(target: str, as_json: bool, strict: bool, save: str | None, workers: int | None) -> int:
    report, gathered = inspect_data(target, workers)
    if save:
        folder = output_dir(save)
        write_file(folder / "inspect.json", json.dumps(report, indent=1) + "\n")
        write_file(folder / "samples.png", _samples_png(report, gathered))
        report["saved"] = [str(folder / "inspect.json"), str(folder / "samples.png")]
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report)
    if strict and (report["leakage"] or report["corrupt"]):
        return 1
    return 0


def print_report(report: dict[str, Any]) -> None:
    say = print
    where = printable(report["root"]) if report["root"] else report["source"]
    say(f"{where}: {report['images']} images, {len(report['classes'])} classes")
    for split, info in report["splits"].items():
        counts = info["class_counts"]
        ordered = sorted(counts.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{printable(c, 30)} {n}" for c, n in ordered[:8])
        more = f", … {len(ordered) - 8} more" if len(ordered) > 8 else ""
        imbalance = f"{info['imbalance']:.1f}x" if info["imbalance"] else "–"
        say(f"  {split}: {info['images']} images; largest/smallest class {imbalance}; {shown}{more}")
        if info["empty_classes"]:
            say(f"    empty classes: {', '.join(printable(c, 30) for c in info['empty_classes'][:SHOWN])}")
    sizes = report["sizes"]
    if sizes["width"]:
        common = ", ".join(f"{s['width']}x{s['height']} ({s['images']})" for s in sizes["most_common"])
        say(
            f"sizes: {sizes['distinct']} distinct; most common {common}; width {sizes['width']['min']}–"
            f"{sizes['width']['max']} (median {sizes['width']['median']:g}), height {sizes['height']['min']}–"
            f"{sizes['height']['max']} (median {sizes['height']['median']:g})"
        )
    say("modes: " + ", ".join(f"{printable(m, 10)} {n}" for m, n in report["modes"].items()))
    corrupt = report["corrupt"]
    say(f"unreadable files: {len(corrupt)}")
    for item in corrupt[:SHOWN]:
        say(f"  {printable(item['error'], 300)}")
    for key, title in (
        ("duplicates_across_splits", "exact duplicates across splits (leakage)"),
        ("duplicates_within_split", "exact duplicates within a split"),
    ):
        info = report[key]
        say(f"{title}: {info['groups']} groups, {info['images']} images")
        for group in info["examples"]:
            say(
                "  "
                + "  =  ".join(
                    f"{g['split']}/{printable(g['class'], 30)}: {printable(g['path'])}" for g in group[:4]
                )
            )
    conflicting = report["duplicates_with_different_labels"]
    if conflicting["groups"]:
        say(f"identical images with different labels: {conflicting['groups']} groups")
    size, channels = report["suggested_image_size"], report["channels"]
    say(
        f"suggested data.image_size: {size} (median short side); tensor path: "
        f"{size_text(report['tensor_bytes'])} as uint8 {channels}x{size}x{size} "
        "(data.cache_memory_gb is 4 by default)"
    )
    if report.get("saved"):
        say("wrote " + ", ".join(report["saved"]))
    if report["leakage"]:
        say("LEAKAGE: the same images are in more than one split; test accuracy will be inflated")
