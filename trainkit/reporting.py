"""What a run shows and records (main process only): progress, metrics.csv, TensorBoard."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

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


# Only the main process talks (errors still print on every rank, from the CLI).


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)
        console_log.write(message)


def note(message: str) -> None:
    """A side remark (e.g. decoding progress) on stderr, leaving stdout to results."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
        console_log.write(message)


class ConsoleLog:
    """The console lines (say/note) as plain text: kept from the start of the process (a few
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
        self.close()
        import os

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


def warn(message: str) -> None:
    note(f"warning: {message}")


class Reporter:
    """Progress on screen plus metrics.csv and TensorBoard scalars in the run directory.

    A terminal gets rich progress bars; a pipe or file gets a plain line every
    `every_n_steps` steps and one per epoch. A disabled Reporter (other ranks) does nothing.
    """

    def __init__(self, run_dir: Path | None, log: LogConfig, epochs: int, enabled: bool = True, classes=None):
        self.enabled = enabled and run_dir is not None
        self.log, self.epochs, self.run_dir = log, epochs, run_dir
        self.classes = list(classes or [])
        self.writer = None
        self.logged_step = -1  # the global step train/loss and train/lr were last written at
        self.bar = None
        self.first_step_seen = False
        mode = log.progress
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if self.enabled else "none"
        if not self.enabled:
            return
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.csv_path = run_dir / "metrics.csv"

    # ---- per step
    def start_epoch(self, epoch: int, total_batches: int, start_batch: int) -> None:
        self.epoch, self.total_batches = epoch, total_batches
        self.last_print = time.perf_counter()
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn(f"epoch {epoch + 1}/{self.epochs}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total_batches, completed=start_batch, info="")

    def step(self, batch_index: int, global_step: int, loss_fn, lr: float, images_per_s: float) -> None:
        """`loss_fn` returns the running loss; called lazily so most steps never sync."""
        if not self.first_step_seen:
            self.first_step_seen = True
            if self.enabled and self.mode != "none":
                import trainkit

                say(f"first training step {time.perf_counter() - trainkit.STARTED:.1f} s after start")
        if self.mode == "rich":
            info = ""
            if global_step % self.log.every_n_steps == 0:
                info = f"loss {loss_fn():.4f}  lr {lr:.3g}  {images_per_s:,.0f} img/s"
                self.bar.update(self.task, completed=batch_index + 1, info=info)
            else:
                self.bar.update(self.task, completed=batch_index + 1)
        if global_step % self.log.every_n_steps == 0 and self.enabled:
            loss = loss_fn()
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, global_step)
                self.writer.add_scalar("train/lr", lr, global_step)
                self.logged_step = global_step
            if self.mode == "plain":
                say(
                    f"epoch {self.epoch + 1}/{self.epochs}  batch {batch_index + 1}/{self.total_batches}"
                    f"  step {global_step}  loss {loss:.4f}  lr {lr:.3g}  {images_per_s:,.0f} img/s"
                )

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if not self.enabled:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
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
                    continue  # step() wrote this step's point already (same value: the epoch's mean)
                if row.get(key) is not None:
                    group = "train" if key.startswith("train") or key == "images_per_s" else "val"
                    self.writer.add_scalar(
                        f"{group}/{key.split('_', 1)[1] if key != 'images_per_s' else key}", row[key], step
                    )
            self.writer.flush()
        if self.mode != "none":
            parts = [
                f"epoch {row['epoch']}/{self.epochs}",
                f"train_loss {row['train_loss']:.4f}",
                f"train_acc {100 * row['train_accuracy']:.2f}%",
            ]
            if row.get("val_loss") is not None:
                parts += [
                    f"val_loss {row['val_loss']:.4f}",
                    f"val_acc {100 * row['val_accuracy']:.2f}%",
                    f"top5 {100 * row['val_top5']:.2f}%",
                ]
            parts += [f"{row['images_per_s']:,.0f} img/s", f"{row['epoch_seconds']:.1f} s"]
            say("  ".join(parts))

    def evaluated(self, metrics: dict[str, Any], outputs, step: int) -> None:
        """After each evaluation: per-class accuracy and PR curves in TensorBoard."""
        if self.writer is not None:
            from trainkit.insight import log_evaluation

            log_evaluation(self.writer, metrics, outputs, self.classes, step)

    @property
    def wants_outputs(self) -> bool:
        """Should evaluation keep its probabilities (for PR curves)?"""
        return self.writer is not None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value
