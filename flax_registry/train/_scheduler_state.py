"""PyTorch's `scheduler.state_dict()` <-> the step count of flax_registry's schedules.

A PyTorch scheduler's state is its constructor arguments, `base_lrs` (one per group),
`last_epoch` (steps taken), `_step_count` and `_last_lr`; `load_state_dict` is a plain
`__dict__.update`, so an exported state must have every key PyTorch's own has. Here the only
state is the optimizer's step count: importing checks the arguments and `base_lrs` against the
schedules given and returns `last_epoch`; exporting writes PyTorch's dict for a step count.
`SequentialLR` keeps one such dict per inner scheduler, in `_schedulers`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ._one_cycle import OneCycleLR
from ._schedules import (
    COMMON_STATE_KEYS,
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiStepLR,
    SequentialLR,
    StepLR,
    TorchLR,
    TorchScheduler,
)

SCHEDULERS: tuple[type[TorchScheduler], ...] = (
    StepLR,
    MultiStepLR,
    ConstantLR,
    ExponentialLR,
    CosineAnnealingLR,
    LinearLR,
    LambdaLR,
    OneCycleLR,
    SequentialLR,
)
"""Every PyTorch scheduler with a counterpart here."""

_SEQUENTIAL_KEYS = ("_milestones", "last_epoch", "_last_lr", "_schedulers")
_OPTIONAL_KEYS = ("use_beta1", "verbose")

_WRONG_CLASS = (
    "the checkpoint's scheduler{where} is {found} (its state has {keys}), but the learning "
    "rates here follow {expected}. Fix: pass lr={fix}(...).schedule(lr) with the PyTorch "
    "scheduler's arguments to every group's optimizer."
)
_WRONG_ATTR = (
    "the checkpoint's scheduler{where}: {key} is {found!r}, but {expected!r} in {spec}. Fix: "
    "construct the schedule with PyTorch's arguments ({key}={found!r})."
)
_BASE_LRS = (
    "the checkpoint's scheduler{where}: base_lrs[{index}] (param_groups[{index}]'s initial_lr) "
    "is {found!r}, but the schedule of flax_registry group {label!r} starts from {expected!r}. "
    "Fix: pass that group's schedule .schedule({hint!r})."
)
_LAST_LR = (
    "the checkpoint's scheduler{where}: _last_lr[{index}] is {found!r} after {steps} steps, but "
    "{spec} gives {expected!r} for flax_registry group {label!r}. The schedule given again "
    "does not reproduce PyTorch's (for LambdaLR: not the same lambda). Fix: pass the lambda "
    "(or arguments) the PyTorch run used."
)
_NOT_ONE = (
    "every parameter group follows one PyTorch scheduler, but flax_registry group {a!r} has "
    "{sa} and group {b!r} has {sb}. Fix: build every group's schedule from the same scheduler "
    "object (LambdaLR may differ in its lambda only)."
)


def _keys_of(cls: type[TorchScheduler]) -> set[str]:
    if cls is SequentialLR:
        return set(_SEQUENTIAL_KEYS)
    return set(COMMON_STATE_KEYS) | set(cls.own_keys)


def torch_scheduler_class(state: Mapping[str, Any]) -> str:
    """The PyTorch scheduler class whose `state_dict()` has these keys ('' if unknown)."""
    keys = set(state) - set(_OPTIONAL_KEYS)
    for cls in SCHEDULERS:
        if keys == _keys_of(cls):
            return cls.torch_class
    return ""


def _close(a: Any, b: Any, rel: float = 1e-9) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-300)
    return bool(a == b)


def common_scheduler(lrs: Sequence[tuple[str, Any]]) -> TorchScheduler | None:
    """The one scheduler behind every group's `lr` (None if every lr is a number)."""
    scheds = [(label, lr.scheduler) for label, lr in lrs if isinstance(lr, TorchLR)]
    if not scheds:
        return None
    if len(scheds) != len(lrs):
        a = next(label for label, lr in lrs if isinstance(lr, TorchLR))
        b = next(label for label, lr in lrs if not isinstance(lr, TorchLR))
        raise ValueError(
            _NOT_ONE.format(a=a, sa="a schedule", b=b, sb="a constant lr (no scheduler)")
        )
    (a, first), *rest = scheds
    for b, other in rest:
        if not first.same_as(other):
            raise ValueError(_NOT_ONE.format(a=a, sa=first.describe(), b=b, sb=other.describe()))
    return first


@dataclasses.dataclass
class SchedulerInfo:
    """What `check_scheduler_state` read: PyTorch's `last_epoch` and the dict as saved."""

    last_epoch: int
    state: dict[str, Any]


def check_arguments(state: Mapping[str, Any], spec: TorchScheduler, where: str = "") -> None:
    """Check that PyTorch's scheduler state is of `spec`'s class, with its arguments."""
    found = torch_scheduler_class(state)
    if found != spec.torch_class:
        raise ValueError(
            _WRONG_CLASS.format(
                where=where,
                found=found or "an unknown scheduler",
                keys=", ".join(k for k in state if k not in COMMON_STATE_KEYS),
                expected=spec.describe(),
                fix=f"fr.train.{found}" if found else "fr.train.<Scheduler>",
            )
        )
    for key, expected in spec._attrs().items():
        if not _close(state[key], expected, rel=1e-12):
            raise ValueError(
                _WRONG_ATTR.format(
                    where=where, key=key, found=state[key], expected=expected, spec=spec.describe()
                )
            )


