"""build_loss / build_optimizer / build_scheduler over plain name → class registries.

Keyword arguments come straight from the config section and are checked against the real
signature of the torch class, so a typo fails before any data is loaded.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainkit.config import LossConfig, OptimConfig, SchedConfig
from trainkit.errors import ConfigError, unknown_choice

# --------------------------------------------------------------------------- losses

_IGNORED_LOSS_ARGS = {"size_average", "reduce", "reduction"}


class OneHotLoss(nn.Module):
    """Apply a regression-style loss to logits against one-hot targets."""

    def __init__(self, loss: nn.Module, num_classes: int):
        super().__init__()
        self.loss = loss
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(labels, self.num_classes).to(logits.dtype)  # (B, K)
        return self.loss(logits, target)


class LogitsNLLLoss(nn.NLLLoss):
    """NLL over log_softmax(logits): models return logits, so nll means log-softmax + NLL."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(F.log_softmax(logits, dim=1), labels)


# name → (torch class whose signature is checked, takes class labels directly)
LOSSES: dict[str, tuple[type[nn.Module], bool]] = {
    "cross_entropy": (nn.CrossEntropyLoss, True),
    "nll": (LogitsNLLLoss, True),
    "multi_margin": (nn.MultiMarginLoss, True),
    "bce_with_logits": (nn.BCEWithLogitsLoss, False),
    "mse": (nn.MSELoss, False),
    "smooth_l1": (nn.SmoothL1Loss, False),
    "l1": (nn.L1Loss, False),
}
_TENSOR_LOSS_ARGS = {"weight", "pos_weight"}


def _check_kwargs(
    section: str, owner: str, kwargs: dict, valid: list[str], own: tuple[str, ...] = ()
) -> None:
    """Unknown keys fail; the suggestion and the list include the section's own keys (e.g.
    sched.warmup_epochs) beside the arguments of the chosen class."""
    for key in kwargs:
        if key not in valid:
            choices = list(valid) + [k for k in own if k not in valid]
            close = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ";"
            raise ConfigError(
                f"{section}.{key}", f"not an argument of {owner}{hint} valid: {', '.join(choices) or 'none'}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _culprit(section: str, kwargs: dict, error: Exception) -> str:
    """The dotted key an error message names (torch says "argument 'label_smoothing'…")."""
    text = str(error)
    named = [key for key in kwargs if f"'{key}'" in text or f" {key} " in f" {text} "]
    return f"{section}.{named[0]}" if named else section


def _loss_arg_names(cls: type) -> list[str]:
    params = inspect.signature(cls).parameters
    return [p for p in params if p not in _IGNORED_LOSS_ARGS]


def build_loss(section: LossConfig, num_classes: int) -> nn.Module:
    """A module mapping (logits (B, K), labels (B,)) to the mean loss."""
    if section.name not in LOSSES:
        raise ConfigError("loss.name", unknown_choice("loss", section.name, LOSSES))
    cls, takes_labels = LOSSES[section.name]
    kwargs = section.kwargs
    _check_kwargs("loss", section.name, kwargs, _loss_arg_names(cls))
    for key in _TENSOR_LOSS_ARGS & kwargs.keys():
        value = kwargs[key]
        if not isinstance(value, list) or len(value) != num_classes or not all(map(_is_number, value)):
            raise ConfigError(
                f"loss.{key}",
                f"expected a list of {num_classes} finite numbers (one per class), got {value!r}",
            )
        kwargs[key] = torch.tensor(value, dtype=torch.float32)
    try:
        loss = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(_culprit("loss", kwargs, error), f"cannot build {section.name}: {error}") from error
    return loss if takes_labels else OneHotLoss(loss, num_classes)


# --------------------------------------------------------------------------- optimizers


# SparseAdam needs sparse gradients, which no image classifier here produces.
_UNUSABLE_OPTIMIZERS = {"sparseadam"}


def optimizer_registry() -> dict[str, type[torch.optim.Optimizer]]:
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
        and name.lower() not in _UNUSABLE_OPTIMIZERS
    }


# Optimizers whose step() must call back into the model (a closure that recomputes the loss):
# the trainer steps once per accumulation window on a loss it already has.
_CLOSURE_OPTIMIZERS = {
    "lbfgs": "lbfgs re-evaluates the loss several times per step through a closure, "
    "which mini-batch training with accumulation does not do; use sgd, adam or adamw"
}


