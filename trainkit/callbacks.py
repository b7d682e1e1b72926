"""The engine's extension point: a small list of callbacks with a few named events.

`Trainer.fit` calls, in this order and on every process (a callback that writes files is only
given to the main process):

    fit_start → (epoch_start → step_end… → epoch_end)… → fit_end → teardown

`interrupt` replaces the rest when a SIGINT/SIGTERM stops the run at a step boundary (the
checkpoint writer saves `last.pt` there); `teardown` always comes last, also after an error.
Each method gets the Trainer (its `state`, `model`, `optimizer`, `schedule`, `monitor`) and may
read anything; a callback that needs its own state in checkpoints sets `state_key` and
implements `state_dict` / `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as `step_end` sees it."""

    batch_index: int  # index of the global batch that completed the step, in its epoch
    batches_per_epoch: int
    global_step: int
    running_loss: Callable[[], float]  # mean train loss of the epoch so far (syncs a GPU: call sparingly)
    lr: float
    images_per_s: float


class Callback:
    """Override the events you need; every method is optional."""

    state_key: str | None = None  # set to keep this callback's state in checkpoints

    def on_fit_start(self, trainer) -> None: ...

    def on_epoch_start(self, trainer, epoch: int) -> None: ...

    def on_step_end(self, trainer, step: StepInfo) -> None: ...

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        """After the epoch's evaluation; `row` is its metrics.csv row (epoch counts from 1)."""

    def on_interrupt(self, trainer) -> None:
        """A stop was requested; the state is at a step boundary and the run leaves next."""

    def on_fit_end(self, trainer) -> None:
        """The run completed (its last epoch or an early stop); best.pt and last.pt exist."""

    def on_teardown(self, trainer) -> None:
        """Always last, also after an error or an interruption: release what you hold."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackList:
    """Calls one event on every callback, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def replace(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks[:] = list(callbacks)

    def fire(self, event: str, trainer, *args: Any) -> None:
        # Looked up at each event (a handler may be added or set at any time); the base class's
        # no-op is not called: step_end fires every step.
        name = f"on_{event}"
        inherited = getattr(Callback, name)
        for callback in self.callbacks:
            handler = getattr(callback, name)
            if getattr(handler, "__func__", None) is not inherited:
                handler(trainer, *args)

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_key}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if callback.state_key and callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])
