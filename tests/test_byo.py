"""Bring your own: pretrained weights, model.init, fine-tuning controls, your own model class,
CSV-labelled data, resize modes, and the PyTorch tutorial's plain .pth files."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from conftest import last_weights, load, write_config
from PIL import Image
from torch import nn

from trainkit.data.preprocess import Preprocess, fit_image

# ----------------------------------------------------------------------------- §1 pretrained

PRETRAINED_FILE = "mobilenet_v3_small-047dcff4.pth"  # torchvision's name for IMAGENET1K_V1
PRETRAINED = {
    "data": {"image_size": 16, "batch_size": 16, "synthetic": {"train_size": 16, "test_size": 16}},
    "model": {"name": "torchvision.mobilenet_v3_small", "weights": "DEFAULT", "hidden_sizes": None},
    "train": {"epochs": 1},
    "log": {"tensorboard": False},
}


def _config(tmp_path, overrides):
    """write_config, dropping keys set to None (TINY's mlp-only options)."""
    path = write_config(tmp_path, overrides)
    import yaml

    def prune(node):
        return {k: prune(v) if isinstance(v, dict) else v for k, v in node.items() if v is not None}

    path.write_text(yaml.safe_dump(prune(yaml.safe_load(path.read_text()))))
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def offline(url, *args, **kwargs):  # no test may reach the network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home / "hub" / "checkpoints"


def _fake_pretrained(directory):
    import torchvision

    torch.manual_seed(1234)
    state = torchvision.models.mobilenet_v3_small().state_dict()  # the right architecture, 1000 classes
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / PRETRAINED_FILE)
    return state


def test_pretrained_weights_load_from_the_hub_cache_with_a_new_head(cli, tmp_path, torch_home):
    source = _fake_pretrained(torch_home)
    result = cli(
        "train", _config(tmp_path, {**PRETRAINED, "model": {**PRETRAINED["model"], "freeze": "backbone"}})
    )
    assert result.exit_code == 0, result
    assert "weights MobileNet_V3_Small_Weights.IMAGENET1K_V1: loaded" in result.stdout
    assert "new head (10 classes): classifier.3.weight, classifier.3.bias" in result.stdout
    state = load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    weights = state["model"]
    assert weights["classifier.3.weight"].shape == (10, 1024)
    import torchvision

    names = [n for n, _ in torchvision.models.mobilenet_v3_small(num_classes=10).named_parameters()]
    backbone = [n for n in names if not n.startswith("classifier.3.")]
    assert all(torch.equal(weights[n], source[n]) for n in backbone)  # frozen: still the file's
    # the weights' own preprocessing (ImageNet mean/std, shorter side + centre crop)
    assert state["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert state["preprocess"]["resize"] == "crop"


def test_pretrained_weights_offline_corrupt_and_wrong_files_are_one_line(cli, tmp_path, torch_home):
    config = _config(tmp_path, PRETRAINED)
    result = cli("train", config)
    assert result.exit_code == 1, result
    line = result.stderr.strip()
    assert "\n" not in line and PRETRAINED_FILE in line and str(torch_home) in line
    assert f"https://download.pytorch.org/models/{PRETRAINED_FILE}" in line

    torch_home.mkdir(parents=True, exist_ok=True)  # the download attempt made it
    (torch_home / PRETRAINED_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    result = cli("train", config)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result
    assert "corrupt" in result.stderr and "delete it" in result.stderr

    torch.save(nn.Linear(3, 4).state_dict(), torch_home / PRETRAINED_FILE)  # some other network
    result = cli("train", config)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result
    assert "does not fit" in result.stderr and "missing" in result.stderr
    assert not (tmp_path / "runs").exists()

    result = cli("train", config, "model.weights=IMAGENET9K")
    assert result.exit_code == 2 and "IMAGENET1K_V1" in result.stderr, result


# ----------------------------------------------------------------------------- §2 model.init


def test_init_from_a_checkpoint_a_prefixed_state_dict_and_safetensors(cli, tmp_path):
    from safetensors.torch import save_file

    small = {"data": {"synthetic": {"train_size": 64, "test_size": 32}}, "log": {"tensorboard": False}}
    first = cli("train", write_config(tmp_path, {**small, "train": {"epochs": 1}}))
    assert first.exit_code == 0, first
    source = last_weights(tmp_path)
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in source.items()}, tmp_path / "ddp.pth")
    save_file(dict(source), str(tmp_path / "w.safetensors"))
    for index, path in enumerate([checkpoint, tmp_path / "ddp.pth", tmp_path / "w.safetensors"]):
        name = f"init{index}"
        frozen = {"model": {"init": str(path), "freeze": "net.1."}, "run": {"name": name}}  # one prefix
        result = cli("train", write_config(tmp_path, {**small, **frozen, "train": {"epochs": 1}}))
        assert result.exit_code == 0, result
        assert f"init {path.name}: loaded 4" in result.stdout
        assert torch.equal(last_weights(tmp_path, name)["net.1.weight"], source["net.1.weight"])

    # another number of classes: the head is new, the rest loaded
    result = cli(
        "train",
        write_config(tmp_path, {"model": {"init": str(checkpoint), "num_classes": 12}}),
        "train.epochs=1",
    )
    assert result.exit_code == 0, result
    assert "loaded 2; new head (12 classes): net.3.weight, net.3.bias" in result.stdout


