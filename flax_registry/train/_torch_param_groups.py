"""PyTorch's `param_groups` and parameter indices against flax_registry's labels and optimizers.

`optimizer.state_dict()` names no parameter: its `state` is keyed by the position of each
parameter in the concatenation of the groups' `params` lists, which follow the order the
user handed them to the optimizer, in practice `model.parameters()` (or a filter of it). This
module ties every position to a torch name, hence to the flax variable(s) behind it, through
the conversion plan of the registry (tied and shared parameters counted once, as
`model.parameters()` does), and checks each group's hyper-parameters against the
`TorchOptimizer` that trains that group here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._names import VariableInfo
from .._nested import KeyPath as Path
from .._patterns import as_patterns, matches
from .._registry import PARAMS
from ..convert._plan import Part, Plan
from ._labels import DEFAULT, FROZEN, ParamGroup
from ._one_cycle import OneCycleLR, TorchMomentum
from ._optim import TorchOptimizer
from ._schedules import TorchLR

TORCH_ONLY_DEFAULTS: dict[str, dict[str, Any]] = {
    "SGD": {"foreach": None, "differentiable": False, "fused": None},
    "Adam": {"foreach": None, "capturable": False, "differentiable": False, "fused": None},
}
"""`param_groups` entries flax_registry has no use for (kernel choices), PyTorch's defaults."""
TORCH_ONLY_DEFAULTS["AdamW"] = TORCH_ONLY_DEFAULTS["Adam"]

_HPARAM_ORDER = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    "Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
}
_HPARAM_ORDER["AdamW"] = _HPARAM_ORDER["Adam"]
_SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")
_SIGNATURES = {  # keys that only one torch.optim class's param_groups have
    "SGD": {"momentum", "dampening", "nesterov"},
    "Adam": {"betas", "eps", "amsgrad"},
    "RMSprop": {"alpha", "centered"},
    "Adagrad": {"lr_decay", "initial_accumulator_value"},
    "Adadelta": {"rho"},
    "Adamax": {"betas", "eps"},
    "NAdam": {"momentum_decay"},
    "RAdam": {"decoupled_weight_decay", "betas"},
    "ASGD": {"lambd", "alpha", "t0"},
    "Rprop": {"etas", "step_sizes"},
    "LBFGS": {"max_iter", "history_size"},
}

