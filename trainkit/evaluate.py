"""`trainkit eval`: score a checkpoint on a split, needing nothing but the checkpoint file."""

from __future__ import annotations

import copy
from typing import Any

from trainkit.checkpoint import build_model_from_checkpoint, load_checkpoint, resolve_checkpoint_path
from trainkit.config import apply_overrides, config_from_dict
from trainkit.errors import TrainkitError
from trainkit.runtime import pick_device
from trainkit.text import escape, to_json

# Keys of a checkpoint's config that choose where files are written: a checkpoint's author
# never decides that, so they are reset to the defaults (the user's overrides may set them).
_WRITE_LOCATION_KEYS = {"data": {"cache_dir": None, "download": False}}


def config_without_write_locations(checkpoint_config: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(checkpoint_config)
    for section, defaults in _WRITE_LOCATION_KEYS.items():
        if isinstance(raw.get(section), dict):
            raw[section].update(defaults)
    return raw


def run_eval(checkpoint: str, overrides: list[str], split: str, device: str = "auto") -> dict[str, Any]:
    from trainkit.data.datasets import build_splits
    from trainkit.data.pipeline import BatchTransform, check_parts, fits_in_memory, make_source
    from trainkit.data.preprocess import Preprocess
    from trainkit.optim import build_loss
    from trainkit.trainer import evaluate

    target = pick_device(device)
    checkpoint = resolve_checkpoint_path(checkpoint)
    state = load_checkpoint(checkpoint, map_location="cpu")
    raw = config_without_write_locations(state["config"])
    config = config_from_dict(apply_overrides(raw, overrides), "checkpoint config")
    preprocess = Preprocess.from_dict(state["preprocess"])
    # The data must look like what the model was trained on, whatever the overrides say.
    data_cfg = config.data.model_copy(
        update={"channels": preprocess.channels, "image_size": preprocess.image_size}
    )
    splits = build_splits(data_cfg, config.run.seed)
    classes = list(state["classes"])
    if list(splits.classes) != classes:
        raise TrainkitError(
            f"the data's classes ({', '.join(splits.classes[:5])}…) differ from the checkpoint's "
            f"({', '.join(classes[:5])}…)"
        )
    part = splits.get(split)
    in_memory = fits_in_memory(config.data, [part], preprocess.channels, preprocess.image_size)
    if not in_memory:
        check_parts([part])
    source = make_source(
        part,
        in_memory=in_memory,
        batch_size=config.data.eval_batch_size,
        seed=0,
        shuffle=False,
        device=target,
        num_workers=config.data.num_workers,
    )
    model = build_model_from_checkpoint(state, checkpoint).to(target)
    num_classes = int(state["model_spec"]["num_classes"])
    loss_fn = build_loss(config.loss, num_classes).to(target)
    metrics = evaluate(model, source, BatchTransform(preprocess, None), loss_fn, num_classes)
    metrics["per_class"] = {name: metrics["per_class"][i] for i, name in enumerate(classes)}
    metrics["per_class_count"] = {name: metrics["per_class_count"][i] for i, name in enumerate(classes)}
    metrics.update(split=split, checkpoint=str(checkpoint), dataset=config.data.name)
    return metrics


def print_metrics(metrics: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(to_json(metrics))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    # names are data: plain Text (no markup), control characters escaped
    console.print(
        Text(
            f"{escape(metrics['checkpoint'])} on {escape(metrics['dataset'])} {escape(metrics['split'])} "
            f"({metrics['num_samples']} images): loss {metrics['loss']:.4f}  "
            f"top-1 {100 * metrics['accuracy']:.2f}%  top-5 {100 * metrics['top5']:.2f}%"
        ),
        soft_wrap=True,  # a path split over lines cannot be copied
    )
    table = Table(title="per-class accuracy")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("accuracy", justify="right")
    for name, accuracy in metrics["per_class"].items():
        table.add_row(Text(escape(name)), str(metrics["per_class_count"][name]), f"{100 * accuracy:.2f}%")
    console.print(table)
