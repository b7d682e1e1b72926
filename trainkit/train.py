"""`trainkit train`: config → builders → Trainer → checkpoints. Everything a run needs is built
and checked before its run directory exists, so a bad config leaves nothing behind."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from trainkit import __version__
from trainkit.checkpoint import FORMAT_VERSION, atomic_write_text, load_checkpoint, remove_stale_temp_files
from trainkit.config import Config, dump_config
from trainkit.errors import ConfigError, TrainkitError
from trainkit.reporting import Reporter, say, warn


def check_config(config: Config) -> None:
    """Every name and keyword argument checked against its registry; nothing is built."""
    from trainkit.data.datasets import check_dataset_name
    from trainkit.models import check_model_builds, check_model_name_and_kwargs
    from trainkit.optim import check_named_sections

    check_dataset_name(config.data.name)
    check_model_name_and_kwargs(config.model.name, config.model.kwargs)
    model = config.model
    # sizes the data will decide are stood in for: this checks the arguments, not the data
    check_model_builds(
        model.name, model.kwargs, model.num_classes or 10, model.in_channels or 3, model.input_size or 64
    )
    check_named_sections(config.loss, config.optim, config.sched)
    if config.model.in_channels not in (None, 1, 3) and config.data.channels is None:
        raise ConfigError("model.in_channels", "images have 1 or 3 channels; set data.channels")


def make_run_dir(out_dir: str, name: str) -> Path:
    """<out_dir>/<name>, or <name>-2, <name>-3… when taken (created atomically)."""
    parent = Path(out_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainkitError(f"cannot create {parent}: {error.strerror or error}") from None
    for n in range(1, 100_000):
        candidate = parent / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise TrainkitError(f"cannot create {candidate}: {error.strerror or error}") from None
    raise TrainkitError(f"too many runs named {name} in {parent}")


def find_last_checkpoint(out_dir: str, name: str) -> Path:
    """The newest checkpoints/last.pt among <out_dir>/<name> and <out_dir>/<name>-N."""
    parent = Path(out_dir)
    candidates = [parent / name / "checkpoints" / "last.pt"]
    candidates += parent.glob(f"{name}-*/checkpoints/last.pt")
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise TrainkitError(f"nothing to resume: no {parent / name}/checkpoints/last.pt")
    return max(found, key=lambda path: path.stat().st_mtime)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _shared_run_dir(placement, make) -> Path | None:
    """Rank 0 makes the run directory; every rank learns its path."""
    if placement.parallel != "ddp":
        return make()
    box = [str(make()) if placement.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0])


def run_train(config: Config, resume: bool = False, resume_path: str | None = None) -> dict[str, Any]:
    from trainkit.data.pipeline import BatchTransform, build_data, make_source
    from trainkit.models import build_model
    from trainkit.optim import build_loss, build_optimizer, build_scheduler
    from trainkit.runtime import (
        local_main_first,
        resolve_placement,
        seed_everything,
        shutdown_distributed,
        wrap_model,
    )
    from trainkit.trainer import Trainer

    check_config(config)
    placement = resolve_placement(config.train.device, config.train.parallel)
    resumed = None
    if resume:
        path = Path(resume_path) if resume_path else find_last_checkpoint(config.run.out_dir, config.run.name)
        resumed = load_checkpoint(path, map_location="cpu")
        changed = [k for k in _differences(resumed["config"], config.to_dict()) if k != "train.epochs"]
        if changed:
            warn(f"resuming with a config that differs from the checkpoint's in: {', '.join(changed)}")
        done_epochs, saved_epochs = int(resumed["epoch"]), int(resumed["config"]["train"]["epochs"])
        if config.train.epochs <= done_epochs and int(resumed["batch_in_epoch"]) == 0:
            raise TrainkitError(
                f"{path}: the run already finished {done_epochs} epochs; set train.epochs higher to train on"
            )
        rescheduled = saved_epochs != config.train.epochs
        if rescheduled and placement.is_main:
            warn(
                f"train.epochs {saved_epochs} -> {config.train.epochs}: the lr schedule is rebuilt "
                f"for {config.train.epochs} epochs and continues from step {resumed['global_step']}"
            )

    seed_everything(config.run.seed)
    torch.backends.cudnn.benchmark = placement.device.type == "cuda"
    data_cfg = config.data.model_copy(
        update={
            "image_size": config.data.image_size or config.model.input_size,
            "channels": config.data.channels or config.model.in_channels,
        }
    )
    data_began = time.perf_counter()
    with local_main_first(placement):
        bundle = build_data(data_cfg, config.run.seed)
    data_seconds = time.perf_counter() - data_began  # decoding on a first run, a cache load after
    splits = bundle.splits
    spec = {
        "name": config.model.name,
        "num_classes": config.model.num_classes or len(splits.classes),
        "in_channels": splits.channels,
        "input_size": splits.image_size,
        **config.model.kwargs,
    }
    if spec["num_classes"] < len(splits.classes):
        raise ConfigError("model.num_classes", f"the dataset has {len(splits.classes)} classes")
    torch.manual_seed(config.run.seed)  # the same initial weights whatever data loading drew
    model = build_model(spec).to(placement.device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(config.loss, spec["num_classes"]).to(placement.device)
    optimizer = build_optimizer(config.optim, model.parameters())

    world, rank = placement.world, placement.rank
    if config.data.batch_size < world:
        raise ConfigError("data.batch_size", f"smaller than the number of processes ({world})")
    workers = config.data.num_workers
    train_source = make_source(
        splits.train,
        bundle.in_memory,
        config.data.batch_size,
        config.run.seed,
        True,
        placement.device,
        workers,
        rank,
        world,
    )
    val_source = make_source(
        splits.val,
        bundle.in_memory,
        config.data.eval_batch_size,
        config.run.seed,
        False,
        placement.device,
        workers,
        rank,
        world,
    )
    steps_per_epoch = math.ceil(len(train_source) / config.train.grad_accum_steps)
    schedule = build_scheduler(
        config.sched,
        optimizer,
        steps_per_epoch,
        config.train.epochs,
        "min" if config.train.monitor == "val_loss" else "max",
    )
    wrapped = wrap_model(model, placement)
    if config.train.compile:
        wrapped = torch.compile(wrapped)

    if resumed is not None:
        run_dir = Path(resume_path).resolve().parent.parent if resume_path else None
        run_dir = run_dir or find_last_checkpoint(config.run.out_dir, config.run.name).parent.parent
        if placement.is_main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    else:
        run_dir = _shared_run_dir(
            placement,
            lambda: make_run_dir(config.run.out_dir, config.run.name) if placement.is_main else None,
        )
    checkpoint_dir = run_dir / "checkpoints"
    if placement.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(checkpoint_dir)
        try:
            atomic_write_text(run_dir / "config.yaml", dump_config(config))
        except OSError as error:
            raise TrainkitError(
                f"cannot write {run_dir / 'config.yaml'}: {error.strerror or error}"
            ) from None
        say(f"run directory: {run_dir}")
        say(
            f"data: {config.data.name} train {len(splits.train)} / val {len(splits.val)} images, "
            f"{splits.channels}x{splits.image_size}x{splits.image_size}, "
            f"{'in-memory tensors' if bundle.in_memory else 'DataLoader'}, ready in {data_seconds:.1f} s; "
            f"device {placement.device}" + (f" x{world} ({placement.parallel})" if world > 1 else "")
        )

    reporter = Reporter(run_dir, config.log, config.train.epochs, enabled=placement.is_main)
    extras = {
        "format_version": FORMAT_VERSION,
        "trainkit_version": __version__,
        "config": config.to_dict(),
        "model_spec": spec,
        "classes": list(splits.classes),
        "preprocess": bundle.preprocess.to_dict(),
    }
    trainer = Trainer(
        model=wrapped,
        loss_fn=loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        train_source=train_source,
        val_source=val_source,
        train_transform=BatchTransform(bundle.preprocess, config.data.augment, config.run.seed),
        eval_transform=BatchTransform(bundle.preprocess, None),
        train=config.train,
        placement=placement,
        num_classes=spec["num_classes"],
        reporter=reporter,
        checkpoint_dir=checkpoint_dir,
        checkpoint_extras=extras,
    )
    if resumed is not None:
        trainer.load_state(resumed, new_schedule_length=rescheduled)
        if placement.is_main:
            say(
                f"resumed at epoch {trainer.state.epoch + 1}, batch {trainer.state.batch_in_epoch}, "
                f"step {trainer.state.global_step}"
            )
    state = trainer.fit()
    shutdown_distributed()
    best = checkpoint_dir / "best.pt"
    if placement.is_main and state.best_metric is not None:
        value = state.best_metric
        shown = f"{100 * value:.2f}%" if config.train.monitor != "val_loss" else f"{value:.4f}"
        say(f"best checkpoint: {best} ({config.train.monitor} {shown} at epoch {state.best_epoch})")
    return {
        "run_dir": str(run_dir),
        "best": str(best),
        "best_metric": state.best_metric,
        "global_step": state.global_step,
        "pid": os.getpid(),
    }