def build_optimizer(section: OptimConfig, model: nn.Module, head: list[str] = ()) -> torch.optim.Optimizer:
    """The optimizer over `model`'s parameter groups (`head`: the classifier head's parameter
    names, for optim.head_lr)."""
    registry = optimizer_registry()
    if section.name not in registry:
        raise ConfigError("optim.name", unknown_choice("optimizer", section.name, registry))
    if section.name in _CLOSURE_OPTIMIZERS:
        raise ConfigError("optim.name", _CLOSURE_OPTIMIZERS[section.name])
    cls = registry[section.name]
    kwargs = section.kwargs
    _check_kwargs(
        "optim", section.name, kwargs, [p for p in inspect.signature(cls).parameters if p != "params"]
    )
    lr = kwargs.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
        raise ConfigError("optim.lr", f"must be a number > 0 (got {lr!r})")
    for key in ("weight_decay", "momentum"):
        value = kwargs.get(key)
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"optim.{key}", f"must be >= 0 (got {value!r})")
    try:
        groups = parameter_groups(model, list(head), section.head_lr, section.no_decay_norm_and_bias)
        return cls(groups, **kwargs, **fast_implementation(cls, kwargs, model))
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            _culprit("optim", kwargs, error), f"cannot build {section.name}: {error}"
        ) from error


# An optimizer's implementation, not its math: kept from the optimizer as built when a
# checkpoint's state is loaded (see load_optimizer_state).
IMPLEMENTATION_KEYS = ("fused", "foreach")


def fast_implementation(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], model: nn.Module) -> dict:
    """The fastest implementation torch has for this optimizer on the model's device, unless
    the config chose one (optim.fused / optim.foreach): the fused kernel (one pass over each
    parameter: SGD, Adam, AdamW, Adagrad), else the multi-tensor one. torch uses neither on CPU
    by default; measured on CPU, one SGD step (Nesterov, weight decay): LeNet 145 → 45 us,
    the MLP 286 → 96 us, AlexNet 19.9 → 1.7 ms. Same update, to float rounding."""
    if any(key in kwargs for key in IMPLEMENTATION_KEYS):
        return {}
    accepted = inspect.signature(cls).parameters
    parameters = list(model.parameters())
    if not parameters or kwargs.get("differentiable"):
        return {}
    device = parameters[0].device.type
    floating = all(p.is_floating_point() and p.device.type == device for p in parameters)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if "fused" in accepted and floating and device in _get_fused_kernels_supported_devices():
        return {"fused": True}
    if "foreach" in accepted:
        return {"foreach": True}
    return {}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A checkpoint's optimizer state into `optimizer`, keeping this optimizer's fused / foreach
    choice. torch's load_state_dict takes the saved groups' flags: a checkpoint from an older
    trainkit (or another device) would switch the fast kernel off, or on where this device has
    none. The flags are set in the groups before loading, because torch also places each
    state's `step` by them (on the parameter's device for a fused optimizer)."""
    current = optimizer.param_groups
    saved = state.get("param_groups")
    if isinstance(saved, list) and len(saved) == len(current) and all(isinstance(g, dict) for g in saved):
        keep = [{key: group[key] for key in IMPLEMENTATION_KEYS if key in group} for group in current]
        state = {**state, "param_groups": [{**old, **mine} for old, mine in zip(saved, keep)]}
    optimizer.load_state_dict(state)


def parameter_groups(
    model: nn.Module, head: list[str] = (), head_lr: float | None = None, no_decay_norm_and_bias: bool = False
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups over every trainable parameter (model.freeze is applied
    after the optimizer is built, so frozen ones are in it, ready for train.unfreeze_epoch): the
    head at `head_lr`, and with `no_decay_norm_and_bias` no weight decay on biases and
    normalisation weights (every 1-D parameter: the timm / nanoGPT rule). The group order is
    fixed (body, body without decay, head, head without decay), empty groups dropped, so a
    resumed optimizer state lines up."""
    if head_lr is None and not no_decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    heads = set(head) if head_lr is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (False, False): [],
        (False, True): [],
        (True, False): [],
        (True, True): [],
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = no_decay_norm_and_bias and parameter.ndim <= 1
        groups[(name in heads, no_decay)].append(parameter)
    result = []
    for (is_head, no_decay), params in groups.items():
        if params:
            group: dict[str, Any] = {"params": params}
            if is_head:
                group["lr"] = head_lr
            if no_decay:
                group["weight_decay"] = 0.0
            result.append(group)
    return result


