"""Weights from outside the run: torchvision's pretrained weights (`model.weights`), any state
dict file (`model.init`), and the classifier head that both may replace.

Everything is matched by name and shape: a file's tensors load into the model's tensors of
the same name and shape; the head (the last layer giving `num_classes` outputs) may differ in
size, and is then left at its new, seeded initialisation. Files are read weights-only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from trainkit.checkpoint import strip_module_prefix, torch_load
from trainkit.errors import ConfigError, TrainkitError, unknown_choice

SHOWN_NAMES = 3  # names listed per kind of mismatch in a report line


# --------------------------------------------------------------------------- the head


def find_head(model: nn.Module, num_classes: int) -> str | None:
    """Name of the classifier head: the last Linear or Conv2d (in registration order) with
    `num_classes` outputs (resnet `fc`, vgg `classifier.6`, vit `heads.head`, squeezenet
    `classifier.1`, lenet `classifier.5`); None when there is none."""
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            head = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes:
            head = name
    return head


def head_parameter_names(model: nn.Module, num_classes: int) -> list[str]:
    head = find_head(model, num_classes)
    if head is None:
        return []
    return [f"{head}.{name}" for name, _ in model.get_submodule(head).named_parameters()]


# --------------------------------------------------------------------------- reading files


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A trainkit checkpoint, a plain state dict (.pt/.pth/.bin, read weights-only), a dict that
    wraps one under `state_dict` / `model` (Lightning, many repos), or .safetensors → a flat
    {name: tensor} with DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise TrainkitError(f"not found: {path}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TrainkitError(f"{path}: corrupt or not a safetensors file ({reason})") from error
    else:
        state = torch_load(path, "cpu")
        if isinstance(state, dict) and "format_version" in state and isinstance(state.get("model"), dict):
            state = state["model"]  # a trainkit checkpoint
        elif isinstance(state, dict) and not _all_tensors(state):
            inner = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), None)
            if inner is not None and _all_tensors(inner):
                state = inner
    if not isinstance(state, dict) or not state or not _all_tensors(state):
        kind = type(state).__name__
        raise TrainkitError(f"{path}: not a state dict (a {kind} that is not a mapping of names to tensors)")
    return strip_module_prefix(state)


def _all_tensors(state: dict) -> bool:
    return all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items())


# --------------------------------------------------------------------------- matching


@dataclass
class InitReport:
    """How a file's tensors met the model's: names per outcome."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # both, different shapes: "name (file → model)"
    new_head: list[str] = field(default_factory=list)  # head tensors left at their new init

    def describe(self) -> str:
        parts = [f"loaded {len(self.loaded)}"]
        for kind in ("missing", "unexpected", "mismatched"):
            names = getattr(self, kind)
            if names:
                shown = ", ".join(names[:SHOWN_NAMES]) + (", …" if len(names) > SHOWN_NAMES else "")
                parts.append(f"{len(names)} {kind} ({shown})")
        return ", ".join(parts)


STATE_DICT_ALIASES = "state_dict_aliases"  # a model's {file prefix: model prefix} for known layouts


def _translate(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys of a known foreign layout (e.g. the PyTorch tutorial's LeNet `conv1.` →
    `features.0.`) when the model declares one and the file uses none of the model's own names."""
    aliases: dict[str, str] = getattr(model, STATE_DICT_ALIASES, {})
    own = model.state_dict()
    if not aliases or any(key in own for key in state):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in aliases.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = value
    return renamed


def load_matching(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    head: list[str],
    strict: bool,
    source: str,
    relaxable: bool = True,
) -> InitReport:
    """Load the tensors of `state` that match `model` by name and shape. Strict: anything else
    is an error, except head tensors for another number of classes (left at their new init)."""
    state = _translate(model, state)
    own = model.state_dict()
    report = InitReport(source)
    take = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            if key in head and value.ndim and value.shape[0] != own[key].shape[0]:  # other classes
                report.new_head.append(key)
            else:
                report.mismatched.append(f"{key} {list(value.shape)} → {list(own[key].shape)}")
        else:
            take[key] = value
            report.loaded.append(key)
    # BatchNorm's step counter is absent from old files (torchvision's own) and unused in training
    report.missing = [key for key in own if key not in state and not key.endswith("num_batches_tracked")]
    if strict and (report.missing or report.unexpected or report.mismatched):
        hint = f"; set model.init_strict=false to load the {len(report.loaded)} tensors that fit"
        raise TrainkitError(
            f"{source} does not fit the model: {report.describe()}" + (hint if relaxable else "")
        )
    if not report.loaded:
        raise TrainkitError(f"{source}: no tensor fits the model ({report.describe()})")
    model.load_state_dict(take, strict=False)
    return report


# --------------------------------------------------------------------------- torchvision weights


def torchvision_weights(model_name: str, weights_name: str):
    """The torchvision WeightsEnum member for `model.weights` (DEFAULT or a name)."""
    from torchvision.models import get_model_weights

    from trainkit.models import TORCHVISION_PREFIX

    if not model_name.startswith(TORCHVISION_PREFIX) or ":" in model_name:
        raise ConfigError(
            "model.weights", "pretrained weights are for torchvision.<name> models; use model.init PATH"
        )
    enum = get_model_weights(model_name[len(TORCHVISION_PREFIX) :])
    names = list(enum.__members__)
    if weights_name not in names:
        raise ConfigError("model.weights", unknown_choice(f"weights of {model_name}", weights_name, names))
    return enum[weights_name]


def weights_file(weights) -> Path:
    """Where torch's hub cache keeps these weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def fetch_weights(weights) -> Path:
    """The cached file, downloaded into the hub cache when missing (torch's downloader writes a
    uniquely named partial file and renames it; the name's hash prefix is checked)."""
    path = weights_file(weights)
    if path.is_file():
        return path
    match = re.search(r"-([a-f0-9]*)\.", path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            weights.url, str(path), hash_prefix=match.group(1) if match else None, progress=False
        )
    except Exception as error:  # URLError, socket errors, HTTP errors, a hash mismatch
        reason = " ".join(str(getattr(error, "reason", error)).split())[:160] or type(error).__name__
        raise TrainkitError(
            f"model.weights: cannot download {weights.url} ({reason}); offline, put {path.name} "
            f"in {path.parent} (TORCH_HOME sets where)"
        ) from error
    return path


def pretrained_preprocess(weights) -> dict[str, Any]:
    """The weights' own preprocessing: mean/std, resize and crop sizes."""
    transform = weights.transforms()
    return {
        "mean": [float(m) for m in transform.mean],
        "std": [float(s) for s in transform.std],
        "crop_size": int(transform.crop_size[0]),
        "resize_size": int(transform.resize_size[0]),
    }


# --------------------------------------------------------------------------- the one entry point


def _torchvision_core(model: nn.Module) -> nn.Module:
    """The torchvision network inside the channel adapter that 1-channel data adds."""
    from trainkit.models import _ToThreeChannels

    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], _ToThreeChannels):
        return model[1]
    return model


