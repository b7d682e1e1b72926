"""What a run shows and records (main process only): progress, metrics.csv, TensorBoard."""

from __future__ import annotations

import csv
import errno
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


def note(message: str) -> None:
    """A side remark (e.g. decoding progress) on stderr, leaving stdout to results."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    note(f"warning: {message}")


class Reporter:
    """Progress on screen plus metrics.csv and TensorBoard scalars in the run directory.

    A terminal gets rich progress bars; a pipe or file gets a plain line every
    `every_n_steps` steps and one per epoch. A disabled Reporter (other ranks) does nothing.
    """

    def __init__(self, run_dir: Path | None, log: LogConfig, epochs: int, enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self.log, self.epochs, self.run_dir = log, epochs, run_dir
        self.writer = None
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

            log_dir = run_dir / "tensorboard"
            if log_dir.is_symlink():  # never write event files through a planted link
                raise OSError(errno.ELOOP, "refusing to write through a symbolic link", str(log_dir))
            self.writer = SummaryWriter(log_dir=str(log_dir))
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
        from trainkit.checkpoint import open_append

        new = not self.csv_path.exists()
        with open_append(self.csv_path) as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
        if self.writer is not None:
            step = row["global_step"]
            for key in (
                "train_loss",
                "train_accuracy",
                "val_loss",
                "val_accuracy",
                "val_top5",
                "images_per_s",
            ):
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
