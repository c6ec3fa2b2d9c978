"""PyTorch's LR schedulers as optax schedules: PyTorch's learning rate at every one of 200
steps, for two parameter groups; exactly for the piecewise-constant ones, 1e-7 relative for
the smooth ones (float64, concrete count), float32 precision under jit; resumption from a
scheduler state saved at step 77, both ways; mismatched scheduler states raise."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

from flax_registry import train
from flax_registry.train._scheduler_state import check_scheduler_state, scheduler_state_dict

STEPS = 200
RESUME = 77
LRS = (0.1, 0.03)  # two parameter groups


def _decay(e: Any) -> Any:  # a LambdaLR lambda that accepts a traced step as well as an int
    return 1.0 / (1.0 + 0.05 * e)


# name: (PyTorch scheduler from an optimizer, ours, exact)
CASES: dict[str, tuple[Callable[[Any], Any], train.TorchScheduler, bool]] = {
    "StepLR": (lambda o: L.StepLR(o, 7, gamma=0.5), train.StepLR(7, gamma=0.5), True),
    "MultiStepLR": (
        lambda o: L.MultiStepLR(o, [0, 30, 90, 90, 150], gamma=0.3),
        train.MultiStepLR([0, 30, 90, 90, 150], gamma=0.3),
        True,
    ),
    "ConstantLR": (lambda o: L.ConstantLR(o, 0.25, 40), train.ConstantLR(0.25, 40), True),
    "ExponentialLR": (lambda o: L.ExponentialLR(o, 0.97), train.ExponentialLR(0.97), False),
    "CosineAnnealingLR": (
        lambda o: L.CosineAnnealingLR(o, 60, eta_min=1e-4),  # 200 steps: down, up, down again
        train.CosineAnnealingLR(60, eta_min=1e-4),
        False,
    ),
    "LinearLR": (lambda o: L.LinearLR(o, 0.1, 0.9, 120), train.LinearLR(0.1, 0.9, 120), False),
    "OneCycleLR": (
        lambda o: L.OneCycleLR(o, list(LRS), total_steps=STEPS),
        train.OneCycleLR(total_steps=STEPS),
        False,
    ),
    "OneCycleLR-3phase-linear": (
        lambda o: L.OneCycleLR(
            o, list(LRS), total_steps=STEPS, three_phase=True, anneal_strategy="linear"
        ),
        train.OneCycleLR(total_steps=STEPS, three_phase=True, anneal_strategy="linear"),
        False,
    ),
    "LambdaLR": (lambda o: L.LambdaLR(o, _decay), train.LambdaLR(_decay), False),
    "SequentialLR": (
        lambda o: L.SequentialLR(
            o, [L.LinearLR(o, 0.01, total_iters=10), L.CosineAnnealingLR(o, 190)], [10]
        ),
        train.SequentialLR(
            [train.LinearLR(0.01, total_iters=10), train.CosineAnnealingLR(190)], [10]
        ),
        False,
    ),
}


def _optimizer(momentum: float = 0.9) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in LRS]
    return torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(params, LRS)], lr=LRS[0], momentum=momentum
    )


def _run(
    scheduler: Any, optimizer: torch.optim.Optimizer, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's learning rate of each group (and group 0's momentum) at every step."""
    lrs, momenta = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(steps):
            lrs.append([g["lr"] for g in optimizer.param_groups])
            momenta.append(optimizer.param_groups[0]["momentum"])
            optimizer.step()
            scheduler.step()
    return np.array(lrs), np.array(momenta)


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_gives_pytorch_lr_at_every_step(name: str) -> None:
    make, ours, exact = CASES[name]
    opt = _optimizer()
    expected, momenta = _run(make(opt), opt, STEPS)
    traced_all = []
    for g, lr in enumerate(LRS):
        schedule = ours.schedule(lr)
        host = np.array([schedule(t) for t in range(STEPS)])
        if exact:
            np.testing.assert_array_equal(host, expected[:, g])
        else:
            np.testing.assert_allclose(host, expected[:, g], rtol=1e-7, atol=0)
        traced_all.append(np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(STEPS))))
    traced = np.stack(traced_all, axis=1)
    assert traced.dtype == np.float32
    np.testing.assert_allclose(traced, expected, rtol=1e-6, atol=0)  # float32: a few ulps
    if isinstance(ours, train.OneCycleLR):  # PyTorch also cycles the momentum
        momentum = ours.momentum()
        np.testing.assert_array_equal([momentum(t) for t in range(STEPS)], momenta)
        jitted = jax.jit(jax.vmap(momentum))(jnp.arange(STEPS))
        np.testing.assert_allclose(jitted, momenta, rtol=1e-6)


