"""`trainkit train`: build → resume → fit → summary.

Everything a run needs is built and checked (data, model with one forward pass, loss,
optimizer, schedule, a resumed state loaded into them) before its run directory is created or
written, so a bad config or checkpoint leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainkit import __version__
from trainkit.callbacks import Callback, CallbackList
from trainkit.checkpoint import (
    FORMAT_VERSION,
    CheckpointWriter,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp_files,
)
from trainkit.config import Config, apply_overrides, config_from_dict, dump_config
from trainkit.errors import ConfigError, RunLocked, TrainkitError
from trainkit.monitor import Monitor
from trainkit.reporting import Console, Reporter, console_log


def check_config(config: Config, trust_code: bool = False) -> None:
    """Every name and keyword argument checked against its registry; nothing is built."""
    from trainkit.data.datasets import check_data_section
    from trainkit.models import check_model_builds, check_model_name_and_kwargs
    from trainkit.optim import check_named_sections

    check_data_section(config.data)
    check_model_name_and_kwargs(config.model.name, config.model.kwargs, trust_code)
    model = config.model
    # sizes the data will decide are stood in for: this checks the arguments, not the data
    check_model_builds(
        model.name,
        model.kwargs,
        model.num_classes or 10,
        model.in_channels or 3,
        model.input_size or 64,
        trust_code,
    )
    check_named_sections(config.loss, config.optim, config.sched)
    if config.model.in_channels not in (None, 1, 3) and config.data.channels is None:
        raise ConfigError("model.in_channels", "images have 1 or 3 channels; set data.channels")
    check_init_settings(config)


def check_init_settings(config: Config) -> None:
    """model.weights / model.init / model.freeze / train.unfreeze_epoch, before any data."""
    from trainkit.weights import torchvision_weights

    model = config.model
    if model.weights is not None and model.init is not None:
        raise ConfigError("model.init", "set model.weights or model.init, not both")
    if model.weights is not None:
        torchvision_weights(model.name, model.weights)
    if model.init is not None and not Path(model.init).is_file():
        raise ConfigError("model.init", f"file not found: {model.init}")
    if config.train.unfreeze_epoch is not None and model.freeze is None:
        raise ConfigError("train.unfreeze_epoch", "nothing to unfreeze: set model.freeze")


def resolve_data_config(config: Config):
    """The data section as the run uses it: sizes and channels from the model section when the
    data leaves them unset, and with `model.weights` the weights' own preprocessing (mean/std,
    resize, crop) for whatever the config does not set itself."""
    from trainkit.config import NormalizationStats

    data = config.data
    update: dict[str, Any] = {
        "image_size": data.image_size or config.model.input_size,
        "channels": data.channels or config.model.in_channels,
    }
    if config.model.weights is not None:
        from trainkit.weights import pretrained_preprocess, torchvision_weights

        meta = pretrained_preprocess(torchvision_weights(config.model.name, config.model.weights))
        explicit = data.model_fields_set
        if update["channels"] is None:
            update["channels"] = 3  # pretrained on RGB: grayscale images are given as RGB
        if "normalization" not in explicit:
            update["normalization"] = NormalizationStats(mean=meta["mean"], std=meta["std"])
        if "resize" not in explicit:
            update["resize"] = "crop"
        if update["image_size"] is None:
            update["image_size"] = meta["crop_size"]
            if data.resize_size is None:
                update["resize_size"] = meta["resize_size"]
    resolved = data.model_copy(update=update)
    if resolved.augment.random_resized_crop and resolved.resize != "crop":
        raise ConfigError("data.augment.random_resized_crop", "needs data.resize=crop")
    return resolved


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

# What a resume may change: where the data is and how it is loaded, where and how the run
# executes, what it logs and keeps, and how long it runs. Anything else changes what the run
# means, and belongs to a new run started from these weights.
TRAJECTORY_NEUTRAL = (
    "train.epochs",
    "train.device",
    "train.parallel",
    "train.save_top_k",
    "train.save_every_epochs",
    "data.root",
    "data.download",
    "data.cache",
    "data.cache_dir",
    "data.cache_memory_gb",
    "data.num_workers",
    "data.eval_batch_size",
    "run.name",
    "run.out_dir",
    "log.",
)


def _neutral(key: str) -> bool:
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in TRAJECTORY_NEUTRAL)


def find_last_checkpoint(out_dir: str, name: str) -> Path:
    """The newest checkpoints/last.pt of the runs named exactly <name> or <name>-<digits>."""
    parent = Path(out_dir)
    runs = [parent / name]
    if parent.is_dir():
        runs += [
            d for d in parent.iterdir() if d.name.startswith(f"{name}-") and d.name[len(name) + 1 :].isdigit()
        ]
    found = [run / "checkpoints" / "last.pt" for run in runs if (run / "checkpoints" / "last.pt").is_file()]
    if not found:
        raise TrainkitError(f"nothing to resume: no {parent / name}/checkpoints/last.pt")
    return max(found, key=lambda path: path.stat().st_mtime)


def locate_checkpoint(target: str | None, config: Config) -> Path:
    """--resume's argument (a run directory, a checkpoint, or nothing: the newest run of the
    config's name) → the checkpoint file."""
    if target is None:
        return find_last_checkpoint(config.run.out_dir, config.run.name)
    path = Path(target)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise TrainkitError(f"nothing to resume: no {last}")
        return last
    return path