# --------------------------------------------------------------------------- schedulers

S = torch.optim.lr_scheduler


@dataclass(frozen=True)
class SchedulePlan:
    """What a schedule's arguments are computed from: optimizer steps, not epochs."""

    steps_per_epoch: int  # optimizer steps (after gradient accumulation)
    total_steps: int
    warmup_steps: int
    monitor_mode: str  # "max" | "min", for plateau


@dataclass(frozen=True)
class SchedulerEntry:
    """A registry row: the torch class, the arguments trainkit fills in itself (not the user's),
    those given in epochs (converted to steps), those required, and the filling rule."""

    cls: type | None
    filled: frozenset[str] = frozenset()
    in_epochs: frozenset[str] = frozenset()
    required: dict[str, str] = field(default_factory=dict)  # key → what it means
    fill: Callable[[dict[str, Any], SchedulePlan, torch.optim.Optimizer], None] = lambda kw, plan, opt: None


def _fill_cosine(kwargs, plan, optimizer) -> None:
    kwargs.setdefault("T_max", max(1, plan.total_steps - plan.warmup_steps))


def _fill_exponential(kwargs, plan, optimizer) -> None:
    kwargs["gamma"] = float(kwargs.get("gamma", 0.9)) ** (1.0 / max(1, plan.steps_per_epoch))  # per epoch


def _fill_onecycle(kwargs, plan, optimizer) -> None:
    kwargs.setdefault("max_lr", [g["lr"] for g in optimizer.param_groups])
    kwargs["total_steps"] = plan.total_steps


def _fill_plateau(kwargs, plan, optimizer) -> None:
    kwargs["mode"] = plan.monitor_mode


SCHEDULERS: dict[str, SchedulerEntry] = {
    "none": SchedulerEntry(None),
    "step": SchedulerEntry(
        S.StepLR, in_epochs=frozenset({"step_size"}), required={"step_size": "epochs between decays"}
    ),
    "multistep": SchedulerEntry(
        S.MultiStepLR, in_epochs=frozenset({"milestones"}), required={"milestones": "epochs"}
    ),
    "cosine": SchedulerEntry(S.CosineAnnealingLR, in_epochs=frozenset({"T_max"}), fill=_fill_cosine),
    "onecycle": SchedulerEntry(
        S.OneCycleLR, filled=frozenset({"total_steps", "epochs", "steps_per_epoch"}), fill=_fill_onecycle
    ),
    "exponential": SchedulerEntry(S.ExponentialLR, fill=_fill_exponential),
    "plateau": SchedulerEntry(S.ReduceLROnPlateau, filled=frozenset({"mode"}), fill=_fill_plateau),
}
_SCHED_COMMON = {"optimizer", "last_epoch", "verbose"}


class LRSchedule:
    """The lr schedule of a run, advanced once per optimizer step.

    Epoch-valued arguments (step_size, milestones, T_max, exponential's gamma) are converted to
    optimizer steps so that warmup and decay are smooth at any batch size. `plateau` instead
    steps on each evaluation's monitored metric.
    """

    def __init__(self, optimizer, per_step, plateau=None, warmup_steps: int = 0):
        self.optimizer = optimizer
        self.per_step = per_step  # an LRScheduler advanced each optimizer step, or None
        self.plateau = plateau  # ReduceLROnPlateau advanced per evaluation, or None
        self.warmup_steps = warmup_steps
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.per_step is not None and (self.plateau is None or self.steps <= self.warmup_steps):
            self.per_step.step()

    def step_eval(self, metric: float) -> None:
        if self.plateau is not None and self.steps >= self.warmup_steps:
            self.plateau.step(metric)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "per_step": self.per_step.state_dict() if self.per_step is not None else None,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def fast_forward(self, state: dict[str, Any]) -> None:
        """Continue a saved run on this (differently long) schedule: replay its step count.

        The saved per-step scheduler is tied to the old total length (onecycle refuses to step
        past it), so this one is advanced to the same step instead; plateau state carries over.
        """
        with warnings.catch_warnings():
            # torch warns when a scheduler steps before its optimizer ever did: here that is the point
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(int(state["steps"])):
                self.step()
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if self.per_step is not None and state.get("per_step") is not None:
            self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])