def _close_state(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal scheduler state dicts: same keys in the same order, floats to 1e-12."""
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for key in theirs:
            _close_state(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list | tuple):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _close_state(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-12, abs=0), where
    else:
        assert ours == theirs and type(ours) is type(theirs), where


@pytest.mark.parametrize("name", list(CASES))
def test_resume_from_scheduler_state_at_step_77_both_ways(name: str) -> None:
    make, ours, _ = CASES[name]
    opt = _optimizer()
    expected, _ = _run(make(opt), opt, STEPS)  # uninterrupted
    opt = _optimizer()
    scheduler = make(opt)
    _run(scheduler, opt, RESUME)
    saved = scheduler.state_dict()
    schedules = [ours.schedule(lr) for lr in LRS]
    labels = [("default", schedules[0]), ("group0", schedules[1])]

    # PyTorch -> here: the saved state gives the step; the schedule continues from it
    info = check_scheduler_state(saved, labels)
    assert info.last_epoch == RESUME
    for g, schedule in enumerate(schedules):
        resumed = [schedule(t) for t in range(info.last_epoch, STEPS)]
        np.testing.assert_allclose(resumed, expected[RESUME:, g], rtol=1e-7, atol=0)

    # here -> PyTorch: PyTorch's own state dict, which a fresh scheduler loads and continues
    exported = scheduler_state_dict(schedules, RESUME, like=None)
    _close_state(exported, saved)
    fresh_opt = _optimizer()
    fresh = make(fresh_opt)
    fresh.load_state_dict(exported)
    fresh_opt.load_state_dict(opt.state_dict())  # its lr (and momentum) at step 77
    continued, _ = _run(fresh, fresh_opt, STEPS - RESUME)
    np.testing.assert_allclose(continued, expected[RESUME:], rtol=1e-7, atol=0)


def _saved(make: Callable[[Any], Any], steps: int = 5) -> dict[str, Any]:
    opt = _optimizer()
    scheduler = make(opt)
    _run(scheduler, opt, steps)
    return scheduler.state_dict()


def test_mismatched_scheduler_states_raise_naming_both_sides() -> None:
    step_lr = _saved(lambda o: L.StepLR(o, 30))
    with pytest.raises(ValueError, match=r"is StepLR .*but the learning rates here follow Cosine"):
        check_scheduler_state(step_lr, [("default", train.CosineAnnealingLR(30).schedule(0.1))])
    with pytest.raises(ValueError, match=r"step_size is 30, but 10 in StepLR\(step_size=10"):
        check_scheduler_state(step_lr, [("default", train.StepLR(10).schedule(0.1))])
    with pytest.raises(ValueError, match=r"base_lrs\[1\] .*is 0.03, but the schedule of .*'g1'"):
        schedules = [train.StepLR(30).schedule(lr) for lr in (0.1, 0.05)]
        check_scheduler_state(step_lr, list(zip(["default", "g1"], schedules)))
    lambda_state = _saved(lambda o: L.LambdaLR(o, _decay))
    other = train.LambdaLR(lambda e: 0.9**e)  # not the lambda PyTorch ran
    with pytest.raises(ValueError, match=r"_last_lr\[0\] is .* after 5 steps.*not the same lambda"):
        check_scheduler_state(
            lambda_state, [("a", other.schedule(0.1)), ("b", other.schedule(0.03))]
        )


def test_schedule_refuses_a_schedule_as_its_lr() -> None:
    with pytest.raises(ValueError, match=r"takes the parameter group's initial learning rate"):
        train.StepLR(3).schedule(train.StepLR(3).schedule(0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one more than the number of milestone points"):
        train.SequentialLR([train.StepLR(3)], [5])
