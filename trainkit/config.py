"""The config schema: the YAML keys and the one home of their defaults.

A config is typed, frozen data. `load_config(path, overrides)` reads YAML with a safe loader
that also refuses duplicate keys, applies `key.sub=value` overrides (YAML scalar semantics) and
validates; every failure is a ConfigError naming the dotted path. Named sections (model, loss,
optim, sched) take free keyword arguments that their builders check against the real signature.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from trainkit.errors import ConfigError

MAX_RUN_NAME_CHARS = 200
# Bounds on a YAML config (and on each override value) before it is trusted: bytes read,
# nesting depth, and nodes after alias expansion (a few hundred bytes of nested aliases
# otherwise expand to billions of nodes).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NamedSection(BaseModel):
    """A section with a registry `name` plus that entry's keyword arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(Section):
    name: str = Field("run", description="run name; the run directory is <out_dir>/<name>[-N]")
    out_dir: str = Field("runs", description="parent folder of run directories")
    seed: int = Field(0, description="seed for weights, data order, augmentation and dropout")

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, value: str) -> str:
        # The run directory is <out_dir>/<name>: a name must never climb out of out_dir.
        if value in ("", ".", "..") or "/" in value or "\\" in value or not value.isprintable():
            raise ValueError("must be one folder name (not empty, '.', '..', no slash or control character)")
        if len(value) > MAX_RUN_NAME_CHARS:
            raise ValueError(f"longer than {MAX_RUN_NAME_CHARS} characters")
        return value


class AugmentConfig(Section):
    crop_padding: NonNegativeInt = Field(
        0, description="random crop after zero padding by this many pixels (0 = off)"
    )
    hflip: bool = Field(False, description="random horizontal flip with probability 0.5")
    brightness: float = Field(0.0, ge=0, le=1, description="random brightness factor range ±x")
    contrast: float = Field(0.0, ge=0, le=1, description="random contrast factor range ±x")
    random_resized_crop: bool = Field(
        False, description="data.resize=crop only: a random area/aspect crop of the stored square, resized"
    )
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="random_resized_crop: range of the crop's area fraction"
    )
    ratio: tuple[float, float] = Field(
        (0.75, 4 / 3), description="random_resized_crop: range of the crop's aspect ratio (w/h)"
    )

    @field_validator("scale", "ratio")
    @classmethod
    def _check_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError("expected [low, high] with 0 < low <= high")
        return value


class NormalizationStats(Section):
    mean: list[float]
    std: list[PositiveFloat]


class SyntheticConfig(Section):
    train_size: PositiveInt = Field(6000, description="number of training images")
    test_size: PositiveInt = Field(1000, description="number of test images")
    image_size: PositiveInt = Field(32, ge=16, description="side of the square images, pixels")
    channels: Literal[1, 3] = Field(3, description="1 = grayscale, 3 = RGB")
    noise: float = Field(0.15, ge=0, le=1, description="background noise level, 0..1")


