"""Config validation: every error names its dotted path, exits 2 and leaves no run directory."""

from __future__ import annotations

import pytest
import yaml
from conftest import write_config

from trainkit.config import Config, apply_overrides, load_config
from trainkit.errors import ConfigError


def test_defaults_come_from_the_schema(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    config = load_config(path)
    assert config == Config()
    assert config.data.batch_size == 128 and config.train.precision == "auto"


def test_overrides_have_yaml_scalar_semantics(tmp_path):
    config = load_config(
        write_config(tmp_path),
        [
            "optim.lr=1e-3",
            "train.epochs=3",
            "data.augment.hflip=true",
            "train.device=[0, 1]",
            "model.hidden_sizes=[8, 4]",
        ],
    )
    assert config.optim.kwargs["lr"] == 0.001 and isinstance(config.optim.kwargs["lr"], float)
    assert config.train.epochs == 3 and config.data.augment.hflip is True
    assert config.train.device == [0, 1]
    assert config.model.kwargs["hidden_sizes"] == [8, 4]


def test_override_leaves_the_original_untouched():
    raw = {"optim": {"name": "sgd"}}
    apply_overrides(raw, ["optim.lr=0.5"])
    assert raw == {"optim": {"name": "sgd"}}


@pytest.mark.parametrize(
    "text, path, words",
    [
        ("data:\n  batchsize: 3\n", "data.batchsize", ["did you mean 'batch_size'", "valid keys:"]),
        ("trian:\n  epochs: 3\n", "trian", ["did you mean 'train'"]),
        ("data:\n  batch_size: lots\n", "data.batch_size", ["integer"]),
        ("data:\n  batch_size: 0\n", "data.batch_size", ["greater than 0"]),
        ("train:\n  epochs: 0\n", "train.epochs", ["greater than 0"]),
        ("train:\n  device: tpu\n", "train.device", ["unknown device 'tpu'"]),
        ("data:\n  cache: disk\n", "data.cache", ["'auto', 'memory' or 'none'"]),
        ("a: 1\na: 2\n", "", ["duplicate key 'a'"]),
        ("run: !!python/object/apply:os.system ['echo hacked']\n", "", ["python/object/apply"]),
        ("run: !!python/name:os.system\n", "", ["python/name"]),
        ("run: !!python/module:os\n", "", ["python/module"]),
        ("run: !!python/object/new:subprocess.Popen [['true']]\n", "", ["python/object/new"]),
        ("- just\n- a list\n", "", ["mapping"]),
    ],
)
def test_schema_errors_name_the_path(tmp_path, text, path, words):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert message.startswith(path)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "model.name=lenett",
            "model.name: unknown model 'lenett'; did you mean 'lenet'? choices: alexnet, lenet, mlp",
        ),
        ("optim.name=adamm", "did you mean 'adam'?"),
        ("optim.lr=-0.1", "optim.lr: must be a number > 0"),
        ("optim.betas_typo=1", "optim.betas_typo: not an argument of sgd"),
        ("loss.name=crossentropy", "did you mean 'cross_entropy'?"),
        ("loss.label_smoothing=2.0", "loss"),
        ("sched.name=cosin", "did you mean 'cosine'?"),
        ("sched.name=step", "sched.step_size: required"),
        ("model.widht=2", "model.widht: not an argument of mlp"),
        ("model.name=torchvision.resnet19", "did you mean 'resnet18'?"),
        ("data.name=cifar", "unknown dataset 'cifar'"),
        ("train.device=cuda:7", "train.device"),
        ("nonsense", "expected key.sub=value"),
    ],
)
def test_cli_config_errors_exit_2_without_run_dir(cli, tmp_path, override, expected):
    path = write_config(tmp_path)
    args = ["train", path, override] if "=" in override else ["config", path, "x.=1"]
    result = cli(*args)
    assert result.exit_code == 2, result
    assert expected in result.stderr, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_python_tags_never_run(cli, tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    result = cli("train", config)
    assert result.exit_code == 2 and "python/object/apply" in result.stderr
    assert not marker.exists()


def test_config_verb_prints_resolved_yaml(cli, tmp_path):
    result = cli("config", write_config(tmp_path), "optim.lr=0.2")
    assert result.exit_code == 0, result
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optim"] == {
        "name": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "head_lr": None,
        "no_decay_norm_and_bias": False,
    }
    assert resolved["train"]["grad_accum_steps"] == 1  # defaults included
    assert set(resolved) == {"run", "data", "model", "loss", "optim", "sched", "train", "log"}


def test_missing_config_file(cli, tmp_path):
    result = cli("train", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "file not found" in result.stderr