def check_scheduler_state(
    state: Mapping[str, Any],
    lrs: Sequence[tuple[str, TorchLR]],
    where: str = "",
) -> SchedulerInfo:
    """Check PyTorch's scheduler state against each group's schedule (labels and schedules in
    PyTorch's group order); return its `last_epoch`."""
    spec = lrs[0][1].scheduler
    check_arguments(state, spec, where)
    last_epoch = int(state["last_epoch"])
    if isinstance(spec, SequentialLR):
        for i, (sub_state, sub) in enumerate(zip(state["_schedulers"], spec.schedulers)):
            sub_lrs = [(label, TorchLR(sub, lr.lr)) for label, lr in lrs]
            check_scheduler_state(sub_state, sub_lrs, f"{where}._schedulers[{i}]")
    else:
        for i, (label, lr) in enumerate(lrs):
            base = state["base_lrs"][i]
            if not _close(base, lr.base_lr, rel=1e-12):
                hint = base * spec.div_factor if isinstance(spec, OneCycleLR) else base
                raise ValueError(
                    _BASE_LRS.format(
                        where=where, index=i, found=base, label=label, expected=lr.base_lr,
                        hint=hint,
                    )
                )  # fmt: skip
    if not where:  # the inner schedulers' _last_lr are their own, checked through the outer
        for i, (label, lr) in enumerate(lrs):
            expected = lr(last_epoch) if last_epoch >= 0 else lr.base_lr
            if not _close(state["_last_lr"][i], expected):
                raise ValueError(
                    _LAST_LR.format(
                        where=where, index=i, found=state["_last_lr"][i], steps=last_epoch,
                        spec=spec.describe(), expected=expected, label=label,
                    )
                )  # fmt: skip
    return SchedulerInfo(last_epoch, dict(state))


def _own_state(
    spec: TorchScheduler,
    lrs: Sequence[TorchLR],
    last_epoch: int,
    step_count: int,
    last_lr: list[float],
    use_beta1: bool,
) -> dict[str, Any]:
    out = dict(spec._attrs())
    if isinstance(spec, OneCycleLR) and spec.cycle_momentum:
        out["use_beta1"] = use_beta1
    out.update(
        base_lrs=[lr.base_lr for lr in lrs],
        last_epoch=last_epoch,
        _step_count=step_count,
        _is_initial=False,
        _get_lr_called_within_step=False,
        _last_lr=last_lr,
    )
    if isinstance(spec, LambdaLR):
        out["lr_lambdas"] = [None] * len(lrs)  # PyTorch saves no plain function
    return out


def _like(new: dict[str, Any], like: Mapping[str, Any] | None) -> dict[str, Any]:
    """`new` in the key order of `like`, with the keys of `like` it does not know kept."""
    if like is None:
        return new
    kept = (*_OPTIONAL_KEYS, "lr_lambdas")  # lr_lambdas: the __dict__ of callable objects
    out = {k: v if k in kept else new.get(k, v) for k, v in like.items() if k in new or k in kept}
    out.update({k: v for k, v in new.items() if k not in out})
    return out


def scheduler_state_dict(
    lrs: Sequence[TorchLR],
    count: int,
    *,
    use_beta1: bool = False,
    like: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """PyTorch's `scheduler.state_dict()` after `count` steps, for groups with schedules
    `lrs` (PyTorch's group order); `like` (the state as imported) keeps its key order and the
    keys PyTorch versions add (`verbose`). `use_beta1`: the optimizer is Adam/AdamW."""
    spec = lrs[0].scheduler
    if not isinstance(spec, SequentialLR):
        offset = 1
        if like is not None and "_step_count" in like:
            offset = int(like["_step_count"]) - int(like["last_epoch"])
        last_lr = [lr(count) for lr in lrs]
        return _like(_own_state(spec, lrs, count, count + offset, last_lr, use_beta1), like)
    active, _ = spec.active(count)
    subs = []
    starts = [0, *spec.milestones]
    like_subs = list(like["_schedulers"]) if like is not None else [None] * len(spec.schedulers)
    for i, sub in enumerate(spec.schedulers):
        sub_lrs = [TorchLR(sub, lr.lr) for lr in lrs]
        if i < active:  # finished: stopped at its last step before the next milestone
            epoch = starts[i + 1] - starts[i] - 1
            steps = epoch + 1
        elif i == active:
            epoch = count - starts[i]
            steps = epoch + 1
        else:  # not started: PyTorch undid its initial step
            epoch, steps = -1, 1
        last_lr = [lr(max(epoch, 0)) for lr in sub_lrs]
        subs.append(_like(_own_state(sub, sub_lrs, epoch, steps, last_lr, use_beta1), like_subs[i]))
    new = {
        "_milestones": list(spec.milestones),
        "last_epoch": count,
        "_last_lr": [lr(count) for lr in lrs],
        "_schedulers": subs,
    }
    return _like(new, like)
