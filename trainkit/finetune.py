"""Fine-tuning controls: which parameters `model.freeze` holds still, and for how long.

Frozen parameters stay in the optimizer (so its state and param groups are the same before and
after `train.unfreeze_epoch`, and a resume finds them in place) but have requires_grad off:
they get no gradient, and torch's optimizers skip a parameter without one.
"""

from __future__ import annotations

from torch import nn

from trainkit.errors import ConfigError


def frozen_parameter_names(model: nn.Module, freeze: list[str] | str | None, head: list[str]) -> list[str]:
    """`backbone` = every parameter but the head's; a list = names starting with any prefix
    (each prefix must match something)."""
    if freeze is None:
        return []
    names = [name for name, _ in model.named_parameters()]
    if freeze == "backbone":
        if not head:
            raise ConfigError(
                "model.freeze", "no classifier head found in this model; give parameter-name prefixes instead"
            )
        return [name for name in names if name not in head]
    chosen = []
    for prefix in freeze:
        matched = [name for name in names if name.startswith(prefix)]
        if not matched:
            shown = ", ".join(sorted({name.split(".")[0] for name in names})[:12])
            raise ConfigError("model.freeze", f"'{prefix}' matches no parameter; top-level names: {shown}")
        chosen += matched
    return list(dict.fromkeys(chosen))


def set_trainable(model: nn.Module, names: list[str], trainable: bool) -> None:
    wanted = set(names)
    for name, parameter in model.named_parameters():
        if name in wanted:
            parameter.requires_grad_(trainable)


class FreezeSchedule:
    """Frozen until `unfreeze_epoch` (1-based; None = the whole run). `at_epoch(epoch)` sets
    the state for a 0-based epoch from scratch, so a resumed run is in the same state as an
    uninterrupted one. When it changes, a DDP wrapper must be rebuilt by the caller: DDP fixes
    the set of parameters it synchronises when it is built."""

    def __init__(self, model: nn.Module, names: list[str], unfreeze_epoch: int | None):
        self.model, self.names, self.unfreeze_epoch = model, names, unfreeze_epoch
        self.frozen: bool | None = None

    def frozen_at(self, epoch: int) -> bool:
        return bool(self.names) and (self.unfreeze_epoch is None or epoch + 1 < self.unfreeze_epoch)

    def at_epoch(self, epoch: int) -> bool:
        """→ True when the state changed at this epoch (after the first call)."""
        frozen = self.frozen_at(epoch)
        if frozen == self.frozen:
            return False
        changed = self.frozen is not None
        set_trainable(self.model, self.names, not frozen)
        self.frozen = frozen
        return changed
