"""Real short training runs through the CLI into tmp_path, then eval and predict on them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load, write_config
from PIL import Image


def test_train_writes_a_complete_run(cli, tmp_path):
    result = cli("train", write_config(tmp_path), "data.augment.hflip=true", "data.augment.crop_padding=2")
    assert result.exit_code == 0, result
    run = tmp_path / "runs" / "tiny"
    assert f"run directory: {run}" in result.stdout
    assert "best checkpoint:" in result.stdout and "val_accuracy" in result.stdout
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert 0 <= float(rows[-1]["val_accuracy"]) <= 1 and float(rows[-1]["images_per_s"]) > 0

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # no allowlist
    assert state["format_version"] == 1 and state["epoch"] == 2 and state["global_step"] == 16
    assert state["classes"][0] == "circle" and state["preprocess"]["image_size"] == 16
    assert state["config"]["data"]["augment"]["hflip"] is True
    assert not any(key.startswith("module.") for key in state["model"])

    again = cli("train", write_config(tmp_path))
    assert again.exit_code == 0 and (tmp_path / "runs" / "tiny-2" / "checkpoints" / "last.pt").is_file()


def test_optimizer_arguments_are_checked_before_anything_runs(cli, tmp_path):
    result = cli("train", write_config(tmp_path), "optim.name=adamw")  # TINY's sgd momentum stays
    assert result.exit_code == 2
    assert "optim.momentum: not an argument of adamw" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 4-epoch run shared by the eval / predict tests of this module (they only read it)."""
    from typer.testing import CliRunner

    from trainkit.cli import app

    root = tmp_path_factory.mktemp("trained")
    config = write_config(
        root,
        {
            "train": {"epochs": 4},
            "model": {"name": "lenet", "hidden_sizes": None},
            "sched": {"name": "onecycle"},
            "data": {"batch_size": 64, "synthetic": {"train_size": 3000, "image_size": 32}},
            "optim": {"name": "adamw", "lr": 0.003, "momentum": None},
        },
    )
    text = config.read_text().replace("  hidden_sizes: null\n", "").replace("  momentum: null\n", "")
    config.write_text(text)
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return root / "runs" / "tiny" / "checkpoints" / "best.pt"


def test_eval_json_and_table(cli, trained):
    result = cli("eval", trained, "--json")
    assert result.exit_code == 0, result
    metrics = json.loads(result.stdout)
    assert metrics["num_samples"] == 128
    assert metrics["accuracy"] > 0.5, metrics  # learned something real in 4 short epochs
    assert 0 <= metrics["accuracy"] <= metrics["top5"] <= 1
    assert set(metrics["per_class"]) == {
        "circle",
        "square",
        "ring",
        "diamond",
        "plus",
        "hbar",
        "vbar",
        "triangle",
        "x",
        "frame",
    }
    best = load(trained)
    assert metrics["accuracy"] == pytest.approx(best["metrics"]["val_accuracy"])

    table = cli("eval", trained, "--split", "val")
    assert (
        table.exit_code == 0
        and "per class" in table.stdout
        and "recall" in table.stdout
        and "circle" in table.stdout
    )


def test_eval_overrides_point_the_data_elsewhere(cli, trained):
    result = cli("eval", trained, "data.name=cifar10", "data.root=nowhere")
    assert result.exit_code == 1
    assert "cifar10 not found under nowhere" in result.stderr and result.stderr.count("\n") == 1


def _image_in_mode(mode: str, path):
    from trainkit.data.synthetic import make_synthetic

    images, labels = make_synthetic(1, "test", 24, 3)
    rgb = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    elif mode == "P":
        image = rgb.convert("P")
    else:
        image = rgb.convert(mode)
    image.save(path)
    return int(labels[0])


