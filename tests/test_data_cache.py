"""The decoded ImageFolder cache (where it goes, budget, locking, links, stale and wrong
contents, retried failures, `trainkit cache`) and the image-folder edge cases around it."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import write_config
from PIL import Image

COLORS = {"blue": (20, 40, 220), "red": (220, 30, 30)}


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own user cache directory (never the real ~/.cache)."""
    base = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    return base / "trainkit"


def make_folder(root: Path, per_class: int = 6, size=(12, 12), splits=("train",)) -> Path:
    for split in splits:
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shade = tuple(max(0, c - 9 * i) for c in color)
                Image.new("RGB", size, shade).save(folder / f"{i}.png")
    return root


def config_for(tmp_path: Path, root: Path, **data) -> Path:
    settings = {"name": "imagefolder", "root": str(root), "image_size": 8, "val_fraction": 0.25}
    settings.update(data)
    return write_config(tmp_path, {"data": settings, "train": {"epochs": 1}, "log": {"tensorboard": False}})


def images_used(result) -> int:
    found = re.search(r"train (\d+) / val (\d+) images", result.stdout)
    return int(found[1]) + int(found[2])


def cache_dir(root: Path) -> Path:
    return root / ".trainkit_cache"


# --------------------------------------------------------------------------- links


def test_planted_links_are_never_written_through(cli, tmp_path):
    """A shared dataset folder with links planted in its cache: at every guessable temp name
    and at the final cache paths. The victim stays byte-identical, the run refuses in one line."""
    root = make_folder(tmp_path / "data")
    config = config_for(tmp_path, root)
    assert cli("train", config).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    finals = sorted(cache_dir(root).glob("*.pt"))
    assert finals
    for final in finals:
        final.unlink()
        # the old predictable temp name, for this process (the CLI runs in-process)
        (final.parent / f".{final.name}.tmp-{os.getpid()}").symlink_to(victim)
    first = cli("train", config)
    assert victim.read_bytes() == b"precious\n"
    assert first.exit_code == 0, first
    for final in finals:  # the real caches were written beside the links, not through them
        assert final.is_file() and not final.is_symlink()
        final.unlink()
        final.symlink_to(victim)
    second = cli("train", config)
    assert second.exit_code == 1 and "symbolic link" in second.stderr, second
    assert victim.read_bytes() == b"precious\n"