def test_init_strict_reports_missing_unexpected_and_mismatched(cli, tmp_path):
    state = {
        "net.1.weight": torch.zeros(32, 768),
        "net.1.bias": torch.zeros(32),
        "net.3.weight": torch.zeros(10, 31),  # the head's shape, but not another number of classes
        "extra.weight": torch.zeros(1),
    }
    torch.save(state, tmp_path / "odd.pt")
    config = write_config(tmp_path, {"model": {"init": str(tmp_path / "odd.pt")}, "train": {"epochs": 1}})
    result = cli("train", config)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result
    for words in (
        "loaded 2",
        "1 missing (net.3.bias)",
        "1 unexpected (extra.weight)",
        "1 mismatched (net.3.weight",
    ):
        assert words in result.stderr, result
    assert "model.init_strict=false" in result.stderr
    relaxed = cli("train", config, "model.init_strict=false")
    assert relaxed.exit_code == 0, relaxed
    assert "loaded 2, 1 missing" in relaxed.stdout


# ----------------------------------------------------------------------------- §3 fine-tuning

FINETUNE = {  # 4 steps per epoch
    "data": {"batch_size": 16, "synthetic": {"train_size": 64, "test_size": 32}},
    "model": {"freeze": ["net.1."]},
    "optim": {"head_lr": 0.2, "no_decay_norm_and_bias": True, "weight_decay": 0.01},
    "train": {"epochs": 3, "unfreeze_epoch": 2},
    "log": {"tensorboard": False},
}


def test_freeze_holds_until_unfreeze_and_groups_get_their_settings(cli, tmp_path):
    from trainkit.models import build_model
    from trainkit.optim import parameter_groups

    result = cli("train", write_config(tmp_path, FINETUNE), "train.unfreeze_epoch=null", "train.epochs=1")
    assert result.exit_code == 0, result
    state = load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    torch.manual_seed(0)
    initial = build_model(state["model_spec"]).state_dict()
    assert torch.equal(state["model"]["net.1.weight"], initial["net.1.weight"])  # frozen: untouched
    assert not torch.equal(state["model"]["net.3.weight"], initial["net.3.weight"])
    assert "frozen: 2 tensors" in result.stdout and "for the whole run" in result.stdout

    model = build_model(state["model_spec"])
    groups = parameter_groups(model, ["net.3.weight", "net.3.bias"], 0.2, True)
    shapes = [(group.get("lr"), group.get("weight_decay"), len(group["params"])) for group in groups]
    assert shapes == [(None, None, 1), (None, 0.0, 1), (0.2, None, 1), (0.2, 0.0, 1)]


