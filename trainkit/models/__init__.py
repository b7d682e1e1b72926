"""Model registry: name → builder, plus any torchvision classifier as `torchvision.<name>`.

A model is built from a plain-dict spec (`name`, `num_classes`, `in_channels`, `input_size` and
the builder's keyword arguments); the spec is saved in checkpoints so that eval and predict
rebuild the exact model from the checkpoint alone.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from trainkit.errors import ConfigError, unknown_choice
from trainkit.models.alexnet import build_alexnet
from trainkit.models.custom import accepted_arguments, import_model_class, is_code_reference
from trainkit.models.lenet import LeNet
from trainkit.models.mlp import MLP

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "alexnet": build_alexnet,
    "mlp": MLP,
}
TORCHVISION_PREFIX = "torchvision."
# Filled in by the trainer/builders from the data; a config may set them to override.
INFERRED = ("num_classes", "in_channels", "input_size")


def torchvision_model_names() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    return sorted(MODELS) + ["torchvision.<name>", "package.module:ClassName", "path/to/file.py:ClassName"]


def check_model_name_and_kwargs(name: str, kwargs: dict[str, Any], trust_code: bool = False) -> None:
    """Raise ConfigError for an unknown model or keyword argument; build nothing. A model of
    your own is imported (to read its signature) only when `trust_code`."""
    if is_code_reference(name):
        names, takes_any = accepted_arguments(import_model_class(name, trust_code))
        valid = [p for p in names if p not in INFERRED]
        for key in kwargs:
            if key not in names and not takes_any:
                raise ConfigError(
                    f"model.{key}", f"not an argument of {name}; valid: {', '.join(valid) or 'none'}"
                )
        return
    if name.startswith(TORCHVISION_PREFIX):
        short = name[len(TORCHVISION_PREFIX) :]
        choices = torchvision_model_names()
        if short not in choices:
            raise ConfigError("model.name", unknown_choice("torchvision model", short, choices))
        return  # torchvision's builders take **kwargs; checked when built
    if name not in MODELS:
        if name in torchvision_model_names():  # `resnet18` means torchvision's
            raise ConfigError(
                "model.name", f"unknown model '{name}'; did you mean '{TORCHVISION_PREFIX}{name}'?"
            )
        raise ConfigError("model.name", unknown_choice("model", name, model_names()))
    params = inspect.signature(MODELS[name]).parameters
    valid = [p for p in params if p not in INFERRED] + list(INFERRED)
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ";"
            raise ConfigError(f"model.{key}", f"not an argument of {name}{hint} valid: {', '.join(valid)}")


def check_model_builds(
    name: str, kwargs: dict[str, Any], num_classes: int, in_channels: int, input_size: int, trust_code=False
):
    """Build the model on the meta device (no memory, no weights): every argument a builder
    rejects (torchvision's included) is a ConfigError before any data is read."""
    import torch

    spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    with torch.device("meta"), warnings.catch_warnings():
        # an empty layer is reported by the forward check before the run, not as a warning here
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return build_model({**spec, **kwargs}, trust_code)


class _ToThreeChannels(nn.Module):
    """Feed 1- or N-channel images to torchvision models that expect RGB."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.mix = None if in_channels == 1 else nn.Conv2d(in_channels, 3, kernel_size=1)

    def forward(self, x):  # (B, C, H, W) -> (B, 3, H, W)
        return x.expand(-1, 3, -1, -1) if self.mix is None else self.mix(x)


def build_model(spec: dict[str, Any], trust_code: bool = False) -> nn.Module:
    """Build from a resolved spec: {name, num_classes, in_channels, input_size, **kwargs}."""
    spec = dict(spec)
    name = spec.pop("name")
    check_model_name_and_kwargs(name, {k: v for k, v in spec.items() if k not in INFERRED}, trust_code)
    try:
        if is_code_reference(name):
            cls = import_model_class(name, trust_code)
            names, _ = accepted_arguments(cls)
            # num_classes / in_channels / input_size only when the constructor names them
            model = cls(**{k: v for k, v in spec.items() if k not in INFERRED or k in names})
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name}() returned a {type(model).__name__}, not an nn.Module")
            return model
        if name.startswith(TORCHVISION_PREFIX):
            import torchvision.models

            in_channels = spec.pop("in_channels")
            spec.pop("input_size", None)
            model = torchvision.models.get_model(name[len(TORCHVISION_PREFIX) :], weights=None, **spec)
            if in_channels != 3:
                model = nn.Sequential(_ToThreeChannels(in_channels), model)
            return model
        return MODELS[name](**spec)
    except (TypeError, ValueError, RuntimeError) as error:
        text = str(error)
        named = [key for key in spec if key not in INFERRED and f"'{key}'" in text]
        path = f"model.{named[0]}" if named else "model"
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise ConfigError(path, f"cannot build {name}: {first}") from error