def test_a_cache_directory_that_is_a_link_is_refused(cli, tmp_path):
    root = make_folder(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache_dir(root).symlink_to(elsewhere)
    result = cli("train", config_for(tmp_path, root))
    assert result.exit_code == 1 and ".trainkit_cache is a symbolic link" in result.stderr, result
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- contents


def test_stale_temp_files_are_removed_and_wrong_contents_rebuilt(cli, tmp_path):
    root = make_folder(tmp_path / "data")
    config = config_for(tmp_path, root)
    first = cli("train", config)
    assert first.exit_code == 0, first
    # announced: where and how big
    assert "decoded cache written: " + str(cache_dir(root)) in first.stderr
    assert "budget" in first.stderr and "trainkit cache clean" in first.stderr
    stale = cache_dir(root) / ".0123abcd.pt.tmp-4242abcd"
    stale.write_bytes(b"\0" * 1000)
    # a cache that disagrees with the file list: 3 images for 12 files
    (path,) = cache_dir(root).glob("*.pt")
    state = torch.load(path, weights_only=True)
    state["images"] = state["images"][:3].clone()
    torch.save(state, path)
    second = cli("train", config)
    assert second.exit_code == 0, second
    assert not stale.exists() and "removed 1 temp file" in second.stderr
    assert "disagrees with the file list (3 images for 12 files); rebuilding" in second.stderr
    assert "train 9 / val 3 images" in second.stdout
    assert torch.load(path, weights_only=True)["images"].shape[0] == 12


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_a_failed_read_is_retried_by_the_next_run(cli, tmp_path, cache):
    """An image that failed once and reads again later (permissions restored, file repaired
    with its old size and mtime: the same cache key) is decoded again, not failed forever."""
    root = make_folder(tmp_path / "data")
    image = root / "train" / "red" / "2.png"
    good, stamp = image.read_bytes(), image.stat()
    image.write_bytes(b"\0" * len(good))
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    config = config_for(tmp_path, root, cache=cache, skip_bad_images=cache == "memory")
    first = cli("train", config)
    if cache == "memory":
        assert first.exit_code == 0 and "skipped" in first.stderr and images_used(first) == 11, first
    else:
        assert first.exit_code == 1 and "2.png: cannot read image" in first.stderr, first
    image.write_bytes(good)
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = cli("train", config)
    assert second.exit_code == 0, second
    assert "skipped" not in second.stderr and images_used(second) == 12


def test_two_holders_of_a_cache_take_turns(tmp_path):
    from trainkit.data.cache import cache_lock

    directory = tmp_path / "cache"
    directory.mkdir()
    entered = threading.Event()

    def second():
        with cache_lock(directory):
            entered.set()

    with cache_lock(directory):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3)  # blocked while the first holds the flock
        fd = os.open(directory / ".lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    thread.join(60)
    assert entered.is_set()


# --------------------------------------------------------------------------- budget, place, CLI


def test_budget_evicts_least_recently_used_and_cache_verbs(cli, tmp_path):
    root = make_folder(tmp_path / "data")
    # the cache file of 12 images is 4.3 kB at 8 px, 3.0 kB at 6 px: room for one of them
    config = config_for(tmp_path, root, cache_max_gb=5e-6)
    assert cli("train", config).exit_code == 0
    (first,) = cache_dir(root).glob("*.pt")
    result = cli("train", config, "data.image_size=6")
    assert result.exit_code == 0, result
    assert "removed 1 least recently used" in result.stderr
    (second,) = cache_dir(root).glob("*.pt")
    assert second != first and not first.exists()
    # over the whole budget: not written, said so, the run goes on
    tiny = cli("train", config, "data.cache_max_gb=1e-7")
    assert tiny.exit_code == 0 and "not caching the decoded images" in tiny.stderr, tiny

    listed = cli("cache", "list", root)
    assert listed.exit_code == 0 and str(cache_dir(root)) in listed.stdout and "1 files" in listed.stdout
    everything = cli("cache", "list")  # without ROOT: the caches written beside datasets too
    assert everything.exit_code == 0 and str(cache_dir(root)) in everything.stdout, everything
    mine = cache_dir(root) / "notes.txt"  # not trainkit's: left alone
    mine.write_text("keep")
    cleaned = cli("cache", "clean", root)
    assert cleaned.exit_code == 0 and "freed" in cleaned.stdout, cleaned
    assert not list(cache_dir(root).glob("*.pt")) and mine.read_text() == "keep"
    assert cli("cache", "frobnicate").exit_code == 2


def test_shared_or_read_only_dataset_caches_in_the_user_cache(cli, tmp_path, user_cache):
    """The rule: beside the data only in a folder the user owns and can write; else the
    user cache directory ($XDG_CACHE_HOME/trainkit/<folder>-<digest>)."""
    root = make_folder(tmp_path / "shared")
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)  # someone else's folder (root can write anywhere)
    else:
        root.chmod(0o555)
    try:
        result = cli("train", config_for(tmp_path, root))
    finally:
        root.chmod(0o755)
    assert result.exit_code == 0, result
    assert not cache_dir(root).exists()
    (place,) = user_cache.iterdir()
    assert place.name.startswith("shared-") and list(place.glob("*.pt"))
    assert (place / "root.txt").read_text().strip() == str(root.resolve())
    assert str(place) in result.stderr
    listed = cli("cache", "list")
    assert str(place) in listed.stdout and str(root.resolve()) in listed.stdout
    assert cli("cache", "clean").exit_code == 0 and not place.exists()


# --------------------------------------------------------------------------- folders


