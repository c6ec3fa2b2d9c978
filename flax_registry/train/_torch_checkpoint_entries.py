"""The entries of a PyTorch training checkpoint: which is the model, the optimizer, the
scheduler (found by their structure, as `torch.save` wrote them), and what else it holds.

A checkpoint's other entries (epoch, RNG states, a `GradScaler`'s state, user metadata) are
returned in `TorchCheckpointExtras`, as saved, tensors as NumPy arrays, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .._arrays import is_torch_tensor, torch_to_numpy
from ..convert import LoadReport
from ..io._lazy import LazyTensor
from ._scheduler_state import SchedulerInfo, torch_scheduler_class
from ._torch_optimizer_state import TorchOptimizerLayout

ROLES = ("model", "optimizer", "scheduler")
_GRAD_SCALER = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}

_NOT_FOUND = (
    "{name}: found no {what} entry in the checkpoint; its entries are {listing}. Expected {shape}. "
    "Fix: pass {role}_key='<entry>'."
)
_AMBIGUOUS = (
    "{name}: several entries look like the {what}: {keys}. Fix: pass {role}_key= one of them."
)


class TorchCheckpointExtras(dict[str, Any]):
    """The entries of a PyTorch training checkpoint that are not the model, the optimizer or
    the scheduler (epoch, RNG states, a GradScaler's state, user metadata), as saved, tensors
    as NumPy arrays; a dict, so `extras["epoch"]` reads and updates them.

    It also records how the checkpoint was read, so that `to_torch_checkpoint(state, ...,
    extras=extras)` writes it back as it came: `entries` (role -> key: which entry was the
    model, optimizer, scheduler), `order` (the checkpoint's top-level keys), `model_report`
    (the `LoadReport` of the model), `optimizer_layout` and `scheduler` (the state as saved).
    `str(extras)` lists everything kept.
    """

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        super().__init__(items or {})
        self.entries: dict[str, str | None] = dict.fromkeys(ROLES)
        self.order: list[str] = []
        self.model_report: LoadReport | None = None
        self.optimizer_layout: TorchOptimizerLayout | None = None
        self.scheduler: SchedulerInfo | None = None
        self.scaler_key: str | None = None  # the GradScaler entry, loaded as state.loss_scale

    def __str__(self) -> str:
        lines = ["PyTorch training checkpoint:"]
        for role in ROLES:
            key = self.entries.get(role)
            lines.append(f"  {role}: {'not in the checkpoint' if key is None else repr(key)}")
        if self.optimizer_layout is not None:
            lines.extend("  " + line for line in str(self.optimizer_layout).splitlines())
        if self.scheduler is not None:
            cls = torch_scheduler_class(self.scheduler.state) or "scheduler"
            lines.append(f"  {cls} at last_epoch={self.scheduler.last_epoch}")
        if self:
            lines.append(f"  kept as extras (not converted), {len(self)} entries:")
            lines.extend(f"    {k!r}: {describe(v)}" for k, v in self.items())
        return "\n".join(lines)


def is_grad_scaler(x: Any) -> bool:
    """`torch.amp.GradScaler.state_dict()`."""
    return isinstance(x, Mapping) and set(x) >= _GRAD_SCALER


def describe(x: Any) -> str:
    """A short description of a checkpoint entry, for listings."""
    if isinstance(x, LazyTensor | np.ndarray) or is_torch_tensor(x):
        return f"tensor {np.dtype(x.dtype) if not is_torch_tensor(x) else x.dtype} {tuple(x.shape)}"
    if isinstance(x, Mapping):
        if is_grad_scaler(x):
            return "GradScaler state_dict (loss_scale=True continues with its scale)"
        if _is_optimizer(x):
            return "optimizer state_dict"
        if _is_scheduler(x):
            return f"{torch_scheduler_class(x) or 'LRScheduler'} state_dict"
        if _is_state_dict(x):
            return f"state_dict of {len(x)} tensors"
        return f"dict of {len(x)} entries"
    if isinstance(x, list | tuple):
        return f"{type(x).__name__} of {len(x)}"
    return (
        f"{type(x).__name__} {x!r}" if isinstance(x, int | float | str | bool) else type(x).__name__
    )


def _is_tensor(x: Any) -> bool:
    return isinstance(x, LazyTensor | np.ndarray | jax.Array) or is_torch_tensor(x)


def _is_state_dict(x: Any) -> bool:
    return (
        isinstance(x, Mapping)
        and bool(x)
        and all(isinstance(k, str) and _is_tensor(v) for k, v in x.items())
    )


def _is_optimizer(x: Any) -> bool:
    return isinstance(x, Mapping) and set(x) == {"state", "param_groups"}


def _is_scheduler(x: Any) -> bool:
    return isinstance(x, Mapping) and "last_epoch" in x and ("base_lrs" in x or "_schedulers" in x)


_SHAPES = {
    "model": ("model", _is_state_dict, "a state dict (str -> tensor)"),
    "optimizer": ("optimizer", _is_optimizer, "optimizer.state_dict() ('state', 'param_groups')"),
    "scheduler": ("scheduler", _is_scheduler, "scheduler.state_dict() ('last_epoch', 'base_lrs')"),
}


def listing(obj: Mapping[str, Any]) -> str:
    return ", ".join(f"{k!r} ({describe(v)})" for k, v in obj.items()) or "none"


def find_entry(
    obj: Mapping[str, Any], role: str, key: str | None, name: str, required: bool
) -> str | None:
    what, test, shape = _SHAPES[role]
    if key is not None:
        if key not in obj:
            raise KeyError(
                f"{name}: {role}_key={key!r} is not an entry of the checkpoint; its entries are "
                f"{listing(obj)}."
            )
        if not test(obj[key]):
            raise ValueError(
                f"{name}: entry {key!r} is {describe(obj[key])}, not {shape}. Fix: pass the "
                f"{role}_key of the {what} entry."
            )
        return key
    found = [k for k, v in obj.items() if test(v)]
    if len(found) > 1:
        raise ValueError(_AMBIGUOUS.format(name=name, what=what, keys=found, role=role))
    if not found:
        if required:
            raise ValueError(
                _NOT_FOUND.format(
                    name=name, what=what, listing=listing(obj), shape=shape, role=role
                )
            )
        return None
    return found[0]


def materialize(x: Any) -> Any:
    """Tensors read into NumPy arrays (the file closes after loading), containers kept."""
    if isinstance(x, LazyTensor):
        return x.read()
    if is_torch_tensor(x):
        return torch_to_numpy(x).copy()
    if isinstance(x, dict):
        out = type(x)() if type(x) is not dict else {}
        out.update({k: materialize(v) for k, v in x.items()})
        return out
    if isinstance(x, list):
        return [materialize(v) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(materialize(v) for v in x)
    return x


def to_torch_tree(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        from .._arrays import numpy_to_torch

        return numpy_to_torch(x)
    if isinstance(x, dict):
        out = type(x)() if type(x) is not dict else {}
        out.update({k: to_torch_tree(v) for k, v in x.items()})
        return out
    if isinstance(x, list):
        return [to_torch_tree(v) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(to_torch_tree(v) for v in x)
    return x