def owning_run(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint continues in place: only a run's checkpoints/last.pt."""
    resolved = checkpoint.resolve()
    run = resolved.parent.parent
    if (
        resolved.name == "last.pt"
        and resolved.parent.name == "checkpoints"
        and (run / "config.yaml").is_file()
    ):
        return run
    return None


def resumed_config(saved: dict[str, Any], given: Config | None, overrides: list[str], source: Path) -> Config:
    """The checkpoint's config, with only trajectory-neutral keys changed by the YAML given or
    the overrides; any other difference is a ConfigError naming the dotted paths."""
    base = config_from_dict(saved, f"{source} config")
    new = (
        given
        if given is not None
        else config_from_dict(apply_overrides(base.to_dict(), overrides), "overrides")
    )
    changed = [key for key in _differences(base.to_dict(), new.to_dict()) if not _neutral(key)]
    if changed:
        raise ConfigError(
            ", ".join(changed),
            f"changed from the config of {source}; a resume keeps its run's config "
            "(it may change train.epochs, data location/cache/workers, device/parallel, log.*, "
            f"data.eval_batch_size). To train these weights with a new config, start a new run: "
            f"trainkit train CONFIG model.init={source}",
        )
    return new


@dataclass
class ResumePlan:
    checkpoint: Path
    state: dict[str, Any]  # the loaded checkpoint
    config: Config  # the run's config: the checkpoint's, with neutral changes
    run_dir: Path | None  # where the run continues; None: a new run directory, seeded from the state
    rescheduled: bool  # train.epochs changed: the schedule is rebuilt for the new length
    lock: int | None = None  # the run directory's lock, when taken before loading


def plan_resume(
    given: Config | None,
    overrides: list[str],
    target: str | None,
    console: Console,
    *,
    take_lock: bool = True,
) -> ResumePlan:
    """Which checkpoint a resume continues, where, and with which config. Nothing is written."""
    lookup = given or config_from_dict(apply_overrides({}, overrides), "overrides")
    path = locate_checkpoint(target, lookup)
    run_dir = owning_run(path) if path.is_file() else None
    lock = lock_run_dir(run_dir, create=False) if run_dir is not None and take_lock else None
    try:
        state = load_checkpoint(path, map_location="cpu")
        if "optimizer" not in state:  # a slim export keeps the weights, not the training state
            raise TrainkitError(f"{path}: a slim checkpoint (no optimizer state); resume from last.pt")
        config = resumed_config(state["config"], given, overrides, path)
        done_epochs, saved_epochs = int(state["epoch"]), int(state["config"]["train"]["epochs"])
        if config.train.epochs <= done_epochs and int(state["batch_in_epoch"]) == 0:
            raise TrainkitError(
                f"{path}: the run already finished {done_epochs} epochs; set train.epochs higher to train on"
            )
    except BaseException:
        release_lock(lock)
        raise
    rescheduled = saved_epochs != config.train.epochs
    if rescheduled:
        console.warn(
            f"train.epochs {saved_epochs} -> {config.train.epochs}: the lr schedule is rebuilt "
            f"for {config.train.epochs} epochs and continues from step {state['global_step']}"
        )
    return ResumePlan(path, state, config, run_dir, rescheduled, lock)


# --------------------------------------------------------------------------- one process per run


def lock_run_dir(run_dir: Path, create: bool = True) -> int | None:
    """An exclusive lock on <run>/.lock for as long as the run lasts (released at exit, also on a
    crash). Held by another process: RunLocked naming its pid, nothing touched. Without `create`
    a missing lock file is left missing (→ None): nothing is written before a resume has loaded."""
    import fcntl

    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(run_dir / ".lock", flags, 0o644)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as error:
        raise TrainkitError(f"cannot lock {run_dir}: {error.strerror or error}") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"{run_dir} is in use by process {holder} (one process per run)") from error
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


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
    model_line: str = ""  # what was loaded and what is new, what is frozen
    freezer: Any = None  # trainkit.finetune.FreezeSchedule, or None
    trust_code: bool = False  # the model's own code may be imported (--trust-code)
    data_seconds: float | None = None  # data preparation time (decoding on a first run)
    train_options: Any = None  # config.train with `auto` precision / channels_last made concrete