def test_predict_lines_json_and_errors(cli, trained, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for mode in ("RGB", "L", "LA", "RGBA", "P", "I;16"):
        _image_in_mode(mode, folder / f"img_{mode.replace(';', '')}.png")
    _image_in_mode("CMYK", folder / "img_CMYK.jpg")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "._img_RGB.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: skipped
    (folder / ".thumbnails").mkdir()
    _image_in_mode("RGB", folder / ".thumbnails" / "img.png")

    result = cli("predict", folder, "-c", trained, "--json", "--topk", "3")
    assert result.exit_code == 1  # one bad image → exit 1 at the end
    assert "broken.png: cannot read image" in result.stderr and result.stderr.count("\n") == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 7
    for record in records:
        assert set(record) == {"path", "label", "index", "prob", "topk"}
        assert len(record["topk"]) == 3 and record["topk"][0]["label"] == record["label"]
        assert 0 < record["prob"] <= 1

    monkeypatch.chdir(trained.parents[3])  # where the run's runs/ folder is
    plain = cli("predict", str(folder / "img_RGB.png"), str(folder / "img_L*.png"))  # default: newest best.pt
    assert plain.exit_code == 0, plain
    lines = plain.stdout.splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[0].endswith("img_RGB.png")  # img_L, img_LA


def test_bad_checkpoints_are_one_line(cli, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk" * 10)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name, words in [
        ("empty.pt", "empty file"),
        ("junk.pt", "cannot load"),
        ("other.pt", "not a trainkit checkpoint"),
        ("missing.pt", "not found"),
    ]:
        for verb in (["eval"], ["predict", "x.png", "-c"]):
            result = cli(*verb, tmp_path / name)
            assert result.exit_code == 1, (name, result)
            assert words in result.stderr and result.stderr.count("\n") == 1, result


def test_missing_dataset_fails_with_one_line(cli, tmp_path):
    result = cli("train", write_config(tmp_path), "data.name=mnist", f"data.root={tmp_path / 'data'}")
    assert result.exit_code == 1
    assert "mnist not found under" in result.stderr and "data.download=true" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom trainkit.cli import main\nsys.argv=['trainkit','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nassert 'pydantic' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "predict" in out.stdout and "eval" in out.stdout


def test_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "trainkit", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--resume" in out.stdout


def test_a_closed_pipe_is_not_an_error(trained, tmp_path):
    """`trainkit predict folder | head -1`: once the reader leaves, exit 141 quietly (it printed
    'error: BrokenPipeError' before)."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1500):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / f"{i}.png")
    process = subprocess.Popen(
        [sys.executable, "-m", "trainkit", "predict", str(folder), "-c", str(trained)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.readline().startswith(str(folder).encode())
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and "error" not in stderr, stderr


def test_predict_on_a_large_folder_decodes_in_workers_with_the_same_output(
    cli, trained, tmp_path, monkeypatch
):
    """More than one batch of images: decoded by worker processes, one tensor per batch; the
    output (order, errors, exit code) is the one-process output."""
    import importlib

    predict = importlib.import_module(
        "trainkit.predict"
    )  # the module (trainkit.predict is the API's function)
    folder = tmp_path / "many"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(predict.PREDICT_BATCH + 60):
        pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.png")
    (folder / "img_0100_broken.png").write_bytes(b"not an image")  # sorts into the first batch
    assert predict.decode_workers(predict.PREDICT_BATCH + 61) >= (
        1 if len(os.sched_getaffinity(0)) > 1 else 0
    )
    runs = {}
    for name, workers in (("workers", predict.decode_workers), ("one process", lambda count: 0)):
        monkeypatch.setattr(predict, "decode_workers", workers)
        result = cli("predict", folder, "-c", trained, "--out", tmp_path / f"{name}.csv")
        assert result.exit_code == 1, result  # the broken file
        assert result.stderr.count("error: ") == 1 and "img_0100_broken.png" in result.stderr
        runs[name] = (tmp_path / f"{name}.csv").read_text()
    rows = runs["workers"].splitlines()
    assert len(rows) == 1 + predict.PREDICT_BATCH + 60
    assert [row.split(",")[0].rsplit("/", 1)[-1] for row in rows[1:4]] == [
        "img_0000.png",
        "img_0001.png",
        "img_0002.png",
    ]
    assert runs["workers"] == runs["one process"]