def apply_init(
    model: nn.Module, model_name: str, weights: str | None, init: str | None, strict: bool, num_classes: int
) -> str | None:
    """Load `model.weights` or `model.init` into a freshly built (seeded) model. → a line for
    the log saying what was loaded and what is new, or None when neither is set."""
    if weights is None and init is None:
        return None
    if weights is not None:
        member = torchvision_weights(model_name, weights)
        path = fetch_weights(member)
        target = _torchvision_core(model)
        try:
            state = read_state_file(path)
        except TrainkitError as error:
            raise TrainkitError(f"model.weights: {error}; delete it to download again") from error
        head = head_parameter_names(target, num_classes)
        try:
            report = load_matching(target, state, head, True, f"{path}", relaxable=False)
        except TrainkitError as error:
            raise TrainkitError(f"model.weights: {error} (delete it to download again)") from error
        what = f"weights {type(member).__name__}.{member.name}"
    else:
        path = Path(init)
        state = read_state_file(path)
        target = model
        head = head_parameter_names(target, num_classes)
        report = load_matching(target, state, head, strict, f"model.init {path}")
        what = f"init {path.name}"
    line = f"{what}: {report.describe()}"
    if report.new_head:
        line += f"; new head ({num_classes} classes): {', '.join(report.new_head)}"
    return line


# --------------------------------------------------------------------------- plain files at eval / predict


def load_for_inference(
    path: str | Path, config_path: str | None, overrides: list[str], trust_code: bool, map_location="cpu"
) -> dict[str, Any]:
    """A trainkit checkpoint as it is; with `--config`, a plain state dict (the PyTorch
    tutorial's `torch.save(net.state_dict(), PATH)`, .safetensors) made into one: model, data,
    classes and preprocessing from the config, the weights matched strictly by name and shape."""
    from trainkit.checkpoint import load_checkpoint

    if config_path is None:
        return load_checkpoint(path, map_location)
    path = Path(path)
    if path.suffix != ".safetensors":
        raw = torch_load(path, "cpu")
        if isinstance(raw, dict) and "format_version" in raw:
            raise ConfigError(
                "--config",
                f"{path} is a trainkit checkpoint: it carries its own config (KEY=VALUE overrides apply)",
            )
    from trainkit.config import load_config

    return checkpoint_from_weights_file(path, load_config(config_path, overrides), trust_code)


def checkpoint_from_weights_file(path: Path, config, trust_code: bool) -> dict[str, Any]:
    from trainkit import __version__
    from trainkit.checkpoint import FORMAT_VERSION
    from trainkit.data.pipeline import build_data
    from trainkit.models import build_model
    from trainkit.reporting import Console
    from trainkit.train import check_config, model_spec, resolve_data_config

    check_config(config, trust_code)
    state = read_state_file(path)
    bundle = build_data(resolve_data_config(config), config.run.seed, Console(), splits_needed=("train",))
    spec = model_spec(config, bundle.splits)
    torch.manual_seed(config.run.seed)
    model = build_model(spec, trust_code)
    load_matching(model, state, [], config.model.init_strict, str(path))
    return {
        "format_version": FORMAT_VERSION,
        "trainkit_version": __version__,
        "model": model.state_dict(),
        "model_spec": spec,
        "preprocess": bundle.preprocess.to_dict(),
        "classes": list(bundle.splits.classes),
        "config": config.to_dict(),
    }
