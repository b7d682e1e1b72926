"""Messages that must read right: nothing 'stopped' after the last epoch, top-5 only where it
means something, a torchvision model name without its prefix."""

from __future__ import annotations

from conftest import write_config


def test_early_stopping_line_only_when_something_was_stopped(cli, tmp_path):
    # lr ~ 0: no evaluation after the first improves, so patience 1 runs out at epoch 2
    config = write_config(
        tmp_path, {"optim": {"lr": 1e-12}, "train": {"patience": 1}, "log": {"tensorboard": False}}
    )
    finished = cli("train", config, "train.epochs=2")
    assert finished.exit_code == 0, finished
    assert "early stopping" not in finished.stdout  # epoch 2 was the last anyway
    stopped = cli("train", config, "train.epochs=3")
    assert stopped.exit_code == 0 and "did not improve for 1 evaluations" in stopped.stdout, stopped
    assert "epoch 3/3" not in stopped.stdout
    # 10 classes: the epoch line shows top-5
    assert "top5 " in stopped.stdout


def test_torchvision_name_without_prefix_is_suggested(cli, tmp_path):
    result = cli("config", write_config(tmp_path), "model.name=resnet18")
    assert result.exit_code == 2
    assert "did you mean 'torchvision.resnet18'?" in result.stderr, result
