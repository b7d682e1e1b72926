"""A run is its directory: resume continues exactly one run, with its own config, under a lock;
every config mistake found by building the model is exit 2 before a run directory exists."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal

import pytest
import torch
from conftest import TINY, deep_merge, load, write_config


def _snapshot(directory):
    """Every file under `directory` → its bytes (what a refused command must leave alone)."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


EXP = {"run": {"name": "exp"}, "log": {"tensorboard": False}}


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """runs/exp (2 epochs) and runs/exp-lr, trained once for the module."""
    from typer.testing import CliRunner

    from trainkit.cli import app

    root = tmp_path_factory.mktemp("two_runs")
    config = write_config(root, EXP)
    for extra in ([], ["run.name=exp-lr", "optim.lr=0.02"]):
        result = CliRunner().invoke(app, ["train", str(config), *extra])
        assert result.exit_code == 0, result.stderr
    return root / "runs"


@pytest.fixture
def two_runs(trained_runs, tmp_path):
    """A copy of runs/exp and runs/exp-lr (whose last.pt is newer) in tmp_path, with a config
    that names them."""
    runs = tmp_path / "runs"
    shutil.copytree(trained_runs, runs)
    os.utime(runs / "exp-lr" / "checkpoints" / "last.pt")
    return write_config(tmp_path, EXP), runs


def test_resume_by_name_takes_only_that_run(cli, two_runs):
    config, runs = two_runs
    other = _snapshot(runs / "exp-lr")
    result = cli("train", config, "train.epochs=3", "--resume")
    assert result.exit_code == 0, result
    assert load(runs / "exp" / "checkpoints" / "last.pt")["epoch"] == 3
    assert _snapshot(runs / "exp-lr") == other  # exp-* is not exp: never touched


def test_resume_needs_no_yaml_and_refuses_a_changed_config(cli, two_runs, tmp_path):
    config, runs = two_runs
    before = _snapshot(runs)
    refused = cli("train", config, "optim.lr=0.5", "model.hidden_sizes=[8]", "--resume", "train.epochs=3")
    assert refused.exit_code == 2, refused
    first = refused.stderr.splitlines()[0]
    assert (
        first.startswith("error: model.hidden_sizes, optim.lr: changed from the config of")
        and "model.init=" in first
    )
    assert _snapshot(runs) == before and sorted(p.name for p in runs.iterdir()) == ["exp", "exp-lr"]
    # the checkpoint carries the config: a run directory and a neutral override are enough
    result = cli("train", "--resume", runs / "exp", "train.epochs=3", "data.num_workers=0")
    assert result.exit_code == 0, result
    state = load(runs / "exp" / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["config"]["optim"]["lr"] == 0.05


@pytest.mark.parametrize("source", ["best", "outside"])
def test_resume_from_anything_but_last_pt_starts_a_new_run(cli, two_runs, tmp_path, source):
    _, runs = two_runs
    checkpoint = runs / "exp" / "checkpoints" / "best.pt"
    if source == "outside":
        weights = tmp_path / "project" / "weights"
        weights.mkdir(parents=True)
        checkpoint = shutil.copy(checkpoint, weights / "model.pt")
    before = _snapshot(runs / "exp")
    result = cli("train", "--resume", checkpoint, "train.epochs=3", f"run.out_dir={runs}")
    assert result.exit_code == 0, result
    assert "is not a run's checkpoints/last.pt" in result.stdout
    assert _snapshot(runs / "exp") == before  # the older state never overwrites the run's last.pt
    assert load(runs / "exp-2" / "checkpoints" / "last.pt")["epoch"] == 3
    if source == "outside":
        assert sorted(p.name for p in (tmp_path / "project").rglob("*")) == ["model.pt", "weights"]


def test_a_second_process_on_a_run_exits_1_naming_the_holder(cli, two_runs):
    config, runs = two_runs
    lock = os.open(runs / "exp" / ".lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running trainkit holds it
    os.ftruncate(lock, 0)
    os.write(lock, b"424242\n")
    try:
        before = _snapshot(runs / "exp")
        result = cli("train", config, "train.epochs=3", "--resume")
    finally:
        os.close(lock)
    assert result.exit_code == 1, result
    assert "in use by process 424242" in result.stderr and result.stderr.count("\n") == 1
    assert _snapshot(runs / "exp") == before


def test_an_in_process_run_leaves_sigint_to_its_host(cli, tmp_path, monkeypatch):
    """A CLI call inside another program (here pytest) installs no signal handlers: the host's
    Ctrl-C stops the host. It was swallowed: the run saved, exited 130 and the suite ran on."""
    import trainkit.trainer

    original = trainkit.trainer.Trainer.train_step

    def step_then_ctrl_c(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainkit.trainer.Trainer, "train_step", step_then_ctrl_c)
    # a host started in the background has SIGINT ignored: give it Python's own handler first
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli("train", write_config(tmp_path))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_run_whose_every_step_is_skipped_fails(cli, tmp_path, monkeypatch):
    import trainkit.optim

    original = trainkit.optim.build_loss

    def nan_loss(*args, **kwargs):
        loss = original(*args, **kwargs)

        class Nan(torch.nn.Module):
            def forward(self, logits, labels):
                value = loss(logits, labels)
                return value * float("nan") if self.training else value

        return Nan()

    monkeypatch.setattr(trainkit.optim, "build_loss", nan_loss)
    result = cli("train", write_config(tmp_path), "train.on_nonfinite=skip")
    assert result.exit_code == 1, result
    assert "every optimizer step of epoch 1 was skipped" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    "model, overrides, path",
    [
        ({"name": "mlp", "hidden_sizes": [0]}, [], "model.hidden_sizes"),
        ({"name": "lenet", "width": 0}, [], "model.width"),
        ({"name": "torchvision.squeezenet1_1"}, [], "model.name"),
        ({"name": "mlp"}, ["optim.name=lbfgs"], "optim.name"),
    ],
    ids=["hidden_sizes_0", "lenet_width_0", "squeezenet_on_16px", "lbfgs"],
)
def test_a_model_that_cannot_train_is_a_config_error_before_the_run_dir(
    cli, tmp_path, model, overrides, path
):
    base = deep_merge(TINY, {})
    base["model"] = model
    result = cli("train", write_config(tmp_path, base=base), *overrides)
    assert result.exit_code == 2, result
    assert result.stderr.startswith(f"error: {path}:") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_batchnorm_and_a_last_batch_of_one(cli, tmp_path):
    """torchvision models with BatchNorm crashed on a last training batch of one sample
    ('Expected more than 1 value per channel'): it is left out, said once."""
    base = deep_merge(TINY, {"data": {"synthetic": {"train_size": 33, "test_size": 16}}})
    base["model"] = {"name": "torchvision.resnet18"}
    result = cli("train", write_config(tmp_path, base=base), "train.epochs=1", "log.tensorboard=false")
    assert result.exit_code == 0, result
    assert result.stderr.count("last training batch of each epoch (1 of 33 images) is left out") == 1
    assert load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")["global_step"] == 1
