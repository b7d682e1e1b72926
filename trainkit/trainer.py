"""The one engine: fit() → run_epoch() → train_one_epoch() → train_step(); evaluate().

The Trainer gets built objects (model, loss, optimizer, schedule, batch sources, transforms, the
monitor) and the train section; it never sees the whole config. Checkpoint writes, logging and
progress are callbacks (trainkit.callbacks) fired at marked points of the loop.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainkit.callbacks import CallbackList, StepInfo
from trainkit.config import TrainConfig
from trainkit.data.loader import Batch, BatchSource
from trainkit.errors import Interrupted, NonFiniteLoss
from trainkit.monitor import Monitor
from trainkit.optim import load_optimizer_state
from trainkit.reporting import Console
from trainkit.runtime import Placement, rng_state, set_rng_state, unwrap_model

__all__ = ["Interrupted", "NonFiniteLoss", "TrainState", "Trainer", "evaluate"]


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or the next one)
    batch_in_epoch: int = 0  # batches of `epoch` already trained (resume point)
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_evals: int = 0  # evaluations since the monitored metric last improved
    last_metrics: dict[str, Any] = field(default_factory=dict)


class EpochTotals:
    """This process's running sums over the epoch's training batches. A checkpoint taken
    mid-epoch carries them (summed over processes), so that the resumed epoch's metrics.csv row
    is the uninterrupted one's.

    Each micro-batch's detached loss, scores and labels are held and summed a chunk at a time
    (`reduce`): summed per batch, the five small ops (argmax, compare, count, two adds) ran
    after the backward and the update had pushed their code and data out of cache and cost
    3-5x their warm time each (CPU, MLP: ~75 us of a 2.4 ms step); a chunk of up to
    REDUCE_BATCHES batches takes a dozen ops. The reduction also finds the first non-finite
    loss, with its step, for the trainer's stop rule (on an accelerator: one host sync per
    chunk, not one per step)."""

    REDUCE_BATCHES = 32
    REDUCE_ELEMENTS = 2**20  # or this many held scores (4 MB of float32), whichever comes first

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None, ddp: bool = False):
        saved = saved or {}
        self.loss_sum = torch.tensor(float(saved.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        self.correct = torch.tensor(int(saved.get("correct", 0)), dtype=torch.int64, device=device)
        self.seen = int(saved.get("seen", 0))
        self.seconds = float(saved.get("seconds", 0.0))  # before this process took over
        self.steps = self.skipped = 0  # optimizer steps taken / skipped here (not saved)
        self.ddp = ddp
        self.added = 0  # batches added by this process: the same count on every rank
        self.held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.held_elements = 0
        self.found: tuple[float, int] | None = None  # (loss, step) of this process's first non-finite loss
        # The run's first non-finite loss, the one the stop rule acts on: this process's own, or
        # under DDP the earliest over all processes once they have compared (`share`), so that
        # every rank stops at the same point, with the same message, and none saves without knowing.
        self.nonfinite: tuple[float, int] | None = None

    def add(self, loss: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        """loss () the batch's mean (detached), scores (b, K) detached, labels (b,), and the
        optimizer step (counted from 1) the batch is part of."""
        self.held.append((loss, scores, labels, step))
        self.added += 1
        self.seen += labels.shape[0]
        self.held_elements += scores.numel()
        if len(self.held) >= self.REDUCE_BATCHES or self.held_elements >= self.REDUCE_ELEMENTS:
            self.reduce()
        # When to compare depends only on the batch count, never on what this rank holds (a
        # log point's running_loss, on the main process only, reduces early there).
        if self.ddp and self.added % self.REDUCE_BATCHES == 0:
            self.share()

    def reduce(self) -> None:
        """The held batches into the sums (this process only: no collective)."""
        if not self.held:
            return
        losses, scores, labels, steps = zip(*self.held)
        self.held, self.held_elements = [], 0
        losses = torch.stack(losses).double()  # (n,) batch means
        sizes = torch.tensor([len(y) for y in labels], dtype=torch.float64).to(losses.device)
        self.loss_sum += torch.dot(losses, sizes)
        labels = torch.cat(labels)  # (sum b,)
        self.correct += (torch.cat(scores).argmax(1) == labels).sum()
        finite = torch.isfinite(losses)
        if self.found is None and not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            self.found = (float(losses[first]), steps[first])
            if not self.ddp:
                self.nonfinite = self.found

    def share(self) -> None:
        """Under DDP, the earliest first non-finite loss over all processes (by step; a
        collective: every rank calls it at the same points)."""
        self.reduce()
        if not self.ddp:
            return
        loss, step = self.found if self.found is not None else (0.0, math.inf)
        mine = torch.tensor([step, loss], dtype=torch.float64, device=self.loss_sum.device)
        everyone = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(everyone, mine)
        step, loss = min((tuple(found.tolist()) for found in everyone), key=lambda found: found[0])
        if step != math.inf:
            self.nonfinite = (loss, int(step))

    def running_loss(self) -> float:
        self.reduce()
        return float(self.loss_sum) / max(self.seen, 1)

    def summed(self) -> tuple[float, float, float]:
        """(loss sum, correct, seen) over all processes (collectives under DDP), after which
        every rank knows the run's first non-finite loss."""
        self.share()
        seen = self.loss_sum.new_tensor(float(self.seen))
        stats = torch.stack([self.loss_sum, self.correct.double(), seen])
        if self.ddp:
            torch.distributed.all_reduce(stats)
        loss_sum, correct, seen = stats.tolist()
        return loss_sum, correct, seen

    def to_dict(self, elapsed: float) -> dict[str, Any]:
        loss_sum, correct, seen = self.summed()
        seconds = self.seconds + elapsed
        return {"loss_sum": loss_sum, "correct": int(correct), "seen": int(seen), "seconds": seconds}


