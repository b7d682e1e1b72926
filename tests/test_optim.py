"""Every loss, optimizer and scheduler builds from a config section and takes real steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainkit.config import LossConfig, OptimConfig, SchedConfig
from trainkit.errors import ConfigError
from trainkit.optim import (
    LOSSES,
    SCHEDULERS,
    build_loss,
    build_optimizer,
    build_scheduler,
    optimizer_registry,
)


def _tiny_problem():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    return model, x, y


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_builds_and_learns(name):
    model, x, y = _tiny_problem()
    loss_fn = build_loss(LossConfig(name=name), num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = float(loss_fn(model(x), y).detach())
    for _ in range(30):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss_fn(model(x), y).detach()) < first


def test_loss_options():
    ce = build_loss(LossConfig(name="cross_entropy", label_smoothing=0.1, weight=[1, 2, 1, 1]), 4)
    assert ce.label_smoothing == 0.1 and ce.weight.tolist() == [1, 2, 1, 1]
    margin = build_loss(LossConfig(name="multi_margin", margin=0.5), 4)
    assert margin.margin == 0.5


@pytest.mark.parametrize("name", sorted(optimizer_registry()))
def test_every_optimizer_steps(name):
    model, x, y = _tiny_problem()
    before = model.weight.detach().clone()
    if name == "lbfgs":  # needs a closure that re-runs the loss: refused when the config is checked
        with pytest.raises(ConfigError, match="optim.name: lbfgs re-evaluates the loss"):
            build_optimizer(OptimConfig(name=name), model)
        return
    kwargs = {"lr": 0.01}
    owner = model
    if name == "muon":  # matrices only: a module holding just the weight
        owner = nn.Module()
        owner.weight = model.weight
    optimizer = build_optimizer(OptimConfig(name=name, **kwargs), owner)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("warmup", [0.0, 1.0])
def test_every_scheduler_steps(name, warmup):
    if name == "onecycle" and warmup:
        pytest.skip("onecycle has its own warmup")
    kwargs = {"step": {"step_size": 1}, "multistep": {"milestones": [1, 2]}, "plateau": {"patience": 0}}.get(
        name, {}
    )
    model, _, _ = _tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = build_scheduler(
        SchedConfig(name=name, warmup_epochs=warmup, **kwargs), optimizer, steps_per_epoch=5, epochs=3
    )
    lrs = []
    for step in range(15):
        optimizer.step()
        schedule.step()
        if step % 5 == 4:
            schedule.step_eval(1.0)  # a flat metric: plateau decays
        lrs.append(schedule.lr())
    if warmup:
        assert lrs[0] < lrs[3]  # rising during warmup
    if name != "none":
        assert lrs[-1] < max(lrs)  # the schedule decays
    state = schedule.state_dict()
    torch.save(state, "/dev/null")  # plain data


def test_warmup_then_cosine_reaches_base_lr():
    model, _, _ = _tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = build_scheduler(SchedConfig(name="cosine", warmup_epochs=1), optimizer, 10, 5)
    lrs = []
    for _ in range(50):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.lr())
    assert max(lrs) == pytest.approx(0.1, rel=1e-6)
    assert lrs[-1] < 1e-3


def test_epoch_arguments_are_converted_to_steps():
    model, _, _ = _tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = build_scheduler(SchedConfig(name="step", step_size=2, gamma=0.5), optimizer, 10, 6)
    lrs = []
    for _ in range(40):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.lr())
    assert lrs[18] == 1.0 and lrs[19] == 0.5 and lrs[39] == 0.25


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_fast_implementation_is_chosen_and_is_the_same_update(name):
    """fused where torch has the kernel, else foreach; the same steps as torch's default
    (single-tensor on CPU) to float rounding; a config's own choice is kept."""
    kwargs = {"lr": 0.05, "weight_decay": 5e-4}
    if name == "sgd":
        kwargs |= {"momentum": 0.9, "nesterov": True}
    fast_model, plain_model = _tiny_problem()[0], _tiny_problem()[0]
    fast = build_optimizer(OptimConfig(name=name, **kwargs), fast_model)
    plain = build_optimizer(OptimConfig(name=name, foreach=False, **kwargs), plain_model)
    group = fast.param_groups[0]
    assert (group.get("fused"), group.get("foreach")) == ((None, True) if name == "rmsprop" else (True, None))
    assert plain.param_groups[0]["foreach"] is False and not plain.param_groups[0].get("fused")
    _, x, y = _tiny_problem()
    for model, optimizer in ((fast_model, fast), (plain_model, plain)):
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(fast_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loading_an_optimizer_state_keeps_this_machines_implementation():
    # a checkpoint from before fused kernels were chosen says fused=None, foreach=None
    from trainkit.optim import load_optimizer_state

    old_model, model = _tiny_problem()[0], _tiny_problem()[0]
    old = torch.optim.SGD(old_model.parameters(), lr=0.1, momentum=0.9)
    _, x, y = _tiny_problem()
    nn.functional.cross_entropy(old_model(x), y).backward()
    old.step()
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9), model)
    load_optimizer_state(optimizer, old.state_dict())
    assert optimizer.param_groups[0]["fused"] is True
    momentum = optimizer.state[optimizer.param_groups[0]["params"][0]]["momentum_buffer"]
    assert torch.equal(momentum, old.state[old.param_groups[0]["params"][0]]["momentum_buffer"])