_GROUP_COUNT = (
    "loaded state dict has a different number of parameter groups: the checkpoint's optimizer "
    "has {found} (sizes {found_sizes}), flax_registry's has {expected} ({expected_desc}). Fix: "
    "give create_train_state / from_torch_checkpoint one ParamGroup per extra PyTorch group "
    "(group_order=[...] names them in PyTorch's order), or merge groups on the PyTorch side."
)
_GROUP_SIZE = (
    "loaded state dict contains a parameter group that doesn't match the size of optimizer's "
    "group: param_groups[{index}] holds {found} parameters in the checkpoint, flax_registry's "
    "group {label!r} holds {expected} ({names}){frozen}. Fix: make the ParamGroup patterns and "
    "frozen= select the parameters that PyTorch group holds, pass group_order=[...] if the "
    "groups are in another order, or frozen_in_optimizer=True/False to say whether "
    "requires_grad=False parameters were handed to the PyTorch optimizer."
)
_MIXED_GROUP = (
    "param_groups[{index}] of the checkpoint holds {a!r} (flax_registry group {la!r}) and {b!r} "
    "(group {lb!r}): one PyTorch group must be one flax_registry group. Fix: change the "
    "ParamGroup patterns so that these parameters share a group."
)
_NAMES_DIFFER = (
    "param_groups[{index}] of the checkpoint lists parameter {name!r} (param_names), which is "
    "not a parameter of {cls}: its parameters are {known}. Fix: load the checkpoint into the "
    "model it was trained with, or rename the model's parameters."
)
_OPT_TYPE = (
    "param_groups[{index}] of the checkpoint has the hyper-parameters of torch.optim.{found} "
    "({keys}), but flax_registry group {label!r} is trained by {expected}. Fix: train that "
    "group with fr.train.torch_{fix}(...), with PyTorch's hyper-parameters."
)
_NOT_TORCH = (
    "flax_registry group {label!r} is trained by {tx}, which is not torch_sgd, torch_adam or "
    "torch_adamw: PyTorch's optimizer state has no counterpart in it. Fix: use the "
    "fr.train.torch_* optimizer that matches the PyTorch one."
)
_HPARAM = (
    "param_groups[{index}] (flax_registry group {label!r}): {key} is {found!r} in the "
    "checkpoint, but {expected!r} in {tx}. Fix: build the optimizer with PyTorch's value "
    "({key}={found!r}) or load a checkpoint written with {key}={expected!r}."
)


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One parameter as `model.parameters()` yields it: its torch name, the flax variable(s)
    behind it (several when one torch tensor is split here, e.g. a fused qkv projection),
    its label (`"default"`, a group name or `"frozen"`) and the group it would belong to
    were it not frozen (where PyTorch lists it when frozen parameters are handed over)."""

    name: str
    parts: tuple[Part, ...]
    axis: int
    torch_shape: tuple[int, ...]
    label: str
    group: str


def _group_of(info: VariableInfo | None, groups: Sequence[ParamGroup]) -> str:
    if info is not None:
        for g in groups:
            if any(matches(p, info.names) for p in as_patterns(g.patterns)):
                assert g.name is not None
                return g.name
    return DEFAULT


def param_entries(
    plan: Plan,
    infos: Mapping[Path, VariableInfo],
    frozen: frozenset[Path],
    groups: Sequence[ParamGroup],
    order: Sequence[str] | None = None,
) -> list[ParamEntry]:
    """Every parameter once, in `model.parameters()` order: `order` (torch names, e.g. the
    checkpoint's state_dict keys; other names are skipped, aliases count once) or the plan's."""
    entries: dict[str, ParamEntry] = {}
    for key, e in plan.entries.items():
        if not all(p.collection == PARAMS for p in e.parts):
            continue
        labels = {
            FROZEN if p.path in frozen else _group_of(infos.get(p.path), groups) for p in e.parts
        }
        bases = {_group_of(infos.get(p.path), groups) for p in e.parts}
        if len(labels) > 1 or len(bases) > 1:
            raise ValueError(
                f"torch parameter {key!r} is one tensor in PyTorch but its flax variables "
                f"{[p.where for p in e.parts]} are in different groups ({sorted(labels)}): "
                "PyTorch cannot train parts of one tensor differently. Fix: put them in one group."
            )
        entries[key] = ParamEntry(key, e.parts, e.axis, e.torch_shape, labels.pop(), bases.pop())
    if order is None:
        return list(entries.values())
    ordered: dict[str, ParamEntry] = {}
    for name in order:
        canonical = plan.aliases.get(name, name)
        if canonical in entries and canonical not in ordered:
            ordered[canonical] = entries[canonical]
    left = [k for k in entries if k not in ordered]
    if left:
        raise ValueError(
            f"the PyTorch parameter order given does not list {left} (parameters of "
            f"{plan.cls}). Fix: pass every name of model.named_parameters(), in its order."
        )
    return list(ordered.values())


@dataclasses.dataclass
class TorchGroup:
    """One entry of PyTorch's `param_groups`: the flax_registry group (`label`) it is, its
    parameters' torch names in its `params` order, and the entries flax_registry does not
    model (`foreach`, `fused`, user keys ...), kept so an export writes them back."""

    label: str
    names: list[str]
    torch_only: dict[str, Any] = dataclasses.field(default_factory=dict)
    key_order: list[str] = dataclasses.field(default_factory=list)  # PyTorch's, as saved


def torch_class_of(group: Mapping[str, Any]) -> str:
    """The `torch.optim` class whose `param_groups` have these keys ('' if none is known)."""
    keys = set(group)
    if _SIGNATURES["SGD"] <= keys:
        return "SGD"
    if _SIGNATURES["Adam"] <= keys and not keys & {"momentum_decay", "rho", "lambd"}:
        return "AdamW" if group.get("decoupled_weight_decay") else "Adam"
    for name, signature in _SIGNATURES.items():
        if signature <= keys:
            return name
    return ""


def _fix_name(cls: str) -> str:
    return {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}.get(cls, cls.lower())


def expected_groups(
    entries: Sequence[ParamEntry], labels: Sequence[str], frozen_in: bool
) -> list[tuple[str, list[ParamEntry]]]:
    """PyTorch's groups as flax_registry sees them: `labels` in order, each with its
    parameters in model order; frozen ones in the group they would be in (if `frozen_in`)."""
    out = []
    for label in labels:
        members = [
            e
            for e in entries
            if e.label == label or (frozen_in and e.label == FROZEN and e.group == label)
        ]
        if members:
            out.append((label, members))
    return out


def _sizes(groups: Sequence[tuple[str, Sequence[ParamEntry]]]) -> str:
    return ", ".join(f"{label!r}: {len(m)}" for label, m in groups) or "none"


def match_groups(
    torch_groups: Sequence[Mapping[str, Any]],
    entries: Sequence[ParamEntry],
    labels: Sequence[str],
    frozen_in: bool | None,
    cls: str,
) -> tuple[list[tuple[str, list[ParamEntry]]], bool]:
    """Each PyTorch group's flax_registry label and parameters (in index order), and whether
    frozen parameters are in PyTorch's groups. Names come from `param_names` when PyTorch
    saved them; otherwise from the group sizes, which must all match."""
    by_name = {e.name: e for e in entries}
    if torch_groups and all("param_names" in g for g in torch_groups):
        out = []
        for i, g in enumerate(torch_groups):
            members = []
            for name in g["param_names"]:
                if name not in by_name:
                    raise ValueError(
                        _NAMES_DIFFER.format(index=i, name=name, cls=cls, known=list(by_name)[:20])
                    )
                members.append(by_name[name])
            trained = [e for e in members if e.label != FROZEN]
            other = [e for e in trained if e.label != trained[0].label]
            if other:
                a, b = trained[0], other[0]
                raise ValueError(
                    _MIXED_GROUP.format(index=i, a=a.name, la=a.label, b=b.name, lb=b.label)
                )
            label = trained[0].label if trained else members[0].group if members else FROZEN
            out.append((label, members))
        return out, any(e.label == FROZEN for _, m in out for e in m)
    found = [len(g["params"]) for g in torch_groups]
    candidates = [False, True] if frozen_in is None else [frozen_in]
    tried = []
    for flag in candidates:
        expected = expected_groups(entries, labels, flag)
        if [len(m) for _, m in expected] == found:
            return expected, flag
        tried.append((flag, expected))
    flag, expected = tried[0]
    if len(expected) != len(found):
        raise ValueError(
            _GROUP_COUNT.format(
                found=len(found),
                found_sizes=found,
                expected=len(expected),
                expected_desc=_sizes(expected),
            )
        )
    for i, ((label, members), n) in enumerate(zip(expected, found)):
        if len(members) != n:
            frozen = [e.name for e in entries if e.label == FROZEN]
            note = f"; frozen, not counted: {frozen}" if frozen and not flag else ""
            names = [e.name for e in members]
            raise ValueError(
                _GROUP_SIZE.format(
                    index=i, found=n, label=label, expected=len(members), names=names, frozen=note
                )
            )
    raise AssertionError("unreachable")


def _value_at(x: Any, count: int) -> Any:
    if isinstance(x, TorchLR | TorchMomentum):
        return x(count)
    if callable(x):
        return float(x(count))
    return x


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return bool(a == b)


def torch_hyperparams(tx: TorchOptimizer, count: int) -> dict[str, Any]:
    """The `param_groups` entries PyTorch has for `tx` after `count` steps (lr and momentum at
    that step; `initial_lr` & co. where a scheduler is attached), in PyTorch's order."""
    hp = tx.hyperparams
    out: dict[str, Any] = {}
    for key in _HPARAM_ORDER[tx.torch_class]:
        value = hp[key]
        if key == "betas":
            value = (_value_at(value[0], count), value[1])
        out[key] = _value_at(value, count)
    lr = hp["lr"]
    if isinstance(lr, TorchLR):
        if isinstance(lr.scheduler, OneCycleLR):
            out.update(lr.scheduler.group_values(lr.lr))
        else:
            out["initial_lr"] = lr.base_lr
    return out


def as_torch_optimizer(label: str, tx: Any) -> TorchOptimizer:
    if not isinstance(tx, TorchOptimizer) or tx.torch_class not in _HPARAM_ORDER:
        raise TypeError(_NOT_TORCH.format(label=label, tx=f"an optax {type(tx).__name__}"))
    return tx


def check_class(index: int, group: Mapping[str, Any], label: str, tx: TorchOptimizer) -> None:
    """Check that PyTorch's `param_groups[index]` is of the optimizer class `tx` follows."""
    found_cls = torch_class_of(group)
    expected_cls = tx.torch_class
    same = found_cls == expected_cls or (
        # torch < 2.6 AdamW/Adam groups have no decoupled_weight_decay: either may be either
        "decoupled_weight_decay" not in group and {found_cls, expected_cls} == {"Adam", "AdamW"}
    )
    if not same:
        keys = sorted(set(group) & set().union(*_SIGNATURES.values())) or sorted(group)
        raise ValueError(
            _OPT_TYPE.format(
                index=index,
                found=found_cls or "<unknown optimizer>",
                keys=", ".join(keys),
                label=label,
                expected=f"fr.train.torch_{_fix_name(expected_cls)} ({expected_cls})",
                fix=_fix_name(found_cls) if found_cls in _HPARAM_ORDER else "sgd/adam/adamw",
            )
        )


def check_group(
    index: int, group: Mapping[str, Any], label: str, tx: TorchOptimizer, count: int
) -> dict[str, Any]:
    """Check PyTorch's `param_groups[index]` against `tx` after `count` steps; return the
    entries flax_registry does not model (kept for the export)."""
    check_class(index, group, label, tx)
    expected_cls = tx.torch_class
    desc = f"fr.train.torch_{_fix_name(expected_cls)}"
    for key, expected in torch_hyperparams(tx, count).items():
        if key not in group:
            if key in _SCHEDULER_KEYS:
                raise ValueError(
                    f"param_groups[{index}] (flax_registry group {label!r}) has no {key!r}: no "
                    f"PyTorch scheduler was attached to the optimizer, but {desc} of this group "
                    "has a learning-rate schedule. Fix: pass lr as a number, or load a "
                    "checkpoint saved with its scheduler."
                )
            raise ValueError(
                f"param_groups[{index}] (flax_registry group {label!r}) has no {key!r}: found "
                f"{sorted(group)}. Expected the param_groups of torch.optim.{expected_cls}."
            )
        if not _equal(group[key], expected):
            raise ValueError(
                _HPARAM.format(
                    index=index, label=label, key=key, found=group[key], expected=expected, tx=desc
                )
            )
    if "initial_lr" in group and not isinstance(tx.hyperparams["lr"], TorchLR):
        raise ValueError(
            f"param_groups[{index}] (flax_registry group {label!r}) has initial_lr="
            f"{group['initial_lr']!r}: a PyTorch scheduler drove its learning rate, but {desc} of "
            "this group has a constant lr. Fix: pass lr=<Scheduler>(...).schedule(initial_lr) "
            "with PyTorch's scheduler (fr.train.StepLR, CosineAnnealingLR, ...)."
        )
    modelled = set(torch_hyperparams(tx, count)) | {"params", "decoupled_weight_decay"}
    return {k: v for k, v in group.items() if k not in modelled}


def group_dict(
    tx: TorchOptimizer,
    count: int,
    torch_only: Mapping[str, Any],
    params: list[int],
    key_order: Sequence[str] = (),
) -> dict[str, Any]:
    """PyTorch's `param_groups` entry for `tx` after `count` steps, keys in PyTorch's order
    (`key_order` where the group came from PyTorch: user-given keys come first there)."""
    hp = torch_hyperparams(tx, count)
    scheduler = {k: hp.pop(k) for k in _SCHEDULER_KEYS if k in hp}
    out: dict[str, Any] = dict(hp)
    extra = dict(torch_only)
    for key, default in TORCH_ONLY_DEFAULTS[tx.torch_class].items():
        out[key] = extra.pop(key, default)
    if tx.torch_class != "SGD":
        out["decoupled_weight_decay"] = tx.hyperparams["decoupled_weight_decay"]
    out.update(scheduler)
    out.update(extra)
    out["params"] = params
    if key_order:
        rank = {k: i for i, k in enumerate(key_order)}
        out = dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    return out