def autocast_for(device: torch.device, precision: str):
    if precision == "32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    source: BatchSource,
    transform: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: nn.Module,
    num_classes: int,
    precision: str = "32",
    outputs: list | None = None,
) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy over a batch source (summed over ranks).
    `outputs`, when a list, gets this process's (probabilities (b, K), labels (b,)) on the CPU."""
    model.eval()
    device = source.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5
    class_total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    k = min(5, num_classes)
    for batch in source.epoch(0):
        labels = batch.labels
        if labels.shape[0] == 0:  # an empty share of a short last batch (DDP)
            continue
        with autocast_for(device, precision):
            logits = model(transform(batch.images))  # (b, K)
        logits = logits.float()
        loss_sum += loss_fn(logits, labels).double() * labels.shape[0]
        ranked = logits.topk(k, dim=1).indices  # (b, k)
        hit1 = ranked[:, 0] == labels
        hits[0] += hit1.sum()
        hits[1] += (ranked == labels[:, None]).any(dim=1).sum()
        class_total += torch.bincount(labels, minlength=num_classes)
        class_correct += torch.bincount(labels[hit1], minlength=num_classes)
        if outputs is not None and len(outputs) * labels.shape[0] * num_classes < 20_000_000:  # PR-curve cap
            outputs.append((logits.softmax(dim=1).cpu(), labels.cpu()))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        packed = torch.cat([loss_sum.view(1), hits.double(), class_total.double(), class_correct.double()])
        torch.distributed.all_reduce(packed)
        loss_sum, hits = packed[0], packed[1:3].long()
        class_total, class_correct = packed[3 : 3 + num_classes].long(), packed[3 + num_classes :].long()
    count = int(class_total.sum())
    per_class = (class_correct.double() / class_total.clamp_min(1).double()).tolist()
    return {
        "loss": float(loss_sum) / max(count, 1),
        "accuracy": int(hits[0]) / max(count, 1),
        "top5": int(hits[1]) / max(count, 1),
        "num_samples": count,
        "per_class": per_class,
        "per_class_count": class_total.tolist(),
    }


