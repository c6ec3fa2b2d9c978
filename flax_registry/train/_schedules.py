"""PyTorch's learning-rate schedulers as optax schedules, equal to PyTorch's step by step.

A PyTorch scheduler rewrites `param_group["lr"]` after every `scheduler.step()`; here the same
numbers come from a pure function of the optimizer's step count. A scheduler object holds
PyTorch's constructor arguments (without the optimizer), and `scheduler.schedule(lr)` is the
optax schedule of one parameter group whose `lr` (its `initial_lr`) is `lr`:

    cosine = CosineAnnealingLR(T_max=1000)
    tx = torch_adamw(cosine.schedule(1e-3))                      # group 0
    no_decay = ParamGroup(["*.bias"], torch_adamw(cosine.schedule(1e-3), weight_decay=0.0))

`schedule(count)` is PyTorch's learning rate after `count` calls of `scheduler.step()` (its
`last_epoch`), i.e. the one the optimizer's step number `count` uses when the scheduler is
stepped once per optimizer step. Called with a concrete count it computes in float64 as PyTorch
does (piecewise-constant schedules multiply by `gamma` one boundary at a time, bit for bit as
PyTorch's chained updates; the smooth ones use PyTorch's closed forms); under `jax.jit` it
computes in float32, arranged so that no cancellation loses precision near zero.
`OneCycleLR` (which also cycles the momentum) is in `_one_cycle.py`.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

COMMON_STATE_KEYS = (
    "base_lrs",
    "last_epoch",
    "_step_count",
    "_is_initial",
    "_get_lr_called_within_step",
    "_last_lr",
)
"""The keys every `LRScheduler.state_dict()` has besides its own (SequentialLR excepted)."""


def _is_traced(count: Any) -> bool:
    return isinstance(count, jax.core.Tracer)


def _f32(t: Any) -> jax.Array:
    return jnp.asarray(t).astype(jnp.float32)


class TorchScheduler:
    """What every scheduler object has: PyTorch's class name and constructor arguments.

    Subclasses define `_host(t, base)` (float64, PyTorch's arithmetic), `_traced(t, base)`
    (float32 under jit) and `_attrs()` (the entries of PyTorch's `state_dict()` that come from
    the constructor arguments, in PyTorch's order).
    """

    torch_class: ClassVar[str] = ""
    own_keys: ClassVar[tuple[str, ...]] = ()

    def schedule(self, lr: float) -> TorchLR:
        """The optax schedule `count -> lr` of a parameter group whose initial `lr` is `lr`."""
        if isinstance(lr, TorchLR) or callable(lr) or not lr >= 0.0:
            raise ValueError(
                f"{type(self).__name__}.schedule(lr) takes the parameter group's initial "
                f"learning rate (a float >= 0), got {lr!r}."
            )
        return TorchLR(self, float(lr))

    def initial_lr(self, lr: float) -> float:
        """The group's `initial_lr` (PyTorch's `base_lrs` entry) for a group given `lr`."""
        return lr

    def _host(self, t: int, base: float) -> float:
        raise NotImplementedError

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        raise NotImplementedError

    def _attrs(self) -> dict[str, Any]:
        raise NotImplementedError

    def lr_at(self, t: int, base: float) -> float:
        """PyTorch's learning rate after `t` scheduler steps, for a group with `initial_lr`
        `base`; float64, as PyTorch computes it."""
        if t < 0:
            raise ValueError(f"{self.torch_class}: the step count must be >= 0, got {t}")
        return self._host(int(t), base)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._attrs().items() if not k.startswith("_"))
        return f"{self.torch_class}({args})"

    def same_as(self, other: TorchScheduler) -> bool:
        """The same PyTorch scheduler (per-group parts, such as LambdaLR's lambdas, aside)."""
        return type(self) is type(other) and self._attrs() == other._attrs()


@dataclasses.dataclass(frozen=True)
class TorchLR:
    """One parameter group's learning rate under a PyTorch scheduler, as an optax schedule.

    `self(count)` is PyTorch's `param_group["lr"]` after `count` scheduler steps: a Python
    float (float64) for a concrete count, a float32 array under `jax.jit`.
    """

    scheduler: TorchScheduler
    lr: float

    @property
    def base_lr(self) -> float:
        """PyTorch's `initial_lr` of the group (`base_lrs` of the scheduler)."""
        return self.scheduler.initial_lr(self.lr)

    def __call__(self, count: Any) -> Any:
        if _is_traced(count):
            return self.scheduler._traced(count, self.base_lr)
        return self.scheduler.lr_at(int(count), self.base_lr)


@dataclasses.dataclass(frozen=True)
class StepLR(TorchScheduler):
    """`torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)`: `lr * gamma` every
    `step_size` steps."""

    step_size: int
    gamma: float = 0.1
    torch_class: ClassVar[str] = "StepLR"
    own_keys: ClassVar[tuple[str, ...]] = ("step_size", "gamma")

    def _host(self, t: int, base: float) -> float:
        lr = base
        for _ in range(t // self.step_size):  # PyTorch: group["lr"] * gamma at each boundary
            lr = lr * self.gamma
        return lr

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        return base * jnp.power(jnp.float32(self.gamma), _f32(t // self.step_size))

    def _attrs(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma}


@dataclasses.dataclass(frozen=True)
class MultiStepLR(TorchScheduler):
    """`MultiStepLR(optimizer, milestones, gamma)`: `lr * gamma` at each milestone (a
    milestone listed twice multiplies by `gamma**2`, as PyTorch's Counter does)."""

    milestones: Sequence[int]
    gamma: float = 0.1
    torch_class: ClassVar[str] = "MultiStepLR"
    own_keys: ClassVar[tuple[str, ...]] = ("milestones", "gamma")

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(sorted(int(m) for m in self.milestones)))

    def _pieces(self, base: float) -> tuple[list[int], list[float]]:
        counts = Counter(self.milestones)
        bounds = sorted(counts)
        values = [base]
        for m in bounds:  # PyTorch: group["lr"] * gamma ** milestones[last_epoch]
            values.append(values[-1] * self.gamma ** counts[m])
        return bounds, values

    def _host(self, t: int, base: float) -> float:
        bounds, values = self._pieces(base)
        return values[bisect.bisect_right(bounds, t)]

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        bounds, values = self._pieces(base)
        index = jnp.searchsorted(jnp.asarray(bounds, jnp.int32), t, side="right")
        return jnp.asarray(values, jnp.float32)[index]

    def _attrs(self) -> dict[str, Any]:
        return {"milestones": Counter(self.milestones), "gamma": self.gamma}


@dataclasses.dataclass(frozen=True)
class ConstantLR(TorchScheduler):
    """`ConstantLR(optimizer, factor, total_iters)`: `lr * factor` for the first
    `total_iters` steps."""

    factor: float = 1.0 / 3
    total_iters: int = 5
    torch_class: ClassVar[str] = "ConstantLR"
    own_keys: ClassVar[tuple[str, ...]] = ("factor", "total_iters")

    def _host(self, t: int, base: float) -> float:
        lr = base * self.factor
        return lr * (1.0 / self.factor) if t >= self.total_iters else lr

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        return jnp.where(t >= self.total_iters, jnp.float32(base), jnp.float32(base * self.factor))

    def _attrs(self) -> dict[str, Any]:
        return {"factor": self.factor, "total_iters": self.total_iters}


@dataclasses.dataclass(frozen=True)
class ExponentialLR(TorchScheduler):
    """`ExponentialLR(optimizer, gamma)`: `lr * gamma**t`."""

    gamma: float
    torch_class: ClassVar[str] = "ExponentialLR"
    own_keys: ClassVar[tuple[str, ...]] = ("gamma",)

    def _host(self, t: int, base: float) -> float:
        return base * self.gamma**t

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        return base * jnp.exp(_f32(t) * jnp.float32(math.log(self.gamma)))

    def _attrs(self) -> dict[str, Any]:
        return {"gamma": self.gamma}


@dataclasses.dataclass(frozen=True)
class CosineAnnealingLR(TorchScheduler):
    """`CosineAnnealingLR(optimizer, T_max, eta_min)`: half a cosine from `lr` down to
    `eta_min` over `T_max` steps, then back up (PyTorch's schedule is periodic, 2 * T_max)."""

    T_max: int
    eta_min: float = 0.0
    torch_class: ClassVar[str] = "CosineAnnealingLR"
    own_keys: ClassVar[tuple[str, ...]] = ("T_max", "eta_min")

    def _host(self, t: int, base: float) -> float:
        return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        # (1 + cos(pi r / T)) / 2 = sin(pi (T - r) / (2T))**2, with r = t mod 2T exact in int32
        r = jnp.mod(t, 2 * self.T_max)
        c = jnp.sin(jnp.float32(math.pi / (2 * self.T_max)) * _f32(self.T_max - r))
        return self.eta_min + (base - self.eta_min) * (c * c)

    def _attrs(self) -> dict[str, Any]:
        return {"T_max": self.T_max, "eta_min": self.eta_min}


@dataclasses.dataclass(frozen=True)
class LinearLR(TorchScheduler):
    """`LinearLR(optimizer, start_factor, end_factor, total_iters)`: the factor goes linearly
    from `start_factor` to `end_factor` over `total_iters` steps, then stays."""

    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5
    torch_class: ClassVar[str] = "LinearLR"
    own_keys: ClassVar[tuple[str, ...]] = ("start_factor", "end_factor", "total_iters")

    def _host(self, t: int, base: float) -> float:
        s, e, n = self.start_factor, self.end_factor, self.total_iters
        return base * (s + (e - s) * min(n, t) / n)

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        s, e, n = self.start_factor, self.end_factor, self.total_iters
        return base * (s + (e - s) * _f32(jnp.minimum(t, n)) / n)

    def _attrs(self) -> dict[str, Any]:
        return {
            "start_factor": self.start_factor,
            "end_factor": self.end_factor,
            "total_iters": self.total_iters,
        }


@dataclasses.dataclass(frozen=True)
class LambdaLR(TorchScheduler):
    """`LambdaLR(optimizer, lr_lambda)`: `lr * lr_lambda(t)`.

    PyTorch does not save the lambda (only the `__dict__` of callable objects), so it must be
    given again; `from_torch_checkpoint` checks it against the saved `_last_lr`. Under
    `jax.jit` it is called with a traced int32 step: write it with operations that accept one
    (`lambda t: 0.95 ** t`, `lambda t: jnp.minimum(1.0, (t + 1) / 10)`), not with Python's
    `min` or `if`. One lambda per group, as PyTorch's list: one `LambdaLR` per group.
    """

    lr_lambda: Callable[[Any], Any]
    torch_class: ClassVar[str] = "LambdaLR"
    own_keys: ClassVar[tuple[str, ...]] = ("lr_lambdas",)

    def _host(self, t: int, base: float) -> float:
        return base * self.lr_lambda(t)

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        return base * jnp.asarray(self.lr_lambda(t), jnp.float32)

    def _attrs(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return f"LambdaLR({getattr(self.lr_lambda, '__name__', self.lr_lambda)!s})"


@dataclasses.dataclass(frozen=True)
class SequentialLR(TorchScheduler):
    """`SequentialLR(optimizer, schedulers, milestones)`: `schedulers[i]` from `milestones[i-1]`
    on, each restarted at its own step 0 (PyTorch calls `_update_lr(0)` at the milestone).

    E.g. warmup then cosine: `SequentialLR([LinearLR(0.01, total_iters=5),
    CosineAnnealingLR(T_max=95)], milestones=[5])`. The inner schedulers share the group's
    initial `lr`, as they share PyTorch's optimizer.
    """

    schedulers: Sequence[TorchScheduler]
    milestones: Sequence[int]
    torch_class: ClassVar[str] = "SequentialLR"
    own_keys: ClassVar[tuple[str, ...]] = ("_milestones", "_schedulers")

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedulers", tuple(self.schedulers))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if len(self.schedulers) < 1:
            raise ValueError("SequentialLR expects at least one scheduler, but got no scheduler.")
        if len(self.milestones) != len(self.schedulers) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more "
                f"than the number of milestone points, but got number of schedulers "
                f"{len(self.schedulers)} and the number of milestones to be equal to "
                f"{len(self.milestones)}"
            )
        for s in self.schedulers:
            if s.torch_class in ("SequentialLR", "OneCycleLR"):
                raise ValueError(
                    f"SequentialLR of a {s.torch_class} is not supported: its inner "
                    "schedulers must be StepLR, MultiStepLR, ConstantLR, ExponentialLR, "
                    "CosineAnnealingLR, LinearLR or LambdaLR."
                )

    def active(self, t: int) -> tuple[int, int]:
        """(index of the scheduler in charge after `t` steps, its own step count)."""
        i = bisect.bisect_right(self.milestones, t)
        return i, t - (self.milestones[i - 1] if i > 0 else 0)

    def _host(self, t: int, base: float) -> float:
        i, local = self.active(t)
        return self.schedulers[i].lr_at(local, base)

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        out = self.schedulers[0]._traced(t, base)
        for i, m in enumerate(self.milestones, start=1):
            inner = self.schedulers[i]._traced(jnp.maximum(t - m, 0), base)
            out = jnp.where(t >= m, inner, out)
        return jnp.asarray(out, jnp.float32)

    def _attrs(self) -> dict[str, Any]:
        return {"_milestones": list(self.milestones)}

    def same_as(self, other: TorchScheduler) -> bool:
        return (
            isinstance(other, SequentialLR)
            and self.milestones == other.milestones
            and len(self.schedulers) == len(other.schedulers)
            and all(a.same_as(b) for a, b in zip(self.schedulers, other.schedulers))
        )

    def describe(self) -> str:
        inner = ", ".join(s.describe() for s in self.schedulers)
        return f"SequentialLR([{inner}], milestones={list(self.milestones)})"