def _epochs_to_steps(key: str, value: Any, steps_per_epoch: int) -> Any:
    if key == "milestones":
        if not isinstance(value, list) or not all(_is_number(m) and m >= 0 for m in value):
            raise ConfigError("sched.milestones", f"expected a list of epochs, e.g. [30, 60] (got {value!r})")
        return [int(round(m * steps_per_epoch)) for m in value]
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"sched.{key}", f"expected a number of epochs > 0 (got {value!r})")
    return max(1, int(round(value * steps_per_epoch)))


def build_scheduler(
    section: SchedConfig,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    monitor_mode: str = "max",
) -> LRSchedule:
    """steps_per_epoch counts optimizer steps (after gradient accumulation)."""
    if section.name not in SCHEDULERS:
        raise ConfigError("sched.name", unknown_choice("scheduler", section.name, SCHEDULERS))
    entry = SCHEDULERS[section.name]
    kwargs = section.kwargs
    own = tuple(key for key in SchedConfig.model_fields if key != "name")
    if entry.cls is not None:
        valid = [p for p in inspect.signature(entry.cls).parameters if p not in _SCHED_COMMON | entry.filled]
        _check_kwargs("sched", section.name, kwargs, valid, own)
    elif kwargs:
        _check_kwargs("sched", section.name, kwargs, [], own)
    for key, meaning in entry.required.items():
        if key not in kwargs:
            raise ConfigError(f"sched.{key}", f"required for '{section.name}' ({meaning})")
    total_steps = max(1, steps_per_epoch * epochs)
    warmup_steps = int(round(section.warmup_epochs * steps_per_epoch))
    if section.name == "onecycle" and warmup_steps:
        raise ConfigError("sched.warmup_epochs", "onecycle warms up by itself (use pct_start)")
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0
    plan = SchedulePlan(steps_per_epoch, total_steps, warmup_steps, monitor_mode)
    for key in entry.in_epochs & kwargs.keys():
        kwargs[key] = _epochs_to_steps(key, kwargs[key], steps_per_epoch)
    entry.fill(kwargs, plan, optimizer)
    try:
        main = entry.cls(optimizer, **kwargs) if entry.cls is not None else None
        warmup = None
        if warmup_steps:
            warmup = S.LinearLR(optimizer, start_factor=section.warmup_start_factor, total_iters=warmup_steps)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            _culprit("sched", kwargs, error), f"cannot build {section.name}: {error}"
        ) from error
    if isinstance(main, S.ReduceLROnPlateau):
        return LRSchedule(optimizer, warmup, plateau=main, warmup_steps=warmup_steps)
    if warmup is not None and main is not None:
        # the main schedule starts where warmup ends, from the base lr
        per_step = S.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
    else:
        per_step = warmup if main is None else main
    return LRSchedule(optimizer, per_step, warmup_steps=warmup_steps)


def check_named_sections(loss: LossConfig, optim: OptimConfig, sched: SchedConfig) -> None:
    """Build loss, optimizer and schedule on a dummy parameter: every name/kwarg error surfaces
    here, before data is loaded or a run directory exists."""
    classes = _loss_check_classes(loss)
    loss_fn = build_loss(loss, num_classes=classes)
    try:  # some arguments (label_smoothing, p) are only checked when the loss runs
        loss_fn(torch.zeros(2, classes), torch.zeros(2, dtype=torch.int64))
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(_culprit("loss", loss.kwargs, error), f"{loss.name}: {error}") from error
    probe = nn.Linear(2, 2, bias=False)  # 2-D parameters only: some optimizers (muon) take only matrices
    optimizer = build_optimizer(optim, probe)
    build_scheduler(sched, optimizer, steps_per_epoch=10, epochs=2)


def _loss_check_classes(loss: LossConfig) -> int:
    for key in _TENSOR_LOSS_ARGS:
        value = loss.kwargs.get(key)
        if isinstance(value, list):
            return len(value)
    return 2
