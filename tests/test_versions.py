"""The safety floor on torch (and friends): checked before any weights file is read, shown by
`trainkit --version`, and the same in pyproject.toml as in the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from trainkit import versions
from trainkit.checkpoint import load_checkpoint, torch_load
from trainkit.errors import TrainkitError


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"format_version": 1, "model": {}}, path)
    return path


@pytest.mark.parametrize("old", ["2.5.1", "2.9.1+cu128", "2.4.0a0+git1234", "1.13.1", "garbage"])
def test_loading_is_refused_below_the_torch_floor(monkeypatch, checkpoint, old):
    monkeypatch.setattr(torch, "__version__", old)
    for load in (load_checkpoint, torch_load):
        with pytest.raises(TrainkitError) as info:
            load(checkpoint)
        message = str(info.value)
        assert f"torch {old}" in message and "CVE-2026-24747" in message and "GHSA-63cw-57p8-fm3p" in message
        assert "pip install 'torch>=2.10'" in message and "\n" not in message


@pytest.mark.parametrize("current", ["2.10.0", "2.10.0+cpu", "2.11.0a0+gitabc", "3.0.0"])
def test_loading_is_allowed_from_the_floor(monkeypatch, checkpoint, current):
    monkeypatch.setattr(torch, "__version__", current)
    assert torch_load(checkpoint)["format_version"] == 1


def test_every_verb_that_reads_weights_refuses(cli, monkeypatch, checkpoint, tmp_path):
    from conftest import write_config

    monkeypatch.setattr(torch, "__version__", "2.5.1")
    for args in (
        ["eval", checkpoint],
        ["predict", checkpoint, "-c", checkpoint],
        ["train", write_config(tmp_path), checkpoint, "--resume"],
    ):
        result = cli(*args)
        assert result.exit_code == 1, result
        assert result.stderr.startswith("error: refusing to load weights with torch 2.5.1"), result
        assert "GHSA-63cw-57p8-fm3p" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_version_lists_the_packages(cli):
    result = cli("--version")
    assert result.exit_code == 0, result
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["trainkit", "torch", "torchvision", "Pillow"]
    assert "BELOW" not in result.stdout


def test_version_flags_a_package_below_its_floor(cli, monkeypatch):
    real = versions.installed_version
    fake = {"torch": "2.9.1", "pillow": "11.3.0"}
    monkeypatch.setattr(versions, "installed_version", lambda name: fake.get(name) or real(name))
    result = cli("--version")
    assert result.exit_code == 0, result
    torch_line, pillow_line = result.stdout.splitlines()[1], result.stdout.splitlines()[3]
    assert torch_line.startswith("torch 2.9.1") and "BELOW THE FLOOR 2.10" in torch_line
    assert "CVE-2026-24747" in torch_line
    assert pillow_line.startswith("Pillow 11.3.0") and "BELOW THE FLOOR 13.0" in pillow_line
    assert "BELOW" not in result.stdout.splitlines()[2]


def test_version_parsing():
    assert versions.parse_version("2.10.0+cu130") == (2, 10, 0)
    assert versions.parse_version("2.11.0a0+git") == (2, 11, 0)
    assert versions.parse_version("13.0") == (13, 0)
    assert versions.parse_version("dev") == ()
    assert versions.below_floor("torch", "2.9.9") and not versions.below_floor("torch", "2.10.0")
    assert versions.below_floor("torch", "junk")


def test_pyproject_pins_the_same_floors():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for distribution, (_, floor, _) in versions.FLOORS.items():
        pin = re.search(rf'"{distribution}>=([0-9.]+)"', text)
        assert pin, distribution
        assert versions.parse_version(pin.group(1)) == floor, distribution


def test_the_running_environment_is_above_every_floor():
    for distribution in versions.FLOORS:
        version = versions.installed_version(distribution)
        assert version is not None and not versions.below_floor(distribution, version), distribution
