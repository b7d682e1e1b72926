"""Evaluation that explains, the artefacts a run leaves, predictions to files, and the HTML
report rendered in a real browser. One small ImageFolder run (3 classes, one of them with a
terminal escape in its name) is trained once for the module."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, deep_merge
from PIL import Image
from typer.testing import CliRunner

from trainkit.cli import app
from trainkit.evaluate import summarize

CLASSES = ["cat", "dog", "x\x1b[31my"]  # sorted order; the last one tries to colour a terminal
PNG = b"\x89PNG\r\n\x1a\n"


def _image(path: Path, label: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor([[220, 40, 40], [40, 220, 40], [40, 40, 220]][label], dtype=torch.float32)
    pixels = base.view(1, 1, 3) + 60 * torch.randn(8, 8, 3, generator=generator)
    Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(path)


def _cli(*args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("see")
    for split, count in (("train", 30), ("val", 10), ("test", 10)):
        for label, name in enumerate(CLASSES):
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                # two test images of each class look like the next class: sure mistakes
                looks = (label + 1) % 3 if split == "test" and i < 2 else label
                _image(folder / f"{i:03d}.png", looks, hash((split, label, i)) % 10_000)
    config = deep_merge(
        TINY,
        {
            "run": {"name": "see", "out_dir": str(root / "runs")},
            "data": {"name": "imagefolder", "root": str(root / "data"), "batch_size": 16, "image_size": 8},
            "model": {"name": "mlp", "hidden_sizes": [16]},
            "log": {
                "every_n_steps": 4,
                "plots": True,
            },  # 6 steps per epoch: a point at 4, 8, 12; epoch ends at 6, 12
        },
    )
    del config["data"]["synthetic"]
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = _cli("train", root / "cfg.yaml", cwd=root)
    assert result.exit_code == 0, result.output
    return root, root / "runs" / "see", result


# --------------------------------------------------------------------------- numbers


def test_metrics_match_a_hand_computation():
    # 4 classes, the last absent from the split and never predicted
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 2, 2]
    confidence = [0.9, 0.8, 0.7, 0.6, 0.95, 0.5]
    probs = torch.full((6, 4), 0.0)
    for row, (p, c) in enumerate(zip(predicted, confidence)):
        probs[row] = (1 - c) / 3
        probs[row, p] = c
    paths = [f"img{i}.png" for i in range(6)]
    m = summarize(probs, labels, ["a", "b", "c", "d"], 0.5, paths)
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["num_samples"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    rows = {r["class"]: r for r in m["per_class_metrics"]}
    # a: P 2/2, R 2/3; b: P 1/2, R 1/2; c: P 1/2, R 1/1
    assert [rows[c]["precision"] for c in "abc"] == pytest.approx([1.0, 0.5, 0.5])
    assert [rows[c]["recall"] for c in "abc"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [rows[c]["f1"] for c in "abc"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert [rows[c]["support"] for c in "abcd"] == [3, 2, 1, 0]
    assert m["macro_avg"]["precision"] == pytest.approx(2 / 3)  # over the 3 classes present
    assert m["macro_avg"]["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["macro_avg"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_avg"]["precision"] == pytest.approx((3 * 1 + 2 * 0.5 + 0.5) / 6)
    assert m["weighted_avg"]["recall"] == pytest.approx(m["accuracy"])
    assert m["weighted_avg"]["f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 2 / 3) / 6)
    assert m["top_k"] == {}  # top-5 of 4 classes is always 100 %: not reported
    # mistakes, most confident first: #4 (b → c at 0.95), then #2 (a → b at 0.7)
    assert [(x["index"], x["path"], x["true"], x["predicted"]) for x in m["mistakes"]] == [
        (4, "img4.png", "b", "c"),
        (2, "img2.png", "a", "b"),
    ]
    assert m["mistakes"][0]["probability"] == pytest.approx(0.95)
    probs6 = torch.eye(6) * 0.5 + 0.1  # image i: class i first
    probs6[5] = torch.tensor([0.01, 0.05, 0.1, 0.15, 0.2, 0.49])  # true class 0 ranks 6th
    six = summarize(probs6, torch.tensor([0, 1, 2, 3, 4, 0]), list("abcdef"), 0.0)
    assert six["top_k"] == {"5": pytest.approx(5 / 6)} and six["accuracy"] == pytest.approx(5 / 6)
    assert "path" not in six["mistakes"][0]


def test_eval_json_keeps_its_keys_and_adds_the_explanations(run):
    root, run_dir, _ = run
    result = _cli("eval", run_dir / "checkpoints" / "best.pt", "--json", cwd=root)
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    old = {
        "loss",
        "accuracy",
        "top5",
        "num_samples",
        "per_class",
        "per_class_count",
        "split",
        "checkpoint",
        "dataset",
    }
    assert old <= set(m)
    assert {"confusion_matrix", "per_class_metrics", "macro_avg", "weighted_avg", "mistakes", "top_k"} <= set(
        m
    )
    assert m["split"] == "test" and m["num_samples"] == 30  # the dataset's own test split
    matrix = torch.tensor(m["confusion_matrix"])
    assert int(matrix.sum()) == m["num_samples"]
    assert matrix.diagonal().sum().item() / m["num_samples"] == pytest.approx(m["accuracy"])
    assert [int(x) for x in matrix.sum(dim=1)] == [10, 10, 10]
    for mistake in m["mistakes"]:
        assert Path(mistake["path"]).is_file() and mistake["true"] != mistake["predicted"]


def test_eval_text_escapes_names_and_drops_meaningless_top5(run, tmp_path):
    root, run_dir, _ = run
    result = _cli("eval", run_dir / "checkpoints" / "best.pt", "--save", tmp_path / "ev", cwd=root)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "x\\x1b[31my" in result.stdout
    assert "top-5" not in result.stdout  # 3 classes
    assert "precision" in result.stdout and "macro avg" in result.stdout
    written = sorted(p.name for p in (tmp_path / "ev").iterdir())
    assert written == sorted(
        ["eval.json", "confusion_matrix.csv", "confusion_matrix.png", "per_class.csv", "mistakes.csv"]
        + (["mistakes.png"] if json.loads((tmp_path / "ev" / "eval.json").read_text())["mistakes"] else [])
    )
    rows = list(csv.reader(open(tmp_path / "ev" / "per_class.csv")))
    assert rows[0] == ["class", "precision", "recall", "f1", "support"] and len(rows) == 1 + 3 + 2
    assert (tmp_path / "ev" / "confusion_matrix.png").read_bytes().startswith(PNG)


def test_eval_says_when_it_falls_back_to_val(run):
    root, run_dir, _ = run
    only_train = root / "data_no_test"
    if not only_train.exists():
        shutil.copytree(root / "data" / "train", only_train / "train")
    result = _cli("eval", run_dir / "checkpoints" / "best.pt", f"data.root={only_train}", "--json", cwd=root)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split"] == "val"
    assert "no separate test split: evaluating on val, which chose the best checkpoint" in result.stderr


# --------------------------------------------------------------------------- the run directory


def test_training_leaves_plots_log_summary_and_best_eval(run):
    _, run_dir, result = run
    for name in ("results.png", "confusion_matrix.png", "mistakes.png"):
        assert (run_dir / name).read_bytes().startswith(PNG), name
    for name in (
        "eval.json",
        "confusion_matrix.csv",
        "per_class.csv",
        "mistakes.csv",
        "train.log",
        "run.json",
    ):
        assert (run_dir / name).stat().st_size > 0, name
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["split"] == "test" and evaluation["checkpoint"].endswith("best.pt")
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["config"]["run"]["name"] == "see"

    summary = next(line for line in result.stdout.splitlines() if line.startswith("model: "))
    spec_params = 8 * 8 * 3 * 16 + 16 + 16 * 3 + 3  # mlp 192 → 16 → 3
    assert f"{spec_params:,} trainable / {spec_params:,} parameters" in summary
    assert "FLOPs per image" in summary and "n/a" not in summary and "device: CPU" in summary
    info = json.loads((run_dir / "run.json").read_text())
    assert info["flops_per_image"] == 2 * (192 * 16 + 16 * 3)  # a multiply-add is 2 FLOPs
    assert info["torch"] == torch.__version__ and info["eval_split"] == "test"

    log = (run_dir / "train.log").read_text()
    for words in ("run directory:", "model: ", "epoch 2/2", "best checkpoint:", "best.pt on test"):
        assert words in log, words
    assert "\x1b" not in log


def test_tensorboard_has_images_pr_curves_lr_and_no_duplicate_loss(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = run
    events = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0}
    )
    events.Reload()
    tags = events.Tags()
    assert tags["images"] == ["train/augmented_batch"]
    grid = events.Images("train/augmented_batch")[0]
    assert grid.width > 8 and grid.height > 8
    loss_steps = [e.step for e in events.Scalars("train/loss")]
    assert loss_steps == sorted(set(loss_steps)) == [4, 6, 8, 12]  # one point at 12, not two
    lr_steps = [e.step for e in events.Scalars("train/lr")]
    assert 6 in lr_steps and lr_steps == sorted(set(lr_steps))  # epoch 1 ends between log points
    assert len([t for t in tags["tensors"] if t.startswith("val_pr/")]) == 3
    accuracy = [t for t in tags["scalars"] if t.startswith("val_class_accuracy/")]
    assert len(accuracy) == 3 and all("\x1b" not in t for t in accuracy)
    assert not tags["graph"]  # log.graph is off by default


# --------------------------------------------------------------------------- predictions to files


def test_predict_out_csv_jsonl_and_sort_into(run, tmp_path):
    root, run_dir, _ = run
    images = root / "data" / "test"
    result = _cli(
        "predict",
        images,
        "-k",
        "2",
        "--out",
        tmp_path / "p.csv",
        "--sort-into",
        tmp_path / "sorted",
        cwd=root,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # the rows went to the file
    assert "using " in result.stderr and "(run see, val_accuracy" in result.stderr  # no -c: said which
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 30 and set(rows[0]) == {"path", "label", "index", "prob", "label_2", "prob_2"}
    sorted_files = [p for p in (tmp_path / "sorted").rglob("*") if p.is_file()]
    assert len(sorted_files) == 30
    for row in rows:
        folder = "x_[31my" if row["label"] == CLASSES[2] else row["label"]  # ESC → _
        assert (tmp_path / "sorted" / folder).is_dir()
    assert {p.parent.name for p in sorted_files} <= {"cat", "dog", "x_[31my"}
    assert not any(p.is_symlink() for p in sorted_files)

    jsonl = _cli(
        "predict", images, "-c", run_dir / "checkpoints" / "best.pt", "--out", tmp_path / "p.jsonl", cwd=root
    )
    assert jsonl.exit_code == 0 and "using " not in jsonl.stderr
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(records) == 30 and set(records[0]) == {"path", "label", "index", "prob", "topk"}
    bad = _cli("predict", images, "--out", tmp_path / "p.txt", cwd=root)
    assert bad.exit_code == 2 and "use a .csv or .jsonl" in bad.stderr


def test_sort_into_cannot_be_steered_out_of_its_folder(run, tmp_path):
    """Labels from a checkpoint are data: '../x', 'a/b', '..' and a planted symlink must not
    put files anywhere but DIR/<safe name>/."""
    root, run_dir, _ = run
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    state["classes"] = ["../escaped", "a/b", ".."]
    torch.save(state, tmp_path / "hostile.pt")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "sorted"
    result = _cli(
        "predict", root / "data" / "test", "-c", tmp_path / "hostile.pt", "--sort-into", target, cwd=root
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "escaped").exists() and not list(outside.iterdir())
    folders = {p.name for p in target.iterdir()}
    assert folders <= {"_._escaped", "a_b", "_."} and folders
    assert sum(1 for p in target.rglob("*") if p.is_file()) == 30

    planted = tmp_path / "planted"
    planted.mkdir()
    for name in ("_._escaped", "a_b", "_."):
        (planted / name).symlink_to(outside, target_is_directory=True)
    again = _cli(
        "predict", root / "data" / "test", "-c", tmp_path / "hostile.pt", "--sort-into", planted, cwd=root
    )
    assert again.exit_code == 1 and "is not a plain folder" in again.stderr
    assert not list(outside.iterdir())


# --------------------------------------------------------------------------- the HTML report


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_is_self_contained_and_renders_in_a_browser(run, tmp_path):
    root, run_dir, _ = run
    result = _cli("report", run_dir, cwd=root)
    assert result.exit_code == 0, result.output
    page_path = run_dir / "report.html"
    assert result.stdout.strip() == str(page_path)
    page = page_path.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing to fetch
    assert "\x1b" not in page and "x\\x1b[31my" in page
    accuracy = json.loads((run_dir / "eval.json").read_text())["accuracy"]
    shown = f"{100 * accuracy:.2f}%"
    assert shown in page

    if _chromium() is None:
        print("SKIPPED the browser part: no chromium here (apt-get install chromium)")
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    shot = tmp_path / "shot.png"
    rendered = _browser(
        ["--window-size=1200,1400", f"--screenshot={shot}", page_path.as_uri()], tmp_path / "p1"
    )
    assert shot.is_file(), rendered.stderr[-2000:]
    image = Image.open(shot).convert("L")
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram)  # not blank: text, plots and tables drew
    assert len([count for count in histogram if count]) > 50  # many grey levels: the figures rendered
    dom = _browser(["--dump-dom", page_path.as_uri()], tmp_path / "p2").stdout
    assert "trainkit run see" in dom and shown in dom
    assert dom.count("data:image/png;base64,") >= 3  # curves, confusion matrix, mistakes


def test_report_compares_runs(run, tmp_path):
    root, run_dir, _ = run
    other = tmp_path / "see-lr"
    shutil.copytree(
        run_dir, other, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "report.html")
    )
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["optim"]["lr"] = 0.2
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "both.html"
    result = _cli("report", run_dir, other, "-o", out, cwd=root)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "2 runs compared" in page and "optim.lr" in page and "0.2" in page and "see-lr" in page
    assert "run.name" not in page.split("Curves, overlaid")[0]  # names are the rows, not a difference
    missing = _cli("report", tmp_path / "nothing", cwd=root)
    assert missing.exit_code == 1 and "not a run directory" in missing.stderr