def test_image_folder_oddities_are_named(cli, tmp_path):
    root = make_folder(tmp_path / "data")
    config = config_for(tmp_path, root)
    (root / "train" / "green").mkdir()
    empty = cli("train", config)
    assert empty.exit_code == 1 and "without images" in empty.stderr and "green" in empty.stderr, empty
    (root / "train" / "green").rmdir()

    (root / "train" / "red" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    dangling = cli("train", config)
    assert dangling.exit_code == 0 and "broken symbolic link" in dangling.stderr
    assert "gone.png" in dangling.stderr
    (root / "train" / "red" / "gone.png").unlink()

    shutil.rmtree(root / "train" / "red")
    one = cli("train", config)
    assert one.exit_code == 1 and "only one class (blue)" in one.stderr, one


def test_image_size_is_required_when_sizes_differ(cli, tmp_path):
    root = make_folder(tmp_path / "data", size=(40, 30))
    Image.new("RGB", (10000, 1)).save(root / "train" / "blue" / "0000-odd.png")
    result = cli("train", config_for(tmp_path, root, image_size=None))
    assert result.exit_code == 2, result
    assert "data.image_size: the images have different sizes (40x30 (12), 10000x1 (1)" in result.stderr
    assert "e.g. data.image_size=30" in result.stderr and not (tmp_path / "runs").exists()


def test_memory_cache_over_budget_is_refused_before_allocating(cli, tmp_path):
    root = make_folder(tmp_path / "data")
    result = cli("train", config_for(tmp_path, root, cache="memory", image_size=4096, cache_memory_gb=0.1))
    assert result.exit_code == 2 and "data.cache: memory needs 0.6 GB" in result.stderr, result


def test_class_folders_without_train_folder(cli, tmp_path):
    flat = tmp_path / "flat"
    make_folder(tmp_path / "tmp")
    shutil.move(tmp_path / "tmp" / "train", flat)
    result = cli("train", config_for(tmp_path, flat))
    assert result.exit_code == 0, result
    assert "no train/ under" in result.stderr and "train 9 / val 3" in result.stdout
    (tmp_path / "nothing" / "misc").mkdir(parents=True)
    missing = cli("train", config_for(tmp_path, tmp_path / "nothing"))
    assert missing.exit_code == 1 and "holds folders misc" in missing.stderr, missing


def test_eval_finds_its_data_from_anywhere_and_needs_only_its_split(cli, tmp_path, monkeypatch):
    make_folder(tmp_path / "data", splits=("train", "val"))
    config = config_for(tmp_path, Path("data"), val_fraction=None)  # relative, as typed
    trained = cli("train", config)
    assert trained.exit_code == 0, trained
    best = tmp_path / "runs" / "tiny" / "checkpoints" / "best.pt"
    saved = torch.load(best, weights_only=True)["config"]["data"]["root"]
    assert saved == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("eval", best, "--split", "val")
    assert result.exit_code == 0 and "(12 images)" in result.stdout, result
    assert "top-5" not in result.stdout  # two classes: top-5 is always 100 %
    # a checkpoint never chooses where eval writes: its data.cache_dir is not created
    chosen = tmp_path / "chosen-by-the-checkpoint"
    state = torch.load(best, weights_only=True)
    state["config"]["data"]["cache_dir"] = str(chosen)
    planted = tmp_path / "planted.pt"
    torch.save(state, planted)
    assert cli("eval", planted, "--split", "val").exit_code == 0 and not chosen.exists()
    only_val = tmp_path / "only-val"
    shutil.copytree(tmp_path / "data" / "val", only_val / "val")
    moved = cli("eval", best, "--split", "val", f"data.root={only_val}", "--json")
    assert moved.exit_code == 0 and '"num_samples": 12' in moved.stdout, moved


def test_ready_in_counts_both_splits_decoding(cli, tmp_path, monkeypatch):
    """The data line's "ready in" is the whole wait before the first step: the val split's
    decoding too (the second decoding pass, val's, is made to take at least 1.5 s here)."""
    import time

    from trainkit.data import cache

    real, calls = cache.decode_all, []

    def slow_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "decode_all", slow_second)
    root = make_folder(tmp_path / "data", splits=("train", "val"))
    result = cli("train", config_for(tmp_path, root, val_fraction=None, cache="memory"))
    assert result.exit_code == 0, result
    assert result.stderr.count("decoded 12 images") == 2
    seconds = float(re.search(r"ready in ([\d.]+) s", result.stdout)[1])
    assert seconds >= 1.5, result


def test_large_uniform_photos_need_image_size(cli, tmp_path):
    root = make_folder(tmp_path / "data", per_class=2, size=(640, 600))
    result = cli("train", config_for(tmp_path, root, image_size=None))
    assert result.exit_code == 2 and "the images are 640x600; set the training size" in result.stderr


def test_reduced_jpeg_decoding_matches_a_full_decode(tmp_path):
    """Large photos are decoded at 1/2..1/8 scale (JPEG draft) or box-reduced: the result
    differs from a full decode + antialiased resize by less than 2 levels on average."""
    import numpy as np

    from trainkit.data.preprocess import decode_image, pil_to_uint8, resize

    y, x = np.mgrid[0:1200, 0:1600].astype(np.float32)
    waves = [np.sin(x / 97), np.cos(y / 131), np.sin((x + y) / 173)]
    pixels = np.stack([128 + 100 * wave for wave in waves], -1).astype(np.uint8)
    for name in ("big.jpg", "big.png"):
        Image.fromarray(pixels).save(tmp_path / name, quality=92)
        with Image.open(tmp_path / name) as image:
            image.load()
            full = resize(pil_to_uint8(image, 3), 64)
        reduced = decode_image(tmp_path / name, 3, 64)
        assert reduced.shape == full.shape == (3, 64, 64)
        assert (reduced.float() - full.float()).abs().mean() < 2.0, name
