"""`trainkit train`: build → resume → fit → summary.

Everything a run needs is built and checked (data, model with one forward pass, loss,
optimizer, schedule, a resumed state loaded into them) before its run directory is created or
written, so a bad config or checkpoint leaves nothing behind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainkit import __version__
from trainkit.callbacks import Callback, CallbackList
from trainkit.checkpoint import FORMAT_VERSION, CheckpointWriter, load_checkpoint, remove_stale_temp_files
from trainkit.config import Config, dump_config
from trainkit.errors import ConfigError, TrainkitError
from trainkit.monitor import Monitor
from trainkit.reporting import Console, Reporter


def check_config(config: Config) -> None:
    """Every name and keyword argument checked against its registry; nothing is built."""
    from trainkit.data.datasets import check_dataset_name
    from trainkit.models import check_model_name_and_kwargs
    from trainkit.optim import check_named_sections

    check_dataset_name(config.data.name)
    check_model_name_and_kwargs(config.model.name, config.model.kwargs)
    check_named_sections(config.loss, config.optim, config.sched)
    if config.model.in_channels not in (None, 1, 3) and config.data.channels is None:
        raise ConfigError("model.in_channels", "images have 1 or 3 channels; set data.channels")


# --------------------------------------------------------------------------- run directories


def make_run_dir(out_dir: str, name: str) -> Path:
    """<out_dir>/<name>, or <name>-2, <name>-3… when taken (created atomically)."""
    parent = Path(out_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainkitError(f"cannot create {parent}: {error.strerror or error}") from error
    for n in range(1, 100_000):
        candidate = parent / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise TrainkitError(f"cannot create {candidate}: {error.strerror or error}") from error
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


def _on_main_then_shared(placement, make: Callable[[], Path]) -> Path:
    """Rank 0 makes the run directory; every rank learns its path."""
    if placement.parallel != "ddp":
        return make()
    box = [str(make()) if placement.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0])


# --------------------------------------------------------------------------- resume


@dataclass
class ResumePlan:
    checkpoint: Path
    state: dict[str, Any]  # the loaded checkpoint
    run_dir: Path  # where the run continues
    rescheduled: bool  # train.epochs changed: the schedule is rebuilt for the new length


def plan_resume(config: Config, resume_path: str | None, console: Console) -> ResumePlan:
    """Which checkpoint a resume continues, loaded and checked against the config."""
    path = Path(resume_path) if resume_path else find_last_checkpoint(config.run.out_dir, config.run.name)
    state = load_checkpoint(path, map_location="cpu")
    changed = [k for k in _differences(state["config"], config.to_dict()) if k != "train.epochs"]
    if changed:
        console.warn(f"resuming with a config that differs from the checkpoint's in: {', '.join(changed)}")
    done_epochs, saved_epochs = int(state["epoch"]), int(state["config"]["train"]["epochs"])
    if config.train.epochs <= done_epochs and int(state["batch_in_epoch"]) == 0:
        raise TrainkitError(
            f"{path}: the run already finished {done_epochs} epochs; set train.epochs higher to train on"
        )
    rescheduled = saved_epochs != config.train.epochs
    if rescheduled:
        console.warn(
            f"train.epochs {saved_epochs} -> {config.train.epochs}: the lr schedule is rebuilt "
            f"for {config.train.epochs} epochs and continues from step {state['global_step']}"
        )
    return ResumePlan(path, state, path.resolve().parent.parent, rescheduled)


# --------------------------------------------------------------------------- build


@dataclass
class Built:
    """Everything a run needs, built and checked before its run directory exists."""

    model: torch.nn.Module  # wrapped for the placement (DDP / DataParallel / compiled)
    spec: dict[str, Any]
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    train_source: Any
    val_source: Any
    bundle: Any  # trainkit.data.pipeline.DataBundle
    data_line: str  # what the data line of the run's output says


def build_model_checked(spec: dict[str, Any], *, seed: int, device: torch.device, channels_last: bool):
    from trainkit.models import build_model

    torch.manual_seed(seed)  # the same initial weights whatever data loading drew
    model = build_model(spec).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def model_spec(config: Config, splits) -> dict[str, Any]:
    spec = {
        "name": config.model.name,
        "num_classes": config.model.num_classes or len(splits.classes),
        "in_channels": splits.channels,
        "input_size": splits.image_size,
        **config.model.kwargs,
    }
    if spec["num_classes"] < len(splits.classes):
        raise ConfigError("model.num_classes", f"the dataset has {len(splits.classes)} classes")
    return spec


def make_sources(config: Config, bundle, *, placement) -> tuple[Any, Any]:
    from trainkit.data.pipeline import make_source

    world, rank = placement.world, placement.rank
    if config.data.batch_size < world:
        raise ConfigError("data.batch_size", f"smaller than the number of processes ({world})")
    common = dict(
        in_memory=bundle.in_memory,
        seed=config.run.seed,
        device=placement.device,
        num_workers=config.data.num_workers,
        rank=rank,
        world=world,
    )
    train = make_source(bundle.splits.train, batch_size=config.data.batch_size, shuffle=True, **common)
    val = make_source(bundle.splits.val, batch_size=config.data.eval_batch_size, shuffle=False, **common)
    return train, val


def build_run(config: Config, *, placement, console: Console) -> Built:
    from trainkit.data.pipeline import build_data
    from trainkit.optim import build_loss, build_optimizer, build_scheduler
    from trainkit.runtime import local_main_first, seed_everything, wrap_model

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
        bundle = build_data(data_cfg, config.run.seed, console)
    data_seconds = time.perf_counter() - data_began  # decoding on a first run, a cache load after
    spec = model_spec(config, bundle.splits)
    model = build_model_checked(
        spec, seed=config.run.seed, device=placement.device, channels_last=config.train.channels_last
    )
    loss_fn = build_loss(config.loss, spec["num_classes"]).to(placement.device)
    optimizer = build_optimizer(config.optim, model)
    train_source, val_source = make_sources(config, bundle, placement=placement)
    steps_per_epoch = math.ceil(len(train_source) / config.train.grad_accum_steps)
    monitor = Monitor.for_metric(config.train.monitor)
    schedule = build_scheduler(config.sched, optimizer, steps_per_epoch, config.train.epochs, monitor.mode)
    wrapped = wrap_model(model, placement)
    if config.train.compile:
        wrapped = torch.compile(wrapped)
    return Built(
        wrapped,
        spec,
        loss_fn,
        optimizer,
        schedule,
        train_source,
        val_source,
        bundle,
        data_line=_data_line(config, bundle, data_seconds, placement),
    )


def _data_line(config: Config, bundle, seconds: float, placement) -> str:
    splits = bundle.splits
    world = placement.world
    return (
        f"data: {config.data.name} train {len(splits.train)} / val {len(splits.val)} images, "
        f"{splits.channels}x{splits.image_size}x{splits.image_size}, "
        f"{'in-memory tensors' if bundle.in_memory else 'DataLoader'}, ready in {seconds:.1f} s; "
        f"device {placement.device}" + (f" x{world} ({placement.parallel})" if world > 1 else "")
    )


def make_trainer(config: Config, built: Built, *, placement, console: Console, handle_signals: bool):
    from trainkit.data.pipeline import BatchTransform
    from trainkit.trainer import Trainer

    bundle = built.bundle
    extras = {
        "format_version": FORMAT_VERSION,
        "trainkit_version": __version__,
        "config": config.to_dict(),
        "model_spec": built.spec,
        "classes": list(bundle.splits.classes),
        "preprocess": bundle.preprocess.to_dict(),
    }
    return Trainer(
        model=built.model,
        loss_fn=built.loss_fn,
        optimizer=built.optimizer,
        schedule=built.schedule,
        train_source=built.train_source,
        val_source=built.val_source,
        train_transform=BatchTransform(bundle.preprocess, config.data.augment, config.run.seed),
        eval_transform=BatchTransform(bundle.preprocess, None),
        train=config.train,
        placement=placement,
        num_classes=built.spec["num_classes"],
        monitor=Monitor.for_metric(config.train.monitor),
        callbacks=CallbackList(),
        checkpoint_extras=extras,
        console=console,
        handle_signals=handle_signals,
        check_every_n_steps=config.log.every_n_steps,
    )


# --------------------------------------------------------------------------- the run


def open_run_dir(
    config: Config, plan: ResumePlan | None, *, placement, console: Console, built: Built
) -> Path:
    """Create (or reopen, for a resume) the run directory and write its config: the first write."""
    if plan is not None:
        run_dir = plan.run_dir
    else:
        make = lambda: make_run_dir(config.run.out_dir, config.run.name)  # noqa: E731
        run_dir = _on_main_then_shared(placement, make)
    if placement.is_main:
        checkpoint_dir = run_dir / "checkpoints"
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(checkpoint_dir)
        (run_dir / "config.yaml").write_text(dump_config(config))
        console.say(f"run directory: {run_dir}")
        console.say(built.data_line)
    return run_dir


def run_callbacks(
    config: Config, run_dir: Path, *, placement, console: Console, started: float
) -> list[Callback]:
    """The run's own callbacks: the checkpoint writer, then the reporter (main process only)."""
    if not placement.is_main:
        return []
    writer = CheckpointWriter(
        run_dir / "checkpoints", top_k=config.train.save_top_k, every_epochs=config.train.save_every_epochs
    )
    return [writer, Reporter(run_dir, config.log, config.train.epochs, console, started)]


