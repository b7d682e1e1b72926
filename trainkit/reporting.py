"""What a run shows and records (main process only): progress, metrics.csv, TensorBoard."""

from __future__ import annotations

import csv
import errno
import sys
import time
from pathlib import Path
from typing import Any

from trainkit.callbacks import Callback, StepInfo
from trainkit.config import LogConfig
from trainkit.runtime import is_main_process

METRIC_COLUMNS = [
    "epoch",
    "global_step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_top5",
    "lr",
    "images_per_s",
    "epoch_seconds",
]


class Console:
    """Where a run talks: results on stdout, remarks and warnings on stderr. The engine makes
    one with `enabled=placement.is_main`, so only the main process talks (errors still print on
    every rank, from the CLI)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)
            console_log.write(message)

    def note(self, message: str) -> None:
        """A side remark (e.g. decoding progress) on stderr, leaving stdout to results."""
        if self.enabled:
            print(message, file=sys.stderr, flush=True)
            console_log.write(message)

    def warn(self, message: str) -> None:
        self.note(f"warning: {message}")


class ConsoleLog:
    """The console lines (say/note/warn) as plain text: kept from the start of a run (a few
    hundred lines, for what is said before the run directory exists), then appended to
    <run>/train.log once `open(path)` is called."""

    KEPT = 500

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.handle = None

    def write(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}\n"
        if self.handle is not None:
            self.handle.write(line)
            self.handle.flush()
        elif len(self.lines) < self.KEPT:
            self.lines.append(line)

    def begin(self) -> None:
        self.close()
        self.lines = []

    def open(self, path: Path) -> None:
        import os

        self.close()
        # O_NOFOLLOW: train.log is never written through a symlink planted in the run directory
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o666)
        self.handle = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
        self.handle.writelines(self.lines)
        self.lines = []

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


console_log = ConsoleLog()


# For code that runs before a run's placement exists (data preparation, the decoded cache):
# the launcher's RANK decides who talks.


def say(message: str) -> None:
    Console(is_main_process()).say(message)


def note(message: str) -> None:
    Console(is_main_process()).note(message)


def warn(message: str) -> None:
    Console(is_main_process()).warn(message)


class Reporter(Callback):
    """Progress on screen plus metrics.csv and TensorBoard scalars in the run directory (a
    callback, given to the main process only).

    A terminal gets rich progress bars; a pipe or file gets a plain line every
    `every_n_steps` steps and one per epoch. `started` (a time.perf_counter() value) is when the
    command started: the first training step is reported relative to it.
    """

    def __init__(
        self,
        run_dir: Path,
        log: LogConfig,
        epochs: int,
        console: Console,
        started: float,
        num_classes: int = 0,
    ):
        self.log, self.epochs, self.run_dir, self.console = log, epochs, run_dir, console
        self.started = started
        self.show_top5 = num_classes > 5  # on 5 classes or fewer top-5 is always 100 %
        self.writer = None
        self.bar = None
        self.first_step_seen = False
        self.logged_step = -1  # the global step train/loss and train/lr were last written at
        mode = log.progress
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = run_dir / "tensorboard"
            if log_dir.is_symlink():  # never write event files through a planted link
                raise OSError(errno.ELOOP, "refusing to write through a symbolic link", str(log_dir))
            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.csv_path = run_dir / "metrics.csv"

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.epoch, self.total_batches = epoch, trainer.batches_per_epoch
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"epoch {epoch + 1}/{self.epochs}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.bar.start()
            start = trainer.state.batch_in_epoch
            self.task = self.bar.add_task("train", total=self.total_batches, completed=start, info="")

    def on_step_end(self, trainer, step: StepInfo) -> None:
        """`step.running_loss` is called only at log points, so most steps never sync."""
        if not self.first_step_seen:
            self.first_step_seen = True
            if self.mode != "none":
                self.console.say(
                    f"first training step {time.perf_counter() - self.started:.1f} s after start"
                )
        due = step.global_step % self.log.every_n_steps == 0
        loss = step.running_loss() if due else None
        if self.mode == "rich":
            info = f"loss {loss:.4f}  lr {step.lr:.3g}  {step.images_per_s:,.0f} img/s" if due else None
            extra = {"info": info} if due else {}
            self.bar.update(self.task, completed=step.batch_index + 1, **extra)
        if not due:
            return
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step.global_step)
            self.writer.add_scalar("train/lr", step.lr, step.global_step)
            self.logged_step = step.global_step
        if self.mode == "plain":
            speed = f"{step.images_per_s:,.0f} img/s"
            self.console.say(
                f"epoch {self.epoch + 1}/{self.epochs}  batch {step.batch_index + 1}/{self.total_batches}"
                f"  step {step.global_step}  loss {loss:.4f}  lr {step.lr:.3g}  {speed}"
            )

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        self._stop_bar()
        self._write_row(row)
        if self.writer is not None:
            step = row["global_step"]
            if self.logged_step != step and row.get("lr") is not None:
                self.writer.add_scalar("train/lr", row["lr"], step)  # epochs shorter than every_n_steps
            for key in (
                "train_loss",
                "train_accuracy",
                "val_loss",
                "val_accuracy",
                "val_top5",
                "images_per_s",
            ):
                if key == "train_loss" and self.logged_step == step:
                    continue  # on_step_end wrote this step's point (the same value: the epoch's mean)
                if row.get(key) is not None:
                    group = "train" if key.startswith("train") or key == "images_per_s" else "val"
                    name = key.split("_", 1)[1] if key != "images_per_s" else key
                    self.writer.add_scalar(f"{group}/{name}", row[key], row["global_step"])
            self.writer.flush()
        if self.mode != "none":
            self.console.say(epoch_line(row, self.epochs, self.show_top5))

    def _write_row(self, row: dict[str, Any]) -> None:
        from trainkit.checkpoint import open_append
        from trainkit.errors import TrainkitError

        new = not self.csv_path.exists()
        try:
            with open_append(self.csv_path) as handle:  # never through a link, never a FIFO
                writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
        except OSError as error:
            raise TrainkitError(f"cannot write {self.csv_path}: {error.strerror or error}") from error

    def _stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def on_teardown(self, trainer) -> None:
        self._stop_bar()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def epoch_line(row: dict[str, Any], epochs: int, show_top5: bool = True) -> str:
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"train_loss {row['train_loss']:.4f}",
        f"train_acc {100 * row['train_accuracy']:.2f}%",
    ]
    if row.get("val_loss") is not None:
        parts += [
            f"val_loss {row['val_loss']:.4f}",
            f"val_acc {100 * row['val_accuracy']:.2f}%",
        ] + ([f"top5 {100 * row['val_top5']:.2f}%"] if show_top5 else [])
    parts += [f"{row['images_per_s']:,.0f} img/s", f"{row['epoch_seconds']:.1f} s"]
    return "  ".join(parts)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value
