"""`trainkit eval`: score a checkpoint on a split, needing nothing but the checkpoint file."""

from __future__ import annotations

import json
from typing import Any

from trainkit.checkpoint import build_model_from_checkpoint, load_checkpoint
from trainkit.config import apply_overrides, config_from_dict
from trainkit.errors import TrainkitError
from trainkit.runtime import pick_device


def run_eval(checkpoint: str, overrides: list[str], split: str, device: str = "auto") -> dict[str, Any]:
    from trainkit.data.datasets import build_splits
    from trainkit.data.pipeline import BatchTransform, check_parts, fits_in_memory, make_source
    from trainkit.data.preprocess import Preprocess
    from trainkit.optim import build_loss
    from trainkit.trainer import evaluate

    target = pick_device(device)
    state = load_checkpoint(checkpoint, map_location=target)
    config = config_from_dict(apply_overrides(state["config"], overrides), "checkpoint config")
    preprocess = Preprocess.from_dict(state["preprocess"])
    # The data must look like what the model was trained on, whatever the overrides say.
    # A checkpoint never chooses where to write: its data.cache_dir is used only when the
    # command line names it again.
    overridden = any(o.split("=", 1)[0].strip() == "data.cache_dir" for o in overrides)
    data_cfg = config.data.model_copy(
        update={
            "channels": preprocess.channels,
            "image_size": preprocess.image_size,
            "cache_dir": config.data.cache_dir if overridden else None,
        }
    )
    classes = list(state["classes"])
    splits = build_splits(data_cfg, config.run.seed, split=split, classes=classes)
    if list(splits.classes) != classes:
        raise TrainkitError(
            f"the data's classes ({', '.join(splits.classes[:5])}…) differ from the checkpoint's "
            f"({', '.join(classes[:5])}…)"
        )
    part = splits.get(split)
    in_memory = fits_in_memory(data_cfg, [part], preprocess.channels, preprocess.image_size)
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
        print(json.dumps(metrics))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # top-5 says something only with more than 5 classes (on 2 it is always 100 %)
    top5 = f"  top-5 {100 * metrics['top5']:.2f}%" if len(metrics["per_class"]) > 5 else ""
    console.print(
        f"{metrics['checkpoint']} on {metrics['dataset']} {metrics['split']} "
        f"({metrics['num_samples']} images): loss {metrics['loss']:.4f}  "
        f"top-1 {100 * metrics['accuracy']:.2f}%{top5}"
    )
    table = Table(title="per-class accuracy")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("accuracy", justify="right")
    for name, accuracy in metrics["per_class"].items():
        table.add_row(name, str(metrics["per_class_count"][name]), f"{100 * accuracy:.2f}%")
    console.print(table)
