"""The Python API (trainkit.train / evaluate / predict), the callback events, checkpoint keeping."""

from __future__ import annotations

import csv

import pytest
from conftest import TINY, load, write_config
from PIL import Image

import trainkit
from trainkit.callbacks import Callback
from trainkit.errors import ConfigError, TrainkitError


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start {epoch}")

    def on_step_end(self, trainer, step):
        self.events.append("step_end")

    def on_epoch_end(self, trainer, row):
        self.events.append(f"epoch_end {row['epoch']}")

    def on_fit_end(self, trainer):
        # a report writer's hook: the run's files are complete here
        best = trainer.state.best_epoch
        self.events.append(f"fit_end best {best}")

    def on_teardown(self, trainer):
        self.events.append("teardown")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    recorder = Recorder()
    result = trainkit.train(
        write_config(root),
        overrides={
            "train.epochs": 3,
            "train.save_top_k": 2,
            "train.save_every_epochs": 2,
            "log.progress": "none",
        },
        callbacks=[recorder],
        handle_signals=False,
    )
    return root, result, recorder


def test_train_returns_the_run_and_fires_the_events(run):
    root, result, recorder = run
    assert result.run_dir == root / "runs" / "tiny" and result.epochs == 3 and result.global_step == 24
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(result.metrics["val_accuracy"], abs=1e-6)
    assert result.monitor == "val_accuracy"
    assert result.best_metric == pytest.approx(max(float(r["val_accuracy"]) for r in rows), abs=1e-6)
    assert load(result.best_checkpoint)["epoch"] == result.best_epoch
    steps = recorder.events.count("step_end")
    assert steps == 24
    assert [e for e in recorder.events if e != "step_end"] == [
        "fit_start",
        "epoch_start 0",
        "epoch_end 1",
        "epoch_start 1",
        "epoch_end 2",
        "epoch_start 2",
        "epoch_end 3",
        f"fit_end best {result.best_epoch}",
        "teardown",
    ]


def test_save_top_k_and_save_every_epochs_keep_those_epochs(run):
    _, result, _ = run
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    ranked = sorted(rows, key=lambda r: (-float(r["val_accuracy"]), int(r["epoch"])))
    expected = {int(r["epoch"]) for r in ranked[:2]} | {2}  # the 2 best, and every 2nd epoch
    kept = {int(p.stem.split("-")[1]) for p in (result.run_dir / "checkpoints").glob("epoch-*.pt")}
    assert kept == expected
    for epoch in kept:
        assert load(result.run_dir / "checkpoints" / f"epoch-{epoch}.pt")["epoch"] == epoch


def test_evaluate_and_predict_return_plain_data(run, tmp_path):
    _, result, _ = run
    metrics = trainkit.evaluate(result.best_checkpoint, split="val", device="cpu")
    assert metrics["num_samples"] == 128 and set(metrics["per_class"]) >= {"circle", "square"}
    assert metrics["accuracy"] == pytest.approx(load(result.best_checkpoint)["metrics"]["val_accuracy"])

    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = trainkit.predict(
        result.best_checkpoint, [good, Image.open(good), tmp_path / "broken.png"], topk=2
    )
    assert [r["path"] for r in records] == [str(good), None, str(tmp_path / "broken.png")]
    assert records[0]["label"] == records[1]["label"] and records[0]["prob"] == pytest.approx(
        records[1]["prob"]
    )
    assert len(records[0]["topk"]) == 2 and 0 < records[0]["prob"] <= 1
    assert "cannot read image" in records[2]["error"]


def test_api_errors_are_exceptions_not_exits(tmp_path):
    with pytest.raises(ConfigError, match="optim.momentum: not an argument of adamw"):
        trainkit.train(dict(TINY, run={"out_dir": str(tmp_path / "runs")}), ["optim.name=adamw"])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(TrainkitError, match="not found"):
        trainkit.evaluate(tmp_path / "missing.pt")
    with pytest.raises(TrainkitError, match="not found"):
        trainkit.predict(tmp_path / "missing.pt", ["x.png"])


def test_predict_input_that_matches_nothing_raises(run, tmp_path):
    _, result, _ = run
    with pytest.raises(TrainkitError, match="no such file or folder"):
        trainkit.predict(result.best_checkpoint, [tmp_path / "nothing.png"])


def test_import_trainkit_stays_light():
    import subprocess
    import sys

    code = "import sys, trainkit; assert 'torch' not in sys.modules; print(trainkit.train.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "train", done.stderr