def build_model_checked(
    spec: dict[str, Any],
    kwargs: dict[str, Any],
    *,
    seed: int,
    device,
    channels_last: bool,
    trust_code: bool = False,
    before_probe: Callable[[torch.nn.Module], None] | None = None,
):
    """Build the model and run it once on a tiny batch: a model that cannot run on the data's
    images, or that has empty layers, is a config error now, not a crash in the first step."""
    from trainkit.models import build_model

    torch.manual_seed(seed)  # the same initial weights whatever data loading drew
    with warnings.catch_warnings():  # an empty layer is reported below, as a config error
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = build_model(spec, trust_code)
    if before_probe is not None:  # model.weights / model.init
        before_probe(model)
    probe_model(model, spec, kwargs)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _blame(spec: dict[str, Any], kwargs: dict[str, Any]) -> str:
    """The dotted paths a model failure points at: the zero-valued arguments, else all of them."""
    zero = [k for k, v in kwargs.items() if v == 0 or (isinstance(v, (list, tuple)) and 0 in v)]
    keys = zero or list(kwargs)
    return ", ".join(f"model.{key}" for key in keys) if keys else "model.name"


def probe_model(model: torch.nn.Module, spec: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """One training-mode forward pass on two blank images; weights, buffers (BatchNorm
    statistics) and RNG states are left exactly as they were."""
    shape = (spec["in_channels"], spec["input_size"], spec["input_size"])
    where, name = _blame(spec, kwargs), spec["name"]
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ConfigError(where, f"{name} has an empty layer ({empty[0]} has no elements)")
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            out = model(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            where, f"{name} cannot run on {'x'.join(map(str, shape))} images ({first}); see data.image_size"
        ) from error
    finally:
        model.load_state_dict(saved)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec["num_classes"]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(where, f"{name} returns {got}, not logits of shape (batch, {spec['num_classes']})")


def model_spec(config: Config, splits) -> dict[str, Any]:
    """What build_model needs (saved in checkpoints): the data fills in what the config leaves unset."""
    from trainkit.models.custom import canonical_name, is_code_reference

    name = config.model.name
    spec = {
        "name": canonical_name(name) if is_code_reference(name) else name,
        "num_classes": config.model.num_classes or len(splits.classes),
        "in_channels": splits.channels,
        "input_size": splits.image_size,
        **config.model.kwargs,
    }
    if spec["num_classes"] < len(splits.classes):
        raise ConfigError("model.num_classes", f"the dataset has {len(splits.classes)} classes")
    return spec


def _batchnorm_drop_last(model, config: Config, size: int, world: int, console: Console) -> bool:
    """BatchNorm cannot train on one sample (per process): a short last batch that would give a
    process fewer than two is dropped each epoch, said once; full batches that small are an error."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    if config.data.batch_size // world < 2:
        raise ConfigError(
            "data.batch_size", f"BatchNorm needs at least 2 samples per process (world {world})"
        )
    last = size % config.data.batch_size
    if not last or last // world >= 2 or size < config.data.batch_size:
        return False
    console.warn(
        f"the last training batch of each epoch ({last} of {size} images) is left out: the model's "
        "BatchNorm layers cannot train on a batch of one"
    )
    return True


def make_sources(config: Config, bundle, *, placement, drop_last: bool = False) -> tuple[Any, Any]:
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
    train = make_source(
        bundle.splits.train, batch_size=config.data.batch_size, shuffle=True, drop_last=drop_last, **common
    )
    val = make_source(bundle.splits.val, batch_size=config.data.eval_batch_size, shuffle=False, **common)
    return train, val


def wrap_for_training(model: torch.nn.Module, config: Config, placement) -> torch.nn.Module:
    """DDP (when distributed), then torch.compile when train.compile: at the start and after an unfreeze."""
    from trainkit.runtime import wrap_model

    wrapped = wrap_model(model, placement)
    return torch.compile(wrapped) if config.train.compile else wrapped


def _build_initialised_model(
    config: Config,
    spec: dict[str, Any],
    *,
    placement,
    trust_code: bool,
    resumed_epoch: int | None,
    channels_last: bool,
) -> tuple[torch.nn.Module, str | None]:
    """→ (the model, seeded and initialised from model.weights / model.init, the line saying how)."""
    from trainkit.runtime import local_main_first
    from trainkit.weights import apply_init

    init_lines = ["weights from the checkpoint being resumed" if resumed_epoch is not None else None]

    def initialise(model) -> None:
        if resumed_epoch is None:  # a resume loads its checkpoint's weights instead
            with local_main_first(placement):  # one download of pretrained weights per node
                init_lines[0] = apply_init(
                    model,
                    config.model.name,
                    config.model.weights,
                    config.model.init,
                    config.model.init_strict,
                    spec["num_classes"],
                )

    model = build_model_checked(
        spec,
        config.model.kwargs,
        seed=config.run.seed,
        device=placement.device,
        channels_last=channels_last,
        trust_code=trust_code,
        before_probe=initialise,
    )
    return model, init_lines[0]


def _build_optimizer_and_freeze(config: Config, model, spec: dict[str, Any], resumed_epoch: int | None):
    """→ (optimizer, names of the frozen parameters, the freeze schedule or None)."""
    from trainkit.finetune import FreezeSchedule, frozen_parameter_names
    from trainkit.optim import build_optimizer
    from trainkit.weights import head_parameter_names

    head = head_parameter_names(model, spec["num_classes"])
    if config.optim.head_lr is not None and not head:
        raise ConfigError("optim.head_lr", "no classifier head found in this model")
    frozen = frozen_parameter_names(model, config.model.freeze, head)
    optimizer = build_optimizer(config.optim, model, head)
    # Frozen after the optimizer is built (it holds every parameter, ready for the unfreeze) and
    # before wrapping: DDP fixes the set of parameters it synchronises when it is built.
    freezer = FreezeSchedule(model, frozen, config.train.unfreeze_epoch) if frozen else None
    if freezer is not None:
        freezer.at_epoch(resumed_epoch or 0)
    return optimizer, frozen, freezer


def build_run(
    config: Config,
    *,
    placement,
    console: Console,
    trust_code: bool = False,
    resumed_epoch: int | None = None,
    resumed_options: dict | None = None,
) -> Built:
    from trainkit.data.pipeline import build_data
    from trainkit.optim import build_loss, build_scheduler
    from trainkit.runtime import local_main_first, resolve_speed_options, seed_everything

    seed_everything(config.run.seed)
    train_options, notes = resolve_speed_options(
        config.train, config.model.name, placement.device, resumed_options
    )
    for note in notes:
        console.warn(note)
    torch.backends.cudnn.benchmark = placement.device.type == "cuda"
    data_cfg = resolve_data_config(config)
    data_began = time.perf_counter()
    with local_main_first(placement):
        bundle = build_data(data_cfg, config.run.seed, console)
    spec = model_spec(config, bundle.splits)
    model, init_line = _build_initialised_model(
        config,
        spec,
        placement=placement,
        trust_code=trust_code,
        resumed_epoch=resumed_epoch,
        channels_last=train_options.channels_last,
    )
    loss_fn = build_loss(config.loss, spec["num_classes"]).to(placement.device)
    optimizer, frozen, freezer = _build_optimizer_and_freeze(config, model, spec, resumed_epoch)
    drop_last = _batchnorm_drop_last(model, config, len(bundle.splits.train), placement.world, console)
    train_source, val_source = make_sources(config, bundle, placement=placement, drop_last=drop_last)
    # all of the wait for data before the first step: both splits' decoding or cache loads
    data_seconds = time.perf_counter() - data_began
    steps_per_epoch = math.ceil(len(train_source) / config.train.grad_accum_steps)
    monitor = Monitor.for_metric(config.train.monitor)
    schedule = build_scheduler(config.sched, optimizer, steps_per_epoch, config.train.epochs, monitor.mode)
    return Built(
        wrap_for_training(model, config, placement),
        spec,
        loss_fn,
        optimizer,
        schedule,
        train_source,
        val_source,
        bundle,
        data_line=_data_line(config, bundle, data_seconds, placement),
        model_line=model_line(config, model, init_line, frozen),
        freezer=freezer,
        trust_code=trust_code,
        data_seconds=data_seconds,
        train_options=train_options,
    )


def model_line(config: Config, model, init_line: str | None, frozen: list[str]) -> str:
    """`weights: …: loaded …; new head …; frozen …` (where the weights came from, what is new)."""
    parts = [init_line or "new, seeded"]
    if frozen:
        count = sum(p.numel() for name, p in model.named_parameters() if name in set(frozen))
        until = config.train.unfreeze_epoch
        parts.append(
            f"frozen: {len(frozen)} tensors ({count / 1e6:.2f}M)"
            + (f" until epoch {until}" if until else " for the whole run")
        )
    return "weights: " + "; ".join(parts)


class Unfreeze(Callback):
    """train.unfreeze_epoch: at each epoch start, model.freeze's state for that epoch; when it
    changes, the DDP / compile wrapper is rebuilt over every parameter."""

    def __init__(self, freezer, rewrap: Callable[[torch.nn.Module], torch.nn.Module], console: Console):
        self.freezer, self.rewrap, self.console = freezer, rewrap, console

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self.freezer.at_epoch(epoch):
            trainer.model = self.rewrap(self.freezer.model)
            count = len(self.freezer.names)
            self.console.say(
                f"epoch {epoch + 1}: {count} frozen parameter tensors now train (train.unfreeze_epoch)"
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
    options = built.train_options or config.train
    extras = {
        "format_version": FORMAT_VERSION,
        "trainkit_version": __version__,
        "config": config.to_dict(),
        "model_spec": built.spec,
        "classes": list(bundle.splits.classes),
        "preprocess": bundle.preprocess.to_dict(),
        # what `auto` became: a resume keeps it (runtime.resolve_speed_options)
        "train_options": {"precision": options.precision, "channels_last": options.channels_last},
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
        train=options,
        placement=placement,
        num_classes=built.spec["num_classes"],
        monitor=Monitor.for_metric(config.train.monitor),
        callbacks=CallbackList(),
        checkpoint_extras=extras,
        console=console,
        handle_signals=handle_signals,
    )


# --------------------------------------------------------------------------- the run


def open_run_dir(
    config: Config, plan: ResumePlan | None, *, placement, console: Console, built: Built
) -> tuple[Path, int | None]:
    """Create (or reopen, for a resume in place) the run directory, lock it, clean up killed
    saves' temp files and write its config: the run's first writes, after everything is built
    and loaded. → (run directory, the lock held by this process or None)."""
    held: list[int | None] = [None]

    def make() -> Path:
        if plan is not None and plan.run_dir is not None:
            held[0] = plan.lock if plan.lock is not None else lock_run_dir(plan.run_dir)
            return plan.run_dir
        run_dir = make_run_dir(config.run.out_dir, config.run.name)
        held[0] = lock_run_dir(run_dir)
        return run_dir

    run_dir = _on_main_then_shared(placement, make)
    if placement.is_main:
        checkpoint_dir = run_dir / "checkpoints"
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(checkpoint_dir)  # under the lock: no live save is touched
        try:  # never through a link planted in the run directory
            atomic_write_text(run_dir / "config.yaml", dump_config(config))
        except OSError as error:
            raise TrainkitError(
                f"cannot write {run_dir / 'config.yaml'}: {error.strerror or error}"
            ) from error
        console.say(f"run directory: {run_dir}")
        console.say(built.data_line)
        console.say(built.model_line)
        if plan is not None and plan.run_dir is None:
            console.say(
                f"{plan.checkpoint} is not a run's checkpoints/last.pt: its state continues in this new "
                "run directory"
            )
    return run_dir, held[0]


def run_callbacks(
    config: Config, run_dir: Path, *, placement, console: Console, started: float, built: Built | None = None
) -> list[Callback]:
    """The run's own callbacks: the checkpoint writer, the reporter, then what a run leaves to
    look at (summary line, TensorBoard images and PR curves, train.log; main process only)."""
    if not placement.is_main:
        return []
    writer = CheckpointWriter(
        run_dir / "checkpoints", top_k=config.train.save_top_k, every_epochs=config.train.save_every_epochs
    )
    num_classes = built.spec["num_classes"] if built is not None else 0
    reporter = Reporter(run_dir, config.log, config.train.epochs, console, started, num_classes)
    if built is None:
        return [writer, reporter]
    from trainkit.insight import RunInsight

    console_log.open(run_dir / "train.log")
    insight = RunInsight(
        run_dir,
        console=console,
        bundle=built.bundle,
        log=config.log,
        seed=config.run.seed,
        writer=reporter.writer,
        data_seconds=built.data_seconds,
        trust_code=built.trust_code,
    )
    return [writer, reporter, insight]


def _with_resolved_data_root(config: Config) -> Config:
    # The data folder is saved resolved, so that eval finds it from any working directory.
    root = os.path.abspath(os.path.expanduser(config.data.root))
    return config.model_copy(update={"data": config.data.model_copy(update={"root": root})})


def run_train(
    config: Config | None,
    *,
    overrides: Iterable[str] = (),
    resume: bool = False,
    resume_path: str | None = None,
    callbacks: Iterable[Callback] = (),
    started: float | None = None,
    handle_signals: bool = True,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Train one run: build → resume → fit → summary. `config` is the YAML's (with `overrides`
    applied); on a resume it may be None: the checkpoint's config, with `overrides`.
    → a summary (run directory, best checkpoint and metric, last metrics)."""
    from trainkit.runtime import is_main_process, resolve_placement, shutdown_distributed

    started = time.perf_counter() if started is None else started
    console_log.begin()  # train.log starts with this run's lines
    plan = None
    if resume:
        main = is_main_process()
        plan = plan_resume(config, list(overrides), resume_path, Console(enabled=main), take_lock=main)
        config = plan.config
    lock = plan.lock if plan is not None else None
    try:
        check_config(config, trust_code)
        config = _with_resolved_data_root(config)
        placement = resolve_placement(config.train.device, config.train.parallel)
        console = Console(enabled=placement.is_main)
        resumed_epoch = int(plan.state["epoch"]) if plan is not None else None
        built = build_run(
            config,
            placement=placement,
            console=console,
            trust_code=trust_code,
            resumed_epoch=resumed_epoch,
            resumed_options=plan.state.get("train_options") if plan is not None else None,
        )
        trainer = make_trainer(
            config, built, placement=placement, console=console, handle_signals=handle_signals
        )
        if plan is not None:
            trainer.load_state(plan.state, new_schedule_length=plan.rescheduled)
            if plan.run_dir is None:  # a new run: its best.pt and top-k are its own epochs'
                trainer.forget_best()
        run_dir, lock = open_run_dir(config, plan, placement=placement, console=console, built=built)
        if plan is not None:
            s = trainer.state
            console.say(f"resumed at epoch {s.epoch + 1}, batch {s.batch_in_epoch}, step {s.global_step}")
        own = run_callbacks(
            config, run_dir, placement=placement, console=console, started=started, built=built
        )
        if built.freezer is not None:
            own.insert(0, Unfreeze(built.freezer, lambda m: wrap_for_training(m, config, placement), console))
        trainer.callbacks.replace([*own, *callbacks])
        trainer.fit()
        shutdown_distributed()
        summary = summarize(run_dir, trainer, console=console)
        for callback in own:  # after the process group is gone: no rank waits on this
            if hasattr(callback, "finish"):
                callback.finish(trainer, config.data)
        return summary
    finally:
        console_log.close()
        release_lock(lock)


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
