"""The one engine: fit() → train_one_epoch() → train_step(); evaluate().

The Trainer gets built objects (model, loss, optimizer, schedule, batch sources, transform)
and the train section; it never sees the whole config. Checkpoint writes, logging and progress
are named helpers called at marked points of the loop.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.checkpoint import save_checkpoint
from trainkit.config import TrainConfig
from trainkit.errors import TrainkitError
from trainkit.reporting import Reporter, say, warn
from trainkit.runtime import Placement, rng_state, set_rng_state, unwrap_model


class NonFiniteLoss(TrainkitError):
    pass


class Interrupted(Exception):
    """Raised at a step boundary after SIGINT/SIGTERM, once the checkpoint is saved."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or the next one)
    batch_in_epoch: int = 0  # batches of `epoch` already trained (resume point)
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_evals: int = 0  # evaluations since the monitored metric last improved
    last_metrics: dict[str, Any] = field(default_factory=dict)


def autocast_for(device: torch.device, precision: str):
    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    source,
    transform: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: nn.Module,
    num_classes: int,
    precision: str = "32",
) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy over a batch source (summed over ranks)."""
    model.eval()
    device = source.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    class_total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    k = min(5, num_classes)
    for images, labels, _ in source.epoch(0):
        if labels.shape[0] == 0:  # an empty share of a short last batch (DDP)
            continue
        with autocast_for(device, precision):
            logits = model(transform(images))  # (b, K)
        logits = logits.float()
        loss_sum += loss_fn(logits, labels).double() * labels.shape[0]
        ranked = logits.topk(k, dim=1).indices  # (b, k)
        hit1 = ranked[:, 0] == labels
        top1 += hit1.sum()
        top5 += (ranked == labels[:, None]).any(dim=1).sum()
        class_total += torch.bincount(labels, minlength=num_classes)
        class_correct += torch.bincount(labels[hit1], minlength=num_classes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        packed = torch.cat(
            [
                loss_sum.view(1),
                top1.view(1).double(),
                top5.view(1).double(),
                class_total.double(),
                class_correct.double(),
            ]
        )
        torch.distributed.all_reduce(packed)
        loss_sum, top1, top5 = packed[0], packed[1].long(), packed[2].long()
        class_total = packed[3 : 3 + num_classes].long()
        class_correct = packed[3 + num_classes :].long()
    count = int(class_total.sum())
    per_class = (class_correct.double() / class_total.clamp_min(1).double()).tolist()
    return {
        "loss": float(loss_sum) / max(count, 1),
        "accuracy": int(top1) / max(count, 1),
        "top5": int(top5) / max(count, 1),
        "num_samples": count,
        "per_class": per_class,
        "per_class_count": class_total.tolist(),
    }


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule,
        train_source,
        val_source,
        train_transform,
        eval_transform,
        train: TrainConfig,
        placement: Placement,
        num_classes: int,
        reporter: Reporter,
        checkpoint_dir: Path | None,
        checkpoint_extras: dict[str, Any],
    ):
        self.model, self.loss_fn, self.optimizer, self.schedule = model, loss_fn, optimizer, schedule
        self.train_source, self.val_source = train_source, val_source
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.cfg, self.placement, self.num_classes = train, placement, num_classes
        self.reporter, self.checkpoint_dir = reporter, checkpoint_dir
        self.checkpoint_extras = checkpoint_extras  # config, spec, classes, preprocess (plain)
        self.device = placement.device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.state = TrainState()
        self.sizes = train_source.global_sizes()  # global batch sizes of an epoch
        self.stop_signal: int | None = None
        self.monitor_mode = "min" if train.monitor == "val_loss" else "max"

    # ------------------------------------------------------------------ the step

    def train_step(self, images, labels, positions, window_total: int, should_step: bool):
        """One micro-batch: forward, loss / accumulation weight, backward, then maybe step."""
        p = self.placement
        x = self.train_transform(images, positions)  # (b, C, H, W) float
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        no_sync = p.parallel == "ddp" and not should_step
        with self.model.no_sync() if no_sync else nullcontext():
            with autocast_for(self.device, self.cfg.precision):
                logits = self.model(x)  # (b, K)
            if labels.shape[0]:
                loss = self.loss_fn(logits.float(), labels)  # mean over this process's b samples
            else:  # an empty share of a short last batch: no loss, but still in DDP's all-reduce
                loss = logits.float().sum() * 0.0
            # Weighted so the window's gradient is the mean over all of its samples on all
            # ranks (DDP averages over ranks, hence × world), whatever the batch sizes.
            weight = labels.shape[0] * p.world / window_total
            self.scaler.scale(loss * weight).backward()

        if should_step:
            if self.cfg.on_nonfinite == "skip" and not self._gradients_finite():
                self.optimizer.zero_grad(set_to_none=True)  # the whole window's gradients
                step = self.state.global_step + 1
                warn(f"non-finite loss at epoch {self.state.epoch + 1} step {step}; step skipped")
                return loss.detach(), logits.detach()
            if self.cfg.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            self.state.global_step += 1
        return loss.detach(), logits.detach()

    def _gradients_finite(self) -> bool:
        """After the backward of a window: are all gradients finite? The gradients (unlike each
        micro-batch's loss) cover the whole window and, under DDP, are the same on every rank, so
        all ranks skip together. fp16's GradScaler skips inf steps by itself."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.scaler.is_enabled() or not grads:
            return True
        return bool(torch.stack([g.isfinite().all() for g in grads]).all())

    # ------------------------------------------------------------------ the epoch

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        k = self.cfg.grad_accum_steps
        start = self.state.batch_in_epoch
        total = len(self.sizes)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        self.train_transform.start_epoch(epoch, self.train_source.size, self.device)
        self.reporter.start_epoch(epoch, total, start)
        began = time.perf_counter()
        for index, (images, labels, global_size) in enumerate(self.train_source.epoch(epoch, start), start):
            window = index - index % k  # first batch of this accumulation window
            window_sizes = self.sizes[window : min(window + k, total)]
            should_step = index == window + len(window_sizes) - 1
            first = index * self.train_source.batch_size  # this global batch's place in the epoch
            positions = torch.arange(
                first + self.placement.rank, first + global_size, self.placement.world, device=self.device
            )  # (b,) this rank's rows
            loss, logits = self.train_step(images, labels, positions, sum(window_sizes), should_step)

            loss_sum += loss.double() * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.shape[0]
            # Reading the loss syncs an accelerator, so there it is checked at log points only;
            # save_checkpoints() refuses non-finite weights whatever happens in between.
            check = self.device.type == "cpu" or (
                should_step and self.state.global_step % self.reporter.log.every_n_steps == 0
            )
            if self.cfg.on_nonfinite == "stop" and check and not math.isfinite(float(loss)):
                raise NonFiniteLoss(
                    f"non-finite loss ({float(loss)}) at epoch {epoch + 1}, step {self.state.global_step}; "
                    "stopped without saving (lower optim.lr, set train.clip_grad_norm, or "
                    "train.on_nonfinite=skip)"
                )
            if should_step:
                self.state.batch_in_epoch = index + 1
                elapsed = time.perf_counter() - began
                self.reporter.step(
                    index,
                    self.state.global_step,
                    lambda total=loss_sum, count=seen: float(total) / max(count, 1),
                    self.schedule.lr(),
                    seen * self.placement.world / max(elapsed, 1e-9),
                )
                if self._stop_agreed():  # marked point: save and leave on a signal
                    self._save_and_leave()
        seconds = time.perf_counter() - began
        stats = torch.stack(
            [loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=self.device)]
        )
        if self.placement.parallel == "ddp":
            torch.distributed.all_reduce(stats)
        return {
            "train_loss": float(stats[0] / stats[2].clamp_min(1)),
            "train_accuracy": float(stats[1] / stats[2].clamp_min(1)),
            "images_per_s": float(stats[2]) / max(seconds, 1e-9),
            "epoch_seconds": seconds,
        }

    # ------------------------------------------------------------------ the run

    def fit(self) -> TrainState:
        epochs = self.cfg.epochs
        previous = self._install_signal_handlers()
        try:
            while self.state.epoch < epochs:
                epoch = self.state.epoch
                row = self.train_one_epoch(epoch)
                self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
                last_epoch = epoch + 1 == epochs
                improved = False
                if (epoch + 1) % self.cfg.eval_every == 0 or last_epoch:
                    metrics = self.run_evaluation()
                    row.update(
                        val_loss=metrics["loss"], val_accuracy=metrics["accuracy"], val_top5=metrics["top5"]
                    )
                    improved = self._update_best(metrics)
                row.update(epoch=epoch + 1, global_step=self.state.global_step, lr=self.schedule.lr())
                self.state.last_metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
                self.save_checkpoints(improved)  # marked point: checkpoint writes
                self.reporter.end_epoch(row)  # marked point: metrics.csv, TensorBoard, progress
                if self._stop_agreed(force=True):
                    self._leave()
                if self.cfg.patience is not None and self.state.bad_evals >= self.cfg.patience:
                    patience = self.cfg.patience
                    say(f"early stopping: {self.cfg.monitor} did not improve for {patience} evaluations")
                    break
        finally:
            self._restore_signal_handlers(previous)
            self.reporter.close()
        return self.state

    def run_evaluation(self) -> dict[str, Any]:
        # Under DDP the plain module evaluates: each rank its own shard, no collective in the
        # forward (buffer broadcasts would hang when ranks have unequal numbers of batches).
        model = unwrap_model(self.model) if self.placement.parallel == "ddp" else self.model
        metrics = evaluate(
            model, self.val_source, self.eval_transform, self.loss_fn, self.num_classes, self.cfg.precision
        )
        metric = {
            "val_accuracy": metrics["accuracy"],
            "val_loss": metrics["loss"],
            "val_top5": metrics["top5"],
        }[self.cfg.monitor]
        self.schedule.step_eval(metric)
        return metrics

    def _update_best(self, metrics: dict[str, Any]) -> bool:
        value = {
            "val_accuracy": metrics["accuracy"],
            "val_loss": metrics["loss"],
            "val_top5": metrics["top5"],
        }[self.cfg.monitor]
        best = self.state.best_metric
        better = best is None or (value < best if self.monitor_mode == "min" else value > best)
        if better:
            self.state.best_metric, self.state.best_epoch, self.state.bad_evals = value, self.state.epoch, 0
        else:
            self.state.bad_evals += 1
        return better

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        s = self.state
        return {
            **self.checkpoint_extras,
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": s.epoch,
            "batch_in_epoch": s.batch_in_epoch,
            "global_step": s.global_step,
            "best_metric": s.best_metric,
            "best_epoch": s.best_epoch,
            "bad_evals": s.bad_evals,
            "monitor": self.cfg.monitor,
            "metrics": dict(s.last_metrics),
            "rng": rng_state(),
        }

    def save_checkpoints(self, improved: bool) -> None:
        """last.pt always, best.pt when the monitored metric improved (main process only)."""
        if self.checkpoint_dir is None or not self.placement.is_main:
            return
        state = self.checkpoint_state()
        for value in state["model"].values():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteLoss("model weights are not finite; refusing to write a checkpoint")
        last = self.checkpoint_dir / "last.pt"
        save_checkpoint(state, last)
        if improved:
            link_or_copy(last, self.checkpoint_dir / "best.pt")

    def load_state(self, state: dict[str, Any], new_schedule_length: bool = False) -> None:
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if new_schedule_length:  # train.epochs changed: the lr schedule was built for the new length
            self.schedule.fast_forward(state["scheduler"])
        else:
            self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(
            epoch=int(state["epoch"]),
            batch_in_epoch=int(state["batch_in_epoch"]),
            global_step=int(state["global_step"]),
            best_metric=state.get("best_metric"),
            best_epoch=state.get("best_epoch"),
            bad_evals=int(state.get("bad_evals", 0)),
            last_metrics=dict(state.get("metrics") or {}),
        )
        set_rng_state(state["rng"])

    # ------------------------------------------------------------------ signals

    def _stop_agreed(self, force: bool = False) -> bool:
        """Has any rank been asked to stop? Under DDP every rank must leave at the same step,
        so the flag is all-reduced: each step on CPU, every 25 steps on GPUs (it syncs the host)."""
        if self.placement.parallel != "ddp":
            return self.stop_signal is not None
        if not force and self.device.type != "cpu" and self.state.global_step % 25:
            return False
        flag = torch.tensor([self.stop_signal or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and self.stop_signal is None:
            self.stop_signal = signum  # another rank's signal: leave with its exit code too
        return bool(signum)

    def _save_and_leave(self) -> None:
        self.save_checkpoints(improved=False)
        if self.placement.is_main and self.checkpoint_dir is not None:
            say(
                f"saved {self.checkpoint_dir / 'last.pt'} at epoch {self.state.epoch + 1}, "
                f"step {self.state.global_step}; continue with --resume"
            )
        self._leave()

    def _leave(self) -> None:
        if self.placement.parallel == "ddp":
            torch.distributed.barrier()  # no rank exits (and gets the others killed) mid-save
        raise Interrupted(self.stop_signal)

    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: leave now
            self.stop_signal = signum
            if self.placement.is_main:
                warn(f"{signal.Signals(signum).name}: saving at the next step boundary")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self, previous) -> None:
        for sig, old in (previous or {}).items():
            signal.signal(sig, old)


def link_or_copy(source: Path, target: Path) -> None:
    """Point `target` at `source`'s current bytes atomically. A hard link shares the inode, and
    the next save of `source` replaces its inode, so `target` keeps this version."""
    from trainkit.checkpoint import temp_path_for

    tmp = temp_path_for(target)  # unguessable; os.link creates it exclusively
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network filesystems): a full copy
            import shutil

            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise TrainkitError(f"could not save checkpoint {target}: {error.strerror or error}") from None
