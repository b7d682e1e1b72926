"""Engine guarantees: resume, accumulation, data-path equivalence, checkpoints, augmentation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import last_weights, load, max_weight_difference, write_config
from PIL import Image

from trainkit.callbacks import Callback, CallbackList
from trainkit.checkpoint import load_checkpoint, save_checkpoint
from trainkit.config import AugmentConfig, load_config
from trainkit.data.augment import BatchTransform, crop_and_flip, crop_codes
from trainkit.data.preprocess import Preprocess
from trainkit.models import build_model
from trainkit.runtime import unwrap_model
from trainkit.trainer import EpochTotals

ROOT = Path(__file__).resolve().parent.parent


def test_resume_continues_exactly(cli, tmp_path):
    aug = ["data.augment.crop_padding=2", "data.augment.hflip=true", "model.dropout=0.2"]
    full = cli("train", write_config(tmp_path), "train.epochs=3", "run.name=full", *aug)
    assert full.exit_code == 0, full
    part = cli("train", write_config(tmp_path), "train.epochs=2", "run.name=part", *aug)
    assert part.exit_code == 0, part
    resumed = cli("train", write_config(tmp_path), "train.epochs=3", "run.name=part", *aug, "--resume")
    assert resumed.exit_code == 0, resumed
    assert "resumed at epoch 3, batch 0, step 16" in resumed.stdout
    state = load(tmp_path / "runs" / "part" / "checkpoints" / "last.pt")
    assert state["global_step"] == 24 and state["epoch"] == 3
    reference = last_weights(tmp_path, "full")
    for key, value in state["model"].items():
        assert torch.equal(value, reference[key]), key
    assert len((tmp_path / "runs" / "part" / "metrics.csv").read_text().splitlines()) == 4
    assert not (tmp_path / "runs" / "part-2").exists()


def test_resume_with_more_epochs_rebuilds_the_schedule(cli, tmp_path):
    # onecycle's saved state is tied to its total length: loading it and stepping past the old
    # end once crashed with "Tried to step 17 times"
    config = write_config(tmp_path, {"sched": {"name": "onecycle"}})
    assert cli("train", config).exit_code == 0
    finished = cli("train", config, "--resume")
    assert finished.exit_code == 1 and "already finished 2 epochs" in finished.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        longer = cli("train", config, "train.epochs=3", "--resume")
    assert longer.exit_code == 0, longer
    # the replay steps the schedule alone; torch's "lr_scheduler.step() before optimizer.step()"
    # warning would tell the user about a mistake that is not there
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert "lr schedule is rebuilt for 3 epochs" in longer.stderr
    state = load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["global_step"] == 24
    assert state["scheduler"]["per_step"]["total_steps"] == 24


def test_resume_without_checkpoint_fails_cleanly(cli, tmp_path):
    result = cli("train", write_config(tmp_path), "--resume")
    assert result.exit_code == 1 and "nothing to resume" in result.stderr


def test_gradient_accumulation_matches_the_larger_batch(cli, tmp_path):
    # 250 images: the last window is short, and its weighting must still be exact
    # augmentation too: each sample's crop and flip follow its place in the epoch, not the batching
    common = [
        "data.synthetic.train_size=250",
        "train.epochs=2",
        "model.dropout=0.0",
        "data.augment.crop_padding=2",
        "data.augment.hflip=true",
    ]
    big = cli("train", write_config(tmp_path), *common, "data.batch_size=64", "run.name=big")
    small = cli(
        "train",
        write_config(tmp_path),
        *common,
        "data.batch_size=32",
        "train.grad_accum_steps=2",
        "run.name=small",
    )
    assert big.exit_code == 0 and small.exit_code == 0, (big, small)
    assert max_weight_difference(last_weights(tmp_path, "big"), last_weights(tmp_path, "small")) < 1e-6


def test_tensor_path_and_dataloader_path_train_identically(cli, tmp_path):
    aug = ["data.augment.crop_padding=2", "data.augment.hflip=true"]
    memory = cli("train", write_config(tmp_path), "data.cache=memory", "run.name=memory", *aug)
    loader = cli("train", write_config(tmp_path), "data.cache=none", "run.name=loader", *aug)
    assert memory.exit_code == 0 and loader.exit_code == 0, (memory, loader)
    assert "in-memory tensors" in memory.stdout and "DataLoader" in loader.stdout
    assert max_weight_difference(last_weights(tmp_path, "memory"), last_weights(tmp_path, "loader")) == 0


def _write_imagefolder(root: Path, per_class: int = 12):
    from trainkit.data.synthetic import CLASSES, make_synthetic

    for split, count in (("train", per_class * 10), ("test", 40)):
        images, labels = make_synthetic(count, split, 20, 3)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def test_imagefolder_decoded_cache(cli, tmp_path, capfd):
    root = tmp_path / "folder"
    _write_imagefolder(root)
    # hidden entries are not images: a macOS resource fork and a notebook's checkpoint folder
    (root / "train" / "circle" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "train" / "circle" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (20, 20)).save(root / "train" / "circle" / ".ipynb_checkpoints" / "0.png")
    config = write_config(tmp_path, {"data": {"name": "imagefolder", "root": str(root), "image_size": 16}})
    first = cli("train", config, "train.epochs=1")
    assert first.exit_code == 0, first
    assert "decoded 120 images" in first.stderr and "ready in" in first.stdout
    caches = list((root / ".trainkit_cache").glob("*.pt"))
    assert len(caches) == 2  # train and test
    second = cli("train", config, "train.epochs=1")
    assert second.exit_code == 0 and "decoded" not in second.stderr
    # touching the data rebuilds the cache
    victim = next((root / "train").rglob("*.png"))
    Image.new("RGB", (20, 20), (255, 0, 0)).save(victim)
    third = cli("train", config, "train.epochs=1")
    assert third.exit_code == 0 and "decoded 120 images" in third.stderr

    evaluated = cli("eval", tmp_path / "runs" / "tiny" / "checkpoints" / "best.pt", "--json")
    assert evaluated.exit_code == 0 and '"num_samples": 40' in evaluated.stdout


@pytest.mark.parametrize("cache", ["memory", "none"])  # decoded up front / checked before a DataLoader run
@pytest.mark.parametrize("val_fraction", [None, 0.25])  # test/ folder, or a split of train/
def test_imagefolder_bad_image_is_named_before_training(cli, tmp_path, cache, val_fraction):
    root = tmp_path / "folder"
    _write_imagefolder(root, per_class=3)
    if val_fraction:
        for image in (root / "test").rglob("*.png"):
            image.unlink()
        for folder in sorted((root / "test").iterdir()):
            folder.rmdir()
        (root / "test").rmdir()
    bad = root / "train" / "circle" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = root / "train" / "square" / "truncated.jpg"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:200])
    config = write_config(
        tmp_path,
        {
            "data": {
                "name": "imagefolder",
                "root": str(root),
                "image_size": 16,
                "cache": cache,
                "val_fraction": val_fraction,
            }
        },
    )
    result = cli("train", config, "train.epochs=1")
    assert result.exit_code == 1, result
    assert "broken.png" in result.stderr and "(and 1 more)" in result.stderr
    assert "skip_bad_images" in result.stderr and result.stderr.count("error:") == 1
    assert "first training step" not in result.stdout  # before any training
    skipped = cli("train", config, "train.epochs=2", "data.skip_bad_images=true")
    assert skipped.exit_code == 0, skipped
    assert (
        "skipped" in skipped.stderr and "broken.png" in skipped.stderr and "truncated.jpg" in skipped.stderr
    )
    readable = len(list((root / "train").rglob("*.*"))) - 2
    train, val = (
        int(n)
        for n in skipped.stdout.split("data: imagefolder train ")[1].split(" images")[0].split(" / val ")
    )
    assert (train + val if val_fraction else train) == readable
    again = cli("train", config, "train.epochs=1", "data.skip_bad_images=true")
    assert again.exit_code == 0 and "checking" not in again.stderr and "decoding" not in again.stderr


def test_dataparallel_checkpoint_has_no_module_prefix(tmp_path):
    model = build_model({"name": "lenet", "num_classes": 10, "in_channels": 3, "input_size": 32})
    wrapped = torch.nn.DataParallel(model)
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    assert not any(k.startswith("module.") for k in unwrap_model(wrapped).state_dict())
    # a checkpoint written by other tools with the prefix still loads
    state = {
        "format_version": 1,
        "model": wrapped.state_dict(),
        "preprocess": {"channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "classes": [f"c{i}" for i in range(10)],  # every field is validated on load
        "config": {},
        "model_spec": {"name": "lenet", "num_classes": 10, "in_channels": 3, "input_size": 32},
    }
    save_checkpoint(state, tmp_path / "dp.pt")
    loaded = load_checkpoint(tmp_path / "dp.pt")
    assert not any(k.startswith("module.") for k in loaded["model"])
    model.load_state_dict(loaded["model"])


def test_crop_and_flip_matches_a_reference():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8)
    offsets = torch.randint(0, 5, (6, 2))
    flips = torch.tensor([True, False, True, False, False, True])
    out = crop_and_flip(images, crop_codes(offsets, flips, 2), 2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        dy, dx = offsets[i].tolist()
        expected = padded[i, :, dy : dy + 8, dx : dx + 10]
        assert torch.equal(out[i], expected.flip(2) if flips[i] else expected)


def test_batch_transform_is_seeded_per_epoch_and_per_position():
    preprocess = Preprocess(3, 8, (0.5,) * 3, (0.5,) * 3)
    augment = AugmentConfig(crop_padding=2, hflip=True, brightness=0.2, contrast=0.2)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    positions = torch.arange(64)
    a, b = BatchTransform(preprocess, augment, seed=1), BatchTransform(preprocess, augment, seed=1)
    a.start_epoch(3, 64, torch.device("cpu"))
    b.start_epoch(3, 64, torch.device("cpu"))
    whole = a(images, positions)
    assert torch.equal(whole, b(images, positions))
    assert not torch.equal(whole, preprocess.normalize(images))
    # any split of the epoch (2 ranks, micro-batches, a resume point) gives each sample the same
    parts = [b(images[i::2][j : j + 8], positions[i::2][j : j + 8]) for i in (0, 1) for j in range(0, 32, 8)]
    assert torch.equal(torch.cat(parts[:4]), whole[0::2]) and torch.equal(torch.cat(parts[4:]), whole[1::2])
    b.start_epoch(4, 64, torch.device("cpu"))  # a new epoch draws anew
    assert not torch.equal(whole, b(images, positions))


def test_checkpoint_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"format_version": 1, "x": torch.ones(3)}, path)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    from trainkit.errors import TrainkitError

    with pytest.raises(TrainkitError, match="No space left"):
        save_checkpoint({"format_version": 1, "x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(config):
    from trainkit.train import check_config

    check_config(load_config(ROOT / "configs" / config))


def test_readme_documents_every_config_key():
    from pydantic import BaseModel

    from trainkit.config import Config

    readme = (ROOT / "README.md").read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from keys(annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [key for key in keys(Config) if f"`{key}`" not in readme]
    assert not missing, missing


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("pad", [0, 1, 2, 60])  # 60: the crop lies wholly in the padding
def test_crop_and_flip_matches_a_reference_for_any_pad_and_dtype(pad, dtype):
    torch.manual_seed(pad)
    images = torch.randint(0, 256, (5, 2, 9, 7)).to(dtype)
    offsets = torch.randint(0, 2 * pad + 1, (5, 2))
    offsets[0] = torch.tensor([0, 2 * pad])  # the extreme corners: first and last rows read
    offsets[-1] = torch.tensor([2 * pad, 0])
    flips = torch.tensor([True, False, True, False, True])
    out = crop_and_flip(images, crop_codes(offsets, flips, pad), pad)
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    for i in range(5):
        dy, dx = offsets[i].tolist()
        expected = padded[i, :, dy : dy + 9, dx : dx + 7]
        assert torch.equal(out[i], expected.flip(2) if flips[i] else expected)
    empty = crop_and_flip(images[:0], crop_codes(offsets[:0], flips[:0], pad), pad)  # an empty DDP share
    assert empty.shape == (0, 2, 9, 7)


def test_normalize_is_the_formula_and_leaves_its_input_alone():
    preprocess = Preprocess(3, 4, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean.double()) / std.double()
    assert torch.allclose(preprocess.normalize(images).double(), expected, atol=1e-5)
    floats = images.float() / 255
    before = floats.clone()
    with torch.inference_mode():  # constants first made here must still serve training
        preprocess.normalize(floats, value_range=1.0)
    out = preprocess.normalize(floats, value_range=1.0)
    assert torch.equal(floats, before) and not out.is_inference()
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize(
    "model_name, native_bf16, device, expected",
    [
        ("lenet", True, "cpu", ("32", True)),
        ("mlp", True, "cpu", ("bf16", False)),
        ("mlp", False, "cpu", ("32", False)),  # emulated bf16 is slower: never chosen
        ("alexnet", True, "cpu", ("32", True)),  # bf16 faster but learned slower: not chosen
        ("torchvision.resnet18", True, "cpu", ("bf16", False)),
        ("torchvision.resnet50", True, "cpu", ("32", False)),  # not measured: float32
        ("mlp", True, "cuda", ("32", False)),  # nothing measured on GPUs yet
    ],
)
def test_auto_speed_options_follow_the_measured_table(monkeypatch, model_name, native_bf16, device, expected):
    from trainkit import runtime
    from trainkit.config import TrainConfig

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    auto = TrainConfig()
    resolved, notes = runtime.resolve_speed_options(auto, model_name, torch.device(device))
    assert (resolved.precision, resolved.channels_last) == expected and notes == []
    assert auto.precision == "auto" and auto.channels_last == "auto"  # the config is not changed
    chosen = TrainConfig(precision="32", channels_last=False)  # what the user sets is kept
    assert runtime.resolve_speed_options(chosen, model_name, torch.device(device)) == (chosen, [])
    for tampered in (["bf16"], "bf16", {"precision": 16, "channels_last": "yes"}):  # from a checkpoint
        kept = runtime.resolve_speed_options(auto, model_name, torch.device(device), tampered)
        assert kept == (resolved, [])


def test_a_default_run_says_and_records_what_auto_chose(cli, tmp_path, monkeypatch):
    from trainkit import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    result = cli("train", write_config(tmp_path), "~train.precision", "train.epochs=1")
    assert result.exit_code == 0, result
    assert "bf16 autocast" in result.stdout  # the start line
    run = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert run["precision"] == "bf16" and run["channels_last"] is False
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "auto"  # the config keeps auto; run.json says what it was
    lenet = cli("train", write_config(tmp_path), "model.name=lenet", "~model.hidden_sizes", "run.name=le")
    assert lenet.exit_code == 0, lenet
    assert json.loads((tmp_path / "runs" / "le" / "run.json").read_text())["channels_last"] is True


def test_a_resume_keeps_what_auto_chose_even_where_this_machine_would_not(cli, tmp_path, monkeypatch):
    # trained where the CPU has bf16 instructions, resumed where it has not: the run goes on in
    # bf16 (as every other setting of a resumed run is kept), and says so
    from trainkit import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    first = cli("train", write_config(tmp_path), "~train.precision", "train.epochs=1")
    assert first.exit_code == 0, first
    run_dir = tmp_path / "runs" / "tiny"
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["train_options"] == {"precision": "bf16", "channels_last": False}
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    resumed = cli("train", "--resume", str(run_dir), "train.epochs=2")
    assert resumed.exit_code == 0, resumed
    assert "train.precision: auto keeps bf16 from the run being resumed (here: 32)" in resumed.stderr
    assert json.loads((run_dir / "run.json").read_text())["precision"] == "bf16"


@pytest.mark.parametrize("value", ["Auto", "2", "null", "maybe"])
def test_channels_last_takes_true_false_or_auto_and_says_so(cli, tmp_path, value):
    result = cli("config", write_config(tmp_path), f"train.channels_last={value}")
    assert result.exit_code == 2
    assert "train.channels_last: expected true, false or auto" in result.stderr


def test_epoch_totals_summed_in_chunks_match_the_per_batch_sums():
    g = torch.Generator().manual_seed(0)
    totals = EpochTotals(torch.device("cpu"))
    loss_sum, correct, seen = 0.0, 0, 0
    for step in range(1, 80):  # two whole chunks, a part, and an empty share (DDP) in between
        b = 0 if step == 40 else int(torch.randint(1, 9, (1,), generator=g))
        scores, labels = torch.randn(b, 5, generator=g), torch.randint(0, 5, (b,), generator=g)
        loss = torch.nn.functional.cross_entropy(scores, labels) if b else scores.sum() * 0.0
        totals.add(loss, scores, labels, step)
        loss_sum += float(loss) * b
        correct += int((scores.argmax(1) == labels).sum())
        seen += b
    assert totals.running_loss() == pytest.approx(loss_sum / seen)
    assert totals.summed() == pytest.approx((loss_sum, correct, seen))
    assert totals.to_dict(elapsed=1.0)["correct"] == correct
    assert totals.nonfinite is None


def test_epoch_totals_name_the_first_non_finite_loss_and_its_step():
    totals = EpochTotals(torch.device("cpu"))
    for step in range(1, 41):
        value = {7: float("inf"), 9: float("nan")}.get(step, 1.0)
        totals.add(torch.tensor(value), torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), step)
        if step == 6:
            assert totals.running_loss() == 1.0 and totals.nonfinite is None
    assert totals.nonfinite == (float("inf"), 7)  # found by the chunk's reduction, not later
    totals.summed()
    assert totals.nonfinite == (float("inf"), 7)


def test_callback_list_fires_the_handlers_in_order_and_follows_replace():
    calls = []

    class Counting(Callback):
        def on_step_end(self, trainer, step):
            calls.append("class")

    patched = Callback()
    patched.on_step_end = lambda trainer, step: calls.append("instance")
    callbacks = CallbackList([Counting(), Callback(), patched])
    callbacks.fire("step_end", None, None)
    callbacks.fire("epoch_start", None, 0)  # nobody handles it
    assert calls == ["class", "instance"]
    callbacks.replace([patched])
    callbacks.fire("step_end", None, None)
    assert calls == ["class", "instance", "instance"]
    # a handler set, or a callback added, after the event has fired is called from then on
    late = Callback()
    callbacks.callbacks.append(late)
    late.on_step_end = lambda trainer, step: calls.append("late")
    callbacks.fire("step_end", None, None)
    assert calls == ["class", "instance", "instance", "instance", "late"]