@pytest.mark.parametrize("step", [2, 6])  # frozen when stopped, then unfrozen; stopped after the unfreeze
def test_resume_is_exact_across_an_unfreeze(tmp_path, step):
    from test_resume import in_child, signal_at

    config = write_config(tmp_path, FINETUNE)
    code, out = in_child(["train", config, "run.name=whole"])
    assert code == 0, out
    code, out = in_child(["train", config, "run.name=cut"], hook=signal_at(step))
    assert code == 143, out
    code, out = in_child(["train", config, "run.name=cut", "--resume"])
    assert code == 0, out
    whole, cut = last_weights(tmp_path, "whole"), last_weights(tmp_path, "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_ddp_with_freeze_groups_and_unfreeze_matches_one_process(cli, tmp_path):
    import subprocess
    import sys

    from conftest import max_weight_difference

    config = write_config(tmp_path, {**FINETUNE, "train": {"epochs": 2, "unfreeze_epoch": 2}})
    single = cli("train", config, "run.name=single")
    assert single.exit_code == 0, single
    done = subprocess.run(
        [sys.executable, "-m", "trainkit", "train", str(config), "--nproc", "2", "run.name=ddp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "now train" in done.stdout
    assert max_weight_difference(last_weights(tmp_path, "single"), last_weights(tmp_path, "ddp")) < 1e-5


# ----------------------------------------------------------------------------- §5 your own model

MODEL_SOURCE = """
import pathlib
from torch import nn

pathlib.Path(__file__).with_name("{marker}").write_text("imported")  # a side effect at import


class TinyNet(nn.Module):
    def __init__(self, num_classes, input_size, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * input_size * input_size, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def not_a_class():
    return None
"""


def test_own_model_class_is_imported_only_with_permission(cli, tmp_path):
    (tmp_path / "mynet.py").write_text(MODEL_SOURCE.format(marker="mynet-ran"))
    (tmp_path / "evil.py").write_text(MODEL_SOURCE.format(marker="evil-ran"))
    own = {"model": {"name": "mynet.py:TinyNet", "hidden": 6, "hidden_sizes": None}, "train": {"epochs": 1}}
    config = _config(tmp_path, own)

    refused = cli("train", config)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused
    assert "mynet.py" in refused.stderr and "--trust-code" in refused.stderr
    assert not (tmp_path / "mynet-ran").exists() and not (tmp_path / "runs").exists()

    assert (
        "not an argument of mynet.py:TinyNet" in cli("train", config, "model.depth=3", "--trust-code").stderr
    )
    assert (
        "not an nn.Module subclass"
        in cli("train", config, "model.name=mynet.py:not_a_class", "--trust-code").stderr
    )
    trained = cli("train", config, "--trust-code", "model.freeze=backbone")
    assert trained.exit_code == 0, trained
    assert "frozen: 2 tensors" in trained.stdout  # the head found in a model of your own
    state = load(tmp_path / "runs" / "tiny" / "checkpoints" / "best.pt")
    assert state["model_spec"]["name"] == f"{tmp_path / 'mynet.py'}:TinyNet"  # found from anywhere
    as_module = cli("train", config, "--trust-code", "model.name=mynet:TinyNet", "run.name=module")
    assert as_module.exit_code == 0, as_module  # a module of the working directory

    # a checkpoint naming another module: nothing of it runs without --trust-code
    state["model_spec"]["name"] = f"{tmp_path / 'evil.py'}:TinyNet"
    torch.save(state, tmp_path / "evil.pt")
    (tmp_path / "cat.png").write_bytes(b"")
    for args in (["eval", "evil.pt"], ["predict", "cat.png", "-c", "evil.pt"]):
        result = cli(*args)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result
        assert "evil.py" in result.stderr and "--trust-code" in result.stderr
        assert not (tmp_path / "evil-ran").exists()
    allowed = cli("eval", "evil.pt", "--trust-code", "--json")
    assert allowed.exit_code == 0, allowed
    assert (tmp_path / "evil-ran").exists()  # the permission is what stood in the way


# ----------------------------------------------------------------------------- §6 CSV data


def _write_images(folder, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        label = ["dog", "cat", "bird"][i % 3]
        side = (20 + 4 * (i % 3), 16 + 2 * (i % 5))  # varied sizes and aspect ratios
        pixels = torch.randint(0, 60, (side[1], side[0], 3), generator=generator, dtype=torch.uint8)
        pixels[..., i % 3] += 150  # the class is the dominant channel
        Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")
        rows.append((f"{folder.name}/img{i}.png", label))
    return rows


def _csv(path, rows, header=("path", "label")):
    path.write_text("\n".join([",".join(header)] + [f"{p},{label}" for p, label in rows]) + "\n")


CSV = {
    "data": {"name": "csv", "image_size": 16, "batch_size": 16, "synthetic": None},
    "train": {"epochs": 2},
    "log": {"tensorboard": False},
}


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_csv_data_trains_evaluates_and_predicts(cli, tmp_path, cache):
    lists = tmp_path / "lists"
    lists.mkdir()
    _csv(lists / "train.csv", _write_images(lists / "train_images", 48))
    _csv(lists / "val.csv", _write_images(lists / "val_images", 12, seed=1))
    data = {
        **CSV["data"],
        "train_csv": str(lists / "train.csv"),
        "val_csv": str(lists / "val.csv"),
        "cache": cache,
    }
    result = cli("train", _config(tmp_path, {**CSV, "data": data}))
    assert result.exit_code == 0, result
    assert "train 48 / val 12 images" in result.stdout
    best = tmp_path / "runs" / "tiny" / "checkpoints" / "best.pt"
    assert load(best)["classes"] == ["bird", "cat", "dog"]  # label strings, sorted
    evaluated = cli("eval", best, "--json", "--split", "val")
    assert evaluated.exit_code == 0, evaluated
    assert json.loads(evaluated.stdout)["num_samples"] == 12
    predicted = cli("predict", lists / "val_images" / "img0.png", "-c", best)
    assert predicted.exit_code == 0, predicted


def test_csv_mistakes_are_one_line(cli, tmp_path):
    rows = _write_images(tmp_path / "images", 6)
    _csv(tmp_path / "train.csv", rows, header=("file", "label"))
    data = {**CSV["data"], "train_csv": str(tmp_path / "train.csv"), "val_fraction": 0.3}
    config = _config(tmp_path, {**CSV, "data": data})
    result = cli("train", config)
    assert result.exit_code == 1 and "no 'path' column" in result.stderr and "'file'" in result.stderr, result
    assert cli("train", config, "data.path_column=file").exit_code == 0

    _csv(tmp_path / "train.csv", rows + [("images/gone.png", "cat")])
    result = cli("train", config)
    assert result.exit_code == 1 and "train.csv:8" in result.stderr and "gone.png" in result.stderr, result
    assert result.stderr.count("\n") == 1
    _csv(tmp_path / "val.csv", [(rows[0][0], "zebra")])
    result = cli("train", config, f"data.val_csv={tmp_path / 'val.csv'}", "data.skip_bad_images=true")
    assert result.exit_code == 1 and "'zebra' is not one of the training classes" in result.stderr, result
    assert cli("train", config, "data.name=synthetic").exit_code == 2  # train_csv without csv


# ----------------------------------------------------------------------------- §4 resize modes


def test_resize_modes():
    image = torch.arange(2 * 40 * 20, dtype=torch.float32).view(2, 40, 20).to(torch.uint8)  # (C, H=40, W=20)
    assert fit_image(image, 10, "squash").shape == (2, 10, 10)
    from torchvision.transforms import v2

    expected = v2.CenterCrop(10)(v2.Resize(12, antialias=True)(image))  # the ImageNet convention
    stored = fit_image(image, 12, "crop")  # what is decoded and cached
    preprocess = Preprocess(2, 10, (0.0, 0.0), (1.0, 1.0), "crop", 12)
    assert torch.equal(preprocess.center_crop(stored[None])[0], expected)
    boxed = fit_image(torch.full((1, 40, 20), 200, dtype=torch.uint8), 10, "letterbox")
    assert boxed.shape == (1, 10, 10) and boxed[0, :, :2].max() == 0 and boxed[0, :, 3:7].min() == 200


def test_crop_mode_with_random_resized_crop_trains_and_matches_at_eval(cli, tmp_path):
    rows = _write_images(tmp_path / "images", 24)
    _csv(tmp_path / "train.csv", rows)
    augment = {"random_resized_crop": True, "scale": [0.5, 1.0], "hflip": True}
    data = {**CSV["data"], "train_csv": str(tmp_path / "train.csv"), "resize": "crop", "resize_size": 20}
    result = cli(
        "train", _config(tmp_path, {**CSV, "data": {**data, "augment": augment, "val_fraction": 0.25}})
    )
    assert result.exit_code == 0, result
    best = tmp_path / "runs" / "tiny" / "checkpoints" / "best.pt"
    preprocess = load(best)["preprocess"]
    assert (preprocess["resize"], preprocess["resize_size"], preprocess["image_size"]) == ("crop", 20, 16)
    predicted = cli("predict", tmp_path / "images" / "img0.png", "-c", best, "--json")
    assert predicted.exit_code == 0, predicted
    from trainkit.data.augment import random_crop_boxes

    boxes = random_crop_boxes(1000, 20, (0.5, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes.min() >= 0 and boxes.max() <= 20 and (width * height / 400).min() >= 0.45
    bad = cli("train", _config(tmp_path, {**CSV, "data": {**data, "resize": "squash", "augment": augment}}))
    assert bad.exit_code == 2 and "needs data.resize=crop" in bad.stderr


# ----------------------------------------------------------------------------- §7 the tutorial's .pth


class Net(nn.Module):  # exactly the PyTorch CIFAR-10 tutorial's network
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # flatten all dimensions except batch
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


def test_the_tutorial_state_dict_evaluates_in_trainkit(cli, tmp_path):
    from trainkit.data.synthetic import make_synthetic

    # the tutorial's transform: ToTensor() then Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    def tutorial_tensors(size, split):
        images, labels = make_synthetic(size, split, 32, 3, 0.15)
        return (images.float() / 255 - 0.5) / 0.5, labels

    train_x, train_y = tutorial_tensors(200, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 4: threads only contend on a busy machine
    torch.manual_seed(0)
    net = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    for epoch in range(1):  # the tutorial's loop (one epoch of its two), batch 4
        for i in range(0, 200, 4):
            inputs, labels = train_x[i : i + 4], train_y[i : i + 4]
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    PATH = tmp_path / "cifar_net.pth"
    torch.save(net.state_dict(), PATH)

    test_x, test_y = tutorial_tensors(128, "test")
    correct = total = 0
    with torch.no_grad():
        for i in range(0, 128, 4):
            outputs = net(test_x[i : i + 4])
            _, predicted = torch.max(outputs, 1)
            total += test_y[i : i + 4].size(0)
            correct += (predicted == test_y[i : i + 4]).sum().item()

    config = _config(
        tmp_path,
        {
            "model": {"name": "lenet", "hidden_sizes": None},
            "data": {
                "normalization": "half",
                "synthetic": {"train_size": 200, "test_size": 128, "image_size": 32},
            },
        },
    )
    result = cli("eval", PATH, "--config", config, "--json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["accuracy"] == correct / total

    predicted = cli("predict", tmp_path, "-c", PATH, "--config", config)
    assert "error: no images" in predicted.stderr  # got past loading; no images in tmp_path

    assert "--config" in cli("eval", PATH).stderr  # a plain state dict says what it needs
    torch.save(net, tmp_path / "whole.pth")
    whole = cli("eval", tmp_path / "whole.pth", "--config", config)
    assert whole.exit_code == 1 and whole.stderr.count("\n") == 1, whole
    assert "torch.save(model.state_dict(), PATH)" in whole.stderr