class DataConfig(Section):
    name: str = Field(
        "synthetic",
        description="synthetic | cifar10 | cifar100 | mnist | fashion_mnist | imagefolder | csv",
    )
    root: str = Field("data", description="where the dataset files are (or are downloaded to)")
    download: bool = Field(False, description="download torchvision datasets when missing")
    batch_size: PositiveInt = Field(128, description="global training batch (all processes)")
    eval_batch_size: PositiveInt = Field(1024, description="evaluation/prediction batch")
    num_workers: NonNegativeInt = Field(2, description="DataLoader workers (decode path only)")
    val_fraction: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="hold out this fraction of train as val; null = only when the dataset has "
        "no val/test split of its own (then 0.1)",
    )
    image_size: PositiveInt | None = Field(
        None, description="the model's square input side; null = the dataset's own size"
    )
    resize: Literal["squash", "crop", "letterbox"] = Field(
        "squash",
        description="squash = stretch to a square | crop = shorter side to resize_size, then a "
        "centre crop of image_size | letterbox = longer side to image_size, padded to a square",
    )
    resize_size: PositiveInt | None = Field(
        None, description="resize=crop: the shorter side before cropping; null = image_size / 0.875"
    )
    train_csv: str | None = Field(None, description="csv: the training list (header row, path and label)")
    val_csv: str | None = Field(None, description="csv: the validation list (optional)")
    test_csv: str | None = Field(None, description="csv: the test list (optional)")
    path_column: str = Field("path", description="csv: the column with image paths (relative to the CSV)")
    label_column: str = Field("label", description="csv: the column with class names")
    channels: Literal[1, 3] | None = Field(
        None, description="convert images to 1 or 3 channels; null = the dataset's own"
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    normalization: Literal["dataset", "imagenet", "half", "none"] | NormalizationStats = Field(
        "dataset",
        description="dataset (its mean/std) | imagenet | half (0.5/0.5) | none | {mean: [...], std: [...]}",
    )
    cache: Literal["auto", "memory", "none"] = Field(
        "auto",
        description="memory = decode once into a tensor on the training device; none = "
        "DataLoader + per-image decode; auto = memory when it fits cache_memory_gb",
    )
    cache_memory_gb: PositiveFloat = Field(4.0, description="memory budget of the tensor path")
    cache_dir: str | None = Field(
        None,
        description="where decoded ImageFolder caches go; null = <root>/.trainkit_cache when "
        "you own and can write root, else $XDG_CACHE_HOME/trainkit/<folder>-<digest>",
    )
    cache_max_gb: PositiveFloat = Field(
        20.0, description="disk budget of a cache folder; least recently used caches go first"
    )
    skip_bad_images: bool = Field(
        False, description="skip unreadable images with a warning instead of failing"
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class ModelConfig(NamedSection):
    name: str = Field("lenet", description="lenet | alexnet | mlp | torchvision.<name>")
    num_classes: PositiveInt | None = Field(None, description="null = from the dataset")
    in_channels: PositiveInt | None = Field(None, description="null = from the data")
    input_size: PositiveInt | None = Field(None, description="null = from the data")
    weights: str | None = Field(
        None, description="torchvision.<name> only: DEFAULT or a weights name such as IMAGENET1K_V1"
    )
    init: str | None = Field(
        None,
        description="start from these weights: a trainkit checkpoint, a .pt/.pth state dict, .safetensors",
    )
    init_strict: bool = Field(
        True, description="every tensor must match, except a classifier head of another size"
    )
    freeze: list[str] | str | None = Field(
        None, description="backbone (all but the classifier head) or parameter-name prefixes (a list or one)"
    )

    @field_validator("freeze")
    @classmethod
    def _check_freeze(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "backbone":
            value = [value]  # one prefix
        if isinstance(value, list) and (not value or not all(value)):
            raise ValueError("expected 'backbone' or a non-empty list of parameter-name prefixes")
        return value


class LossConfig(NamedSection):
    name: str = Field(
        "cross_entropy",
        description="cross_entropy | nll | multi_margin | bce_with_logits | mse | smooth_l1 | l1",
    )


class OptimConfig(NamedSection):
    name: str = Field("sgd", description="any torch.optim optimizer, lower case")
    head_lr: PositiveFloat | None = Field(
        None, description="learning rate of the classifier head; null = lr like the rest"
    )
    no_decay_norm_and_bias: bool = Field(
        False, description="no weight decay on biases and normalisation weights (1-D parameters)"
    )


class SchedConfig(NamedSection):
    name: str = Field(
        "none", description="none | step | multistep | cosine | onecycle | exponential | plateau"
    )
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup length, epochs")
    warmup_start_factor: float = Field(0.01, gt=0, le=1, description="lr multiplier at the start of warmup")


class TrainConfig(Section):
    epochs: PositiveInt = Field(10, description="number of passes over the training set")
    unfreeze_epoch: PositiveInt | None = Field(
        None, description="model.freeze applies before this epoch (1-based); null = for the whole run"
    )
    grad_accum_steps: PositiveInt = Field(1, description="micro-batches per optimizer step")
    device: str | list[NonNegativeInt] = Field(
        "auto", description="auto | cpu | mps | cuda | cuda:N | [0, 1] (DataParallel)"
    )
    parallel: Literal["auto", "none", "dp", "ddp"] = Field(
        "auto", description="auto = DDP under torchrun, DataParallel for a device list"
    )
    precision: Literal["auto", "32", "bf16", "fp16"] = Field(
        "auto", description="auto | 32 | bf16 | fp16 (auto: bf16 where measured faster on this CPU, else 32)"
    )
    clip_grad_norm: PositiveFloat | None = Field(None, description="max gradient norm")
    eval_every: PositiveInt = Field(1, description="evaluate every N epochs (and at the end)")
    patience: PositiveInt | None = Field(
        None, description="early stopping: evaluations without improvement of monitor"
    )
    monitor: Literal["val_accuracy", "val_loss", "val_top5"] = Field(
        "val_accuracy", description="metric that picks best.pt and drives early stopping"
    )
    compile: bool = Field(False, description="torch.compile the model")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format (auto: on where measured faster on this CPU)"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="what a NaN/inf loss does: stop the run or skip the step"
    )
    save_top_k: NonNegativeInt = Field(
        0, description="also keep the k best evaluated epochs as checkpoints/epoch-<N>.pt (0 = best.pt only)"
    )
    save_every_epochs: PositiveInt | None = Field(
        None, description="also keep checkpoints/epoch-<N>.pt every N epochs (null = never)"
    )

    @field_validator("channels_last", mode="before")
    @classmethod
    def _channels_last_choice(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("expected true, false or auto")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("a device list needs at least one GPU id")
            return value
        text = value.strip().lower()
        if text in ("auto", "cpu", "cuda", "mps"):
            return text
        if text.startswith("cuda:") and text[5:].isdigit():
            return text
        raise ValueError(f"unknown device '{value}'; choices: auto, cpu, mps, cuda, cuda:N, [ids]")


class LogConfig(Section):
    tensorboard: bool = Field(True, description="write TensorBoard scalars to <run>/tensorboard")
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="auto = rich bars on a terminal, plain lines otherwise"
    )
    every_n_steps: PositiveInt = Field(50, description="train-loss logging cadence, steps")
    graph: bool = Field(False, description="write the model graph to TensorBoard (traces the model once)")
    plots: bool = Field(
        True, description="draw results.png, confusion_matrix.png and mistakes.png at the end of training"
    )


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(name="sgd", lr=0.01))
    sched: SchedConfig = Field(default_factory=lambda: SchedConfig(name="none"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML- and checkpoint-safe dict (no pydantic objects)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- YAML


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (line {mark.line + 1})", mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); configs mean the float.
_StrictSafeLoader.yaml_implicit_resolvers = {
    key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_error_line(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return " ".join(f"{problem}{where}".split())


def _check_yaml_bounds(text: str, source: str) -> None:
    """Walk the event stream (no recursion, nothing built) counting depth and the nodes the
    document holds once every alias is expanded."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(source, f"larger than {MAX_CONFIG_BYTES // 1024} KiB; not a config")
    anchored: dict[str, int] = {}  # anchor → nodes in its expanded subtree
    open_sizes: list[list] = []  # per open collection: [anchor, nodes so far]
    total = 0
    for event in yaml.parse(text, Loader=_StrictSafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            open_sizes.append([event.anchor, 1])
            if len(open_sizes) > MAX_CONFIG_DEPTH:
                line = event.start_mark.line + 1
                raise ConfigError(source, f"nested deeper than {MAX_CONFIG_DEPTH} levels (line {line})")
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, size = open_sizes.pop()
            if anchor:
                anchored[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = anchored.get(event.anchor, 1)
        else:
            continue
        if open_sizes:
            open_sizes[-1][1] += size
        total += size
        if total > MAX_CONFIG_NODES or (open_sizes and open_sizes[-1][1] > MAX_CONFIG_NODES):
            raise ConfigError(
                source, f"expands to more than {MAX_CONFIG_NODES:,} values (nested aliases?); not a config"
            )


def parse_yaml(text: str, source: str) -> Any:
    try:
        _check_yaml_bounds(text, source)
        loader = _StrictSafeLoader(text)  # a SafeLoader: no python tags, no duplicate keys
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise ConfigError(source, _yaml_error_line(error)) from error


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b.c=value` set (value has YAML scalar semantics) and
    each `~a.b.c` removed (e.g. `optim.name=adam ~optim.momentum` to switch optimizers)."""
    import copy

    result = copy.deepcopy(raw)
    for item in overrides:
        if item.startswith("~") and "=" not in item:
            _remove_key(result, item[1:].strip(), item)
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError("overrides", f"expected key.sub=value, got '{item}'")
        value = parse_yaml(text, key) if text.strip() else None
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: depth + 1]), "is not a section")
            node = child
        node[parts[-1]] = value
    return result


def _remove_key(raw: dict[str, Any], key: str, item: str) -> None:
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise ConfigError("overrides", f"expected ~key.sub to remove a key, got '{item}'")
    node: Any = raw
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(key, "not set in the config, nothing to remove")
    del node[parts[-1]]


def _reject_nonfinite(value: Any, path: str) -> None:
    """inf and nan are never a valid setting (and YAML cannot even save them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"must be a finite number (got {value})")
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_nonfinite(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_nonfinite(item, f"{path}.{index}")


# --------------------------------------------------------------------------- validation


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for listing valid keys)."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _format_validation_error(error: ValidationError) -> ConfigError:
    first = error.errors()[0]
    loc = tuple(part for part in first["loc"] if not str(part).startswith(("literal[", "function")))
    # pydantic adds the union member ("NormalizationStats", "str") to loc; drop class-like parts
    loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
    path = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ";"
        return ConfigError(path, f"unknown key{hint} valid keys: {', '.join(valid)}")
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    value = first.get("input")
    if first["type"] not in ("missing",) and not isinstance(value, (dict, list)):
        message = f"{message} (got {value!r})"
    return ConfigError(path, message)


def config_from_dict(raw: Any, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, f"expected a mapping of sections, got {type(raw).__name__}")
    for section in ("model", "loss", "optim", "sched"):
        if isinstance(raw.get(section), str):  # `model: lenet` is short for `model: {name: lenet}`
            raw = {**raw, section: {"name": raw[section]}}
    _reject_nonfinite(raw, "")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise _format_validation_error(error) from error


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    try:
        if not path.is_file() and path.exists():
            raise ConfigError("config", f"{path} is not a file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(str(path), f"larger than {MAX_CONFIG_BYTES // 1024} KiB; not a config")
        text = data.decode("utf-8")
    except FileNotFoundError as error:
        raise ConfigError("config", f"file not found: {path}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("config", f"cannot read {path}: {error}") from error
    raw = parse_yaml(text, str(path))
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw or {}, overrides or []), str(path))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