class StopRequests:
    """SIGINT / SIGTERM during a run. The first asks for a stop at the next step boundary (where
    the checkpoint is saved); a second Ctrl-C leaves at once, or, while files are being written
    (a KeyboardInterrupt inside torch.save breaks the file off), as soon as the write is done."""

    def __init__(self, console: Console):
        self.console = console
        self.signum: int | None = None
        self.in_write = False
        self.leave_after_write = False

    def install(self):
        """The handlers, for the run only (main thread); → the previous ones, for restore()."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        return {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self, previous) -> None:
        for sig, old in (previous or {}).items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            if self.in_write:
                self.leave_after_write = True
                return
            raise KeyboardInterrupt  # second Ctrl-C: leave now
        self.signum = signum
        self.console.warn(f"{signal.Signals(signum).name}: saving at the next step boundary")

    @contextmanager
    def writing(self):
        self.in_write = True
        try:
            yield
        finally:
            self.in_write = False
        if self.leave_after_write:
            raise Interrupted(signal.SIGINT)


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule,
        train_source: BatchSource,
        val_source: BatchSource,
        train_transform,
        eval_transform,
        train: TrainConfig,
        placement: Placement,
        num_classes: int,
        monitor: Monitor,
        callbacks: CallbackList,
        checkpoint_extras: dict[str, Any],
        console: Console,
        handle_signals: bool = True,
    ):
        self.model, self.loss_fn, self.optimizer, self.schedule = model, loss_fn, optimizer, schedule
        self.train_source, self.val_source = train_source, val_source
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.cfg, self.placement, self.num_classes = train, placement, num_classes
        self.monitor, self.callbacks, self.console = monitor, callbacks, console
        self.checkpoint_extras = checkpoint_extras  # config, spec, classes, preprocess (plain)
        self.handle_signals = handle_signals
        self.device = placement.device
        self.ddp = placement.parallel == "ddp"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.state = TrainState()
        self.sizes = train_source.global_sizes()  # global batch sizes of an epoch
        self.totals = EpochTotals(self.device, ddp=self.ddp)
        self.saved_totals: dict[str, Any] | None = None  # what a mid-epoch checkpoint carries
        self.epoch_began = time.perf_counter()
        self.stops = StopRequests(console)
        self.callback_states: dict[str, Any] = {}
        self.keep_eval_outputs = False  # a callback asks for the probabilities (PR curves)
        self.last_evaluation: dict[str, Any] | None = None  # for callbacks at epoch_end

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sizes)

    # ------------------------------------------------------------------ the step

    def train_step(self, batch: Batch, window_total: int, should_step: bool):
        """One micro-batch: forward, loss / accumulation weight, backward, then maybe step."""
        x = self.train_transform(batch.images, batch.positions)  # (b, C, H, W) float
        labels = batch.labels
        # With train.channels_last only the model is in that layout: its first convolution takes
        # the (b, C, H, W) batch as it is. Converting the batch first (a 3-channel permute-copy)
        # cost more than it saved on CPU: LeNet 1.19x vs 1.32x over float32 NCHW.
        no_sync = self.ddp and not should_step
        with self.model.no_sync() if no_sync else nullcontext():
            with autocast_for(self.device, self.cfg.precision):
                logits = self.model(x)  # (b, K)
            scores = logits.float()  # (b, K) float32 (a no-op without autocast)
            if labels.shape[0]:
                loss = self.loss_fn(scores, labels)  # mean over this process's b samples
            else:  # an empty share of a short last batch: no loss, but still in DDP's all-reduce
                loss = scores.sum() * 0.0
            self.totals.add(loss.detach(), scores.detach(), labels, self.state.global_step + 1)
            self._check_loss()
            # Weighted so the window's gradient is the mean over all of its samples on all
            # ranks (DDP averages over ranks, hence × world), whatever the batch sizes.
            weight = labels.shape[0] * self.placement.world / window_total
            self.scaler.scale(loss * weight if weight != 1 else loss).backward()

        if should_step:
            if self.cfg.on_nonfinite == "skip" and not self._gradients_finite():
                self.optimizer.zero_grad(set_to_none=True)  # the whole window's gradients
                self.totals.skipped += 1
                step = self.state.global_step + 1
                epoch = self.state.epoch + 1
                self.console.warn(f"non-finite loss at epoch {epoch} step {step}; step skipped")
                return loss.detach(), logits.detach()
            if self.cfg.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            self.state.global_step += 1
            self.totals.steps += 1
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
        k, total = self.cfg.grad_accum_steps, len(self.sizes)
        start = self.state.batch_in_epoch
        self.model.train()
        self.train_transform.start_epoch(epoch, self.train_source.size, self.device)
        self.callbacks.fire("epoch_start", self, epoch)
        self.epoch_began = time.perf_counter()
        for index, batch in enumerate(self.train_source.epoch(epoch, start), start):
            window = index - index % k  # first batch of this accumulation window
            window_sizes = self.sizes[window : min(window + k, total)]
            should_step = index == window + len(window_sizes) - 1
            self.train_step(batch, sum(window_sizes), should_step)
            if should_step:
                self.state.batch_in_epoch = index + 1
                self._after_step(index)
        seconds = self.totals.seconds + time.perf_counter() - self.epoch_began
        loss_sum, correct, seen = self.totals.summed()
        self._check_loss()
        return {
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "images_per_s": seen / max(seconds, 1e-9),
            "epoch_seconds": seconds,
        }

    def _check_loss(self) -> None:
        """The stop rule for a non-finite loss, as soon as the epoch's totals have seen it (they
        check each chunk of batches they sum: at most EpochTotals.REDUCE_BATCHES steps late, and
        always before anything is saved: the epoch's end and a mid-epoch save sum them first).
        Under DDP the ranks compare at those points, so all of them stop together, naming the
        earliest step any of them found."""
        found = self.totals.nonfinite
        if found is not None and self.cfg.on_nonfinite == "stop":
            loss, step = found
            raise NonFiniteLoss(
                f"non-finite loss ({loss}) at epoch {self.state.epoch + 1}, step {step}; "
                "stopped without saving (lower optim.lr, set train.clip_grad_norm, or "
                "train.on_nonfinite=skip)"
            )

    def _after_step(self, index: int) -> None:
        elapsed = self.totals.seconds + time.perf_counter() - self.epoch_began
        step = StepInfo(
            batch_index=index,
            batches_per_epoch=len(self.sizes),
            global_step=self.state.global_step,
            running_loss=self.totals.running_loss,
            lr=self.schedule.lr(),
            images_per_s=self.totals.seen * self.placement.world / max(elapsed, 1e-9),
        )
        self.callbacks.fire("step_end", self, step)
        if self._stop_agreed():  # marked point: save and leave on a signal
            self._save_and_leave()

    # ------------------------------------------------------------------ the run

    def fit(self) -> TrainState:
        previous = self.stops.install() if self.handle_signals else None
        try:
            self.callbacks.load_state_dict(self.callback_states)
            self.callbacks.fire("fit_start", self)
            while self.state.epoch < self.cfg.epochs:
                self.run_epoch()
                stop = self.cfg.patience is not None and self.state.bad_evals >= self.cfg.patience
                if stop and self.state.epoch < self.cfg.epochs:  # after the last epoch nothing is stopped
                    patience, name = self.cfg.patience, self.monitor.name
                    self.console.say(f"early stopping: {name} did not improve for {patience} evaluations")
                    break
            self.callbacks.fire("fit_end", self)
        finally:
            self.stops.restore(previous)
            self.callbacks.fire("teardown", self)
        return self.state

    def run_epoch(self) -> dict[str, Any]:
        """Train one epoch, evaluate when due, step the plateau schedule, fire epoch_end."""
        epoch = self.state.epoch
        row = self.train_one_epoch(epoch)
        self._require_progress(epoch)
        self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
        self.totals, self.saved_totals = EpochTotals(self.device, ddp=self.ddp), None
        if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs:
            metrics = self.run_evaluation()
            row.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"], val_top5=metrics["top5"])
            value = self.monitor.value(row)
            self.schedule.step_eval(value)  # plateau: once per evaluation
            self._update_best(value)
        row.update(epoch=epoch + 1, global_step=self.state.global_step, lr=self.schedule.lr())
        self.state.last_metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        with self.stops.writing():  # marked point: checkpoints, metrics.csv, TensorBoard, progress
            self.callbacks.fire("epoch_end", self, row)
        if self._stop_agreed(force=True):
            self._leave()
        return row

    def _require_progress(self, epoch: int) -> None:
        if self.totals.skipped and not self.totals.steps:
            raise NonFiniteLoss(
                f"every optimizer step of epoch {epoch + 1} was skipped (non-finite loss): nothing is "
                "being learned; stopped (check loss.weight, lower optim.lr or set train.clip_grad_norm)"
            )

    def run_evaluation(self) -> dict[str, Any]:
        # Under DDP the plain module evaluates: each rank its own shard, no collective in the
        # forward (buffer broadcasts would hang when ranks have unequal numbers of batches).
        model = unwrap_model(self.model) if self.ddp else self.model
        outputs = [] if self.keep_eval_outputs else None
        source, transform = self.val_source, self.eval_transform
        metrics = evaluate(
            model, source, transform, self.loss_fn, self.num_classes, self.cfg.precision, outputs
        )
        if outputs is not None:
            metrics["outputs"] = outputs
        self.last_evaluation = metrics
        return metrics

    def _update_best(self, value: float) -> bool:
        if self.monitor.is_better(value, self.state.best_metric):
            self.state.best_metric, self.state.best_epoch, self.state.bad_evals = value, self.state.epoch, 0
            return True
        self.state.bad_evals += 1
        return False

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
            "monitor": self.monitor.name,
            "metrics": dict(s.last_metrics),
            "epoch_totals": dict(self.saved_totals or {}),
            "callbacks": self.callbacks.state_dict(),
            "rng": rng_state(),
        }

    def load_state(self, state: dict[str, Any], new_schedule_length: bool = False) -> None:
        """Everything a checkpoint holds back into the model, optimizer, schedule, scaler, RNGs,
        callbacks and the position in the run."""
        unwrap_model(self.model).load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
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
        # the sums of the epoch's batches before the save, counted once: on the main process
        saved = state.get("epoch_totals") if self.placement.is_main and self.state.batch_in_epoch else None
        self.totals = EpochTotals(self.device, saved, ddp=self.ddp)
        self.callback_states = dict(state.get("callbacks") or {})  # given to the callbacks at fit()
        set_rng_state(state["rng"])

    def forget_best(self) -> None:
        """Start the best-metric bookkeeping afresh (a new run seeded from another's state)."""
        self.state.best_metric, self.state.best_epoch, self.state.bad_evals = None, None, 0
        self.callback_states.pop("checkpoint_writer", None)

    # ------------------------------------------------------------------ signals

    def _stop_agreed(self, force: bool = False) -> bool:
        """Has any rank been asked to stop? Under DDP every rank must leave at the same step,
        so the flag is all-reduced: each step on CPU, every 25 steps on GPUs (it syncs the host)."""
        if not self.ddp:
            return self.stops.signum is not None
        if not force and self.device.type != "cpu" and self.state.global_step % 25:
            return False
        flag = torch.tensor([self.stops.signum or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and self.stops.signum is None:
            self.stops.signum = signum  # another rank's signal: leave with its exit code too
        return bool(signum)

    def _save_and_leave(self) -> None:
        elapsed = time.perf_counter() - self.epoch_began
        self.saved_totals = self.totals.to_dict(elapsed)  # collectives under DDP
        self._check_loss()
        with self.stops.writing():
            self.callbacks.fire("interrupt", self)
        self._leave()

    def _leave(self) -> None:
        if self.ddp:
            torch.distributed.barrier()  # no rank exits (and gets the others killed) mid-save
        raise Interrupted(self.stops.signum)