def run_train(
    config: Config,
    *,
    resume: bool = False,
    resume_path: str | None = None,
    callbacks: Iterable[Callback] = (),
    started: float | None = None,
    handle_signals: bool = True,
) -> dict[str, Any]:
    """Train one run; → a summary (run directory, best checkpoint and metric, last metrics)."""
    from trainkit.runtime import resolve_placement, shutdown_distributed

    started = time.perf_counter() if started is None else started
    check_config(config)
    placement = resolve_placement(config.train.device, config.train.parallel)
    console = Console(enabled=placement.is_main)
    plan = plan_resume(config, resume_path, console) if resume else None
    built = build_run(config, placement=placement, console=console)
    trainer = make_trainer(config, built, placement=placement, console=console, handle_signals=handle_signals)
    if plan is not None:
        trainer.load_state(plan.state, new_schedule_length=plan.rescheduled)
    run_dir = open_run_dir(config, plan, placement=placement, console=console, built=built)
    if plan is not None:
        s = trainer.state
        console.say(f"resumed at epoch {s.epoch + 1}, batch {s.batch_in_epoch}, step {s.global_step}")
    own = run_callbacks(config, run_dir, placement=placement, console=console, started=started)
    trainer.callbacks.callbacks[:] = [*own, *callbacks]
    trainer.fit()
    shutdown_distributed()
    return summarize(run_dir, trainer, console=console)


def summarize(run_dir: Path, trainer, *, console: Console) -> dict[str, Any]:
    state, monitor = trainer.state, trainer.monitor
    best = run_dir / "checkpoints" / "best.pt"
    if state.best_metric is not None:
        shown = monitor.format(state.best_metric)
        console.say(f"best checkpoint: {best} ({monitor.name} {shown} at epoch {state.best_epoch})")
    return {
        "run_dir": str(run_dir),
        "best": str(best),
        "last": str(run_dir / "checkpoints" / "last.pt"),
        "monitor": monitor.name,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "global_step": state.global_step,
        "epoch": state.epoch,
        "metrics": dict(state.last_metrics),
    }
