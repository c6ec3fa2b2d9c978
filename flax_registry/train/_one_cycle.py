"""PyTorch's `OneCycleLR` as optax schedules: the learning rate and the cycled momentum.

`OneCycleLR` is the one PyTorch scheduler that also rewrites an optimizer hyper-parameter
other than `lr`: with `cycle_momentum=True` (its default) SGD's `momentum` or Adam's `beta1`
follows a second schedule, `OneCycleLR.momentum()`, which `torch_sgd(momentum=...)` and
`torch_adam(betas=(..., beta2))` accept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from ._schedules import TorchScheduler, _f32, _is_traced


def _phases(total: int, pct: float, three: bool) -> list[dict[str, Any]]:
    """OneCycleLR's `_schedule_phases`, as PyTorch builds them."""
    if three:
        return [
            {"end_step": float(pct * total) - 1, "start_lr": "initial_lr", "end_lr": "max_lr",
             "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
            {"end_step": float(2 * pct * total) - 2, "start_lr": "max_lr",
             "end_lr": "initial_lr", "start_momentum": "base_momentum",
             "end_momentum": "max_momentum"},
            {"end_step": total - 1, "start_lr": "initial_lr", "end_lr": "min_lr",
             "start_momentum": "max_momentum", "end_momentum": "max_momentum"},
        ]  # fmt: skip
    return [
        {"end_step": float(pct * total) - 1, "start_lr": "initial_lr", "end_lr": "max_lr",
         "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
        {"end_step": total - 1, "start_lr": "max_lr", "end_lr": "min_lr",
         "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
    ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class OneCycleLR(TorchScheduler):
    """`OneCycleLR(optimizer, max_lr, total_steps, ...)`: up from `max_lr / div_factor` to
    `max_lr`, then down to `initial_lr / final_div_factor`.

    Here `schedule(max_lr)` takes the group's `max_lr` (PyTorch's `max_lr`, or its entry for
    that group); the optimizer's own `lr` plays no part, as in PyTorch. With
    `cycle_momentum=True` (PyTorch's default) PyTorch also cycles SGD's `momentum` or Adam's
    `beta1`: pass `momentum=cycle.momentum()` to `torch_sgd`, or
    `betas=(cycle.momentum(), 0.999)` to `torch_adam`/`torch_adamw`. Past `total_steps`
    PyTorch raises; under jit the schedule stays at its last value.
    """

    total_steps: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    torch_class: ClassVar[str] = "OneCycleLR"
    own_keys: ClassVar[tuple[str, ...]] = (
        "total_steps",
        "_schedule_phases",
        "_anneal_func_type",
        "cycle_momentum",
    )

    def __post_init__(self) -> None:
        if self.total_steps is None:
            if self.epochs is None or self.steps_per_epoch is None:
                raise ValueError(
                    "You must define either total_steps OR (epochs AND steps_per_epoch)"
                )
            object.__setattr__(self, "total_steps", self.epochs * self.steps_per_epoch)
        if self.anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"anneal_strategy must be one of 'cos' or 'linear', instead got "
                f"{self.anneal_strategy}"
            )

    @property
    def _total(self) -> int:
        assert self.total_steps is not None
        return self.total_steps

    def initial_lr(self, lr: float) -> float:
        return lr / self.div_factor

    def group_values(self, max_lr: float) -> dict[str, float]:
        """The entries OneCycleLR adds to a param group (`initial_lr`, `max_lr`, `min_lr`,
        and with `cycle_momentum` `max_momentum`, `base_momentum`)."""
        initial = max_lr / self.div_factor
        out = {"initial_lr": initial, "max_lr": max_lr, "min_lr": initial / self.final_div_factor}
        if self.cycle_momentum:
            out.update(max_momentum=self.max_momentum, base_momentum=self.base_momentum)
        return out

    def _anneal(self, start: Any, end: Any, pct: Any, *, xp: Any = math) -> Any:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (xp.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _host_value(self, t: int, values: dict[str, float], which: str) -> float:
        if t > self._total:
            raise ValueError(
                f"Tried to step {t} times. The specified number of total steps is {self._total}"
            )
        start_step = 0.0
        phases = _phases(self._total, self.pct_start, self.three_phase)
        for i, phase in enumerate(phases):
            end_step = phase["end_step"]
            if t <= end_step or i == len(phases) - 1:
                pct = (t - start_step) / (end_step - start_step)
                return float(
                    self._anneal(
                        values[phase[f"start_{which}"]], values[phase[f"end_{which}"]], pct
                    )
                )
            start_step = phase["end_step"]
        raise AssertionError("unreachable")

    def _traced_value(self, t: jax.Array, values: dict[str, float], which: str) -> jax.Array:
        t = jnp.minimum(t, self._total)
        phases = _phases(self._total, self.pct_start, self.three_phase)
        out = jnp.float32(0.0)
        start_step = 0.0
        for i in reversed(range(len(phases))):
            phase = phases[i]
            start_step = phases[i - 1]["end_step"] if i > 0 else 0.0
            end_step = phase["end_step"]
            start = values[phase[f"start_{which}"]]
            end = values[phase[f"end_{which}"]]
            span = end_step - start_step
            # Anchored at the nearer end (no cancellation when the value is small there):
            # cos: start + (end - start) * sin(pi p / 2)**2 = end + (start - end) * sin(pi q / 2)**2
            p = (_f32(t) - start_step) / span
            q = (end_step - _f32(t)) / span  # 1 - p, without rounding
            if self.anneal_strategy == "cos":
                from_start = (end - start) * jnp.sin(jnp.float32(math.pi / 2) * p) ** 2
                from_end = (start - end) * jnp.sin(jnp.float32(math.pi / 2) * q) ** 2
            else:
                from_start, from_end = (end - start) * p, (start - end) * q
            value = jnp.where(p < 0.5, start + from_start, end + from_end)
            out = value if i == len(phases) - 1 else jnp.where(t <= end_step, value, out)
        return jnp.asarray(out, jnp.float32)

    def _host(self, t: int, base: float) -> float:
        return self._host_value(t, self.group_values(base * self.div_factor), "lr")

    def _traced(self, t: jax.Array, base: float) -> jax.Array:
        return self._traced_value(t, self.group_values(base * self.div_factor), "lr")

    def momentum(self) -> TorchMomentum:
        """The cycled momentum (SGD's `momentum`, Adam's `beta1`) as an optax schedule."""
        if not self.cycle_momentum:
            raise ValueError(
                "OneCycleLR(cycle_momentum=False) leaves momentum alone: pass the optimizer's "
                "momentum (or betas) as a number."
            )
        return TorchMomentum(self)

    def _attrs(self) -> dict[str, Any]:
        return {
            "total_steps": self._total,
            "_schedule_phases": _phases(self._total, self.pct_start, self.three_phase),
            "_anneal_func_type": self.anneal_strategy,
            "cycle_momentum": self.cycle_momentum,
        }

    def describe(self) -> str:
        return (
            f"OneCycleLR(total_steps={self._total}, pct_start={self.pct_start}, "
            f"anneal_strategy={self.anneal_strategy!r}, cycle_momentum={self.cycle_momentum}, "
            f"div_factor={self.div_factor}, final_div_factor={self.final_div_factor}, "
            f"three_phase={self.three_phase})"
        )


@dataclasses.dataclass(frozen=True)
class TorchMomentum:
    """`OneCycleLR`'s cycled momentum as an optax schedule (float64 for a concrete count, as
    PyTorch writes into `param_group["momentum"]` or `param_group["betas"][0]`)."""

    scheduler: OneCycleLR

    def __call__(self, count: Any) -> Any:
        values = self.scheduler.group_values(1.0)
        if _is_traced(count):
            return self.scheduler._traced_value(count, values, "momentum")
        return self.scheduler._host_value(int(count), values, "momentum")
