"""Shared helpers: run the real CLI in-process, write tiny configs, read checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from trainkit.cli import app

torch.set_num_threads(2)

# A small synthetic task that trains in a second or two on one CPU core.
TINY = {
    "run": {"name": "tiny", "seed": 0},
    "data": {
        "name": "synthetic",
        "batch_size": 32,
        "eval_batch_size": 256,
        "num_workers": 0,
        "synthetic": {"train_size": 256, "test_size": 128, "image_size": 16},
    },
    "model": {"name": "mlp", "hidden_sizes": [32]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    # float32 pinned: the equivalence tests (DDP = one process, accumulation = a larger batch,
    # resume = uninterrupted) compare float32 arithmetic, and `auto` would pick bf16 for the mlp
    # on CPUs with native bf16 (whose rounding depends on the batch split). `auto` itself:
    # tests/test_engine.py.
    "train": {"epochs": 2, "precision": "32"},
    "log": {"progress": "plain", "tensorboard": True, "plots": False},  # drawing: tests/test_insight.py
}


class Result:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def __repr__(self) -> str:
        return f"exit {self.exit_code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path, monkeypatch):
    """Tests never write into the real user cache directory (~/.cache/trainkit)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """cli('train', 'cfg.yaml', ...) → Result, run with tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRAINKIT_DEBUG", raising=False)
    runner = CliRunner()

    def run(*args: str) -> Result:
        result = runner.invoke(app, [str(a) for a in args])
        if _from_keyboard_interrupt(result.exception):
            # a Ctrl-C meant for pytest: the in-process CLI (typer) turned it into exit 130;
            # pytest must stop, not read it as one test's result
            raise KeyboardInterrupt
        return Result(result)

    return run


def _from_keyboard_interrupt(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def write_config(
    directory: Path, overrides: dict | None = None, base: dict | None = None, name="cfg.yaml"
) -> Path:
    config = deep_merge(base or TINY, overrides or {})
    config["run"] = {**config.get("run", {}), "out_dir": str(directory / "runs")}
    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return path


def deep_merge(base: dict, update: dict) -> dict:
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = value
    return result


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def last_weights(root: Path, name: str = "tiny") -> dict:
    """The model weights of run `name`'s last.pt under `root`/runs."""
    return load(root / "runs" / name / "checkpoints" / "last.pt")["model"]


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


os.environ.setdefault("OMP_NUM_THREADS", "2")
