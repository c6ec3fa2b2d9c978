"""A `TrainState`'s `opt_state` as PyTorch's `optimizer.state_dict()` (the export direction).

The inverse of `optimizer_state_from_torch`: per PyTorch group (in the layout a checkpoint
came in, or flax_registry's groups in order), its parameters' indices, their state tensors in
torch layout (`momentum_buffer`; `step`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`) and the
group's hyper-parameters at the current step (`lr` from the schedule, `initial_lr` & co.).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optax

from ._labels import DEFAULT, FROZEN, group_list
from ._optim import TorchSGDState
from ._state import TrainState
from ._torch_optimizer_state import (
    Groups,
    TorchOptimizerLayout,
    group_labels,
    inner_states,
    plan_and_entries,
    tree_get,
)
from ._torch_param_groups import ParamEntry, as_torch_optimizer, expected_groups, group_dict


def _to_torch(entry: ParamEntry, tree: Any) -> np.ndarray:
    pieces = [
        part.layout.to_torch(np.asarray(part.take(np.asarray(tree_get(tree, part.path)))))
        for part in entry.parts
    ]
    array = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=entry.axis)
    return np.array(array, copy=True)


def optimizer_state_to_torch(
    state: TrainState,
    tx: optax.GradientTransformation,
    *,
    param_groups: Groups = (),
    layout: TorchOptimizerLayout | None = None,
    group_order: Sequence[str] | None = None,
    frozen_in_optimizer: bool = False,
    as_torch: bool = False,
    example_inputs: Any = None,
    rules: Any = None,
    tied: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """PyTorch's `optimizer.state_dict()` for `state`: what `optimizer.load_state_dict`
    accepts for a PyTorch optimizer built over the same groups (the inverse of
    `optimizer_state_from_torch`).

    `layout` (from `optimizer_state_from_torch` / `from_torch_checkpoint`) writes the groups
    as they came, with the entries not modelled here and the state of parameters frozen here;
    without it, groups are `group_order` (default `"default"`, then the `ParamGroup`s), each
    in model order, frozen parameters left out unless `frozen_in_optimizer`. Tensors are NumPy
    arrays, or torch tensors with `as_torch=True`; Adam's `step` is a float32 scalar tensor as
    in PyTorch, and parameters hold no state before the first step, as in PyTorch.
    """
    result, _ = export_optimizer_state(
        state,
        tx,
        param_groups,
        layout,
        group_order,
        frozen_in_optimizer,
        example_inputs,
        rules,
        tied,
    )
    return _as_torch(result) if as_torch else result


def export_optimizer_state(
    state: TrainState,
    tx: optax.GradientTransformation,
    param_groups: Groups,
    layout: TorchOptimizerLayout | None,
    group_order: Sequence[str] | None,
    frozen_in_optimizer: bool,
    example_inputs: Any,
    rules: Any,
    tied: Mapping[str, str] | None,
) -> tuple[dict[str, Any], list[tuple[str, int, Any]]]:
    """`optimizer_state_to_torch` (NumPy), and each PyTorch group's label, step count and
    optimizer (None for a group of frozen parameters only)."""
    groups = group_list(param_groups)
    txs: dict[str, Any] = {DEFAULT: tx, **{g.name: g.tx for g in groups if g.name is not None}}
    order = [n for g in layout.groups for n in g.names] if layout is not None else None
    plan, entries = plan_and_entries(state, groups, None, example_inputs, rules, tied)
    by_name = {e.name: e for e in entries}
    if layout is not None:
        missing = [n for n in order or [] if plan.aliases.get(n, n) not in by_name]
        if missing:
            raise ValueError(f"layout lists {missing}, which are not parameters of {plan.cls}")
        torch_groups = [
            (g.label, [by_name[plan.aliases.get(n, n)] for n in g.names], g.torch_only, g.key_order)
            for g in layout.groups
        ]
    else:
        torch_groups = [
            (label, members, {}, [])
            for label, members in expected_groups(
                entries, group_labels(groups, group_order), frozen_in_optimizer
            )
        ]
    inner = inner_states(state.opt_state)
    out_state: dict[int, dict[str, Any]] = {}
    out_groups: list[dict[str, Any]] = []
    info: list[tuple[str, int, Any]] = []
    index = 0
    for label, members, torch_only, key_order in torch_groups:
        s = inner.get(label)
        count = int(s.step) if s is not None else int(state.step)
        ids = []
        for entry in members:
            ids.append(index)
            if entry.label == FROZEN:
                kept = layout.frozen_state.get(entry.name) if layout is not None else None
                if kept:
                    out_state[index] = dict(kept)
            elif count > 0 and s is not None:
                param_state = _torch_param_state(s, entry, count)
                if param_state:  # SGD without momentum keeps nothing, as in PyTorch
                    out_state[index] = param_state
            index += 1
        if label in txs:
            otx = as_torch_optimizer(label, txs[label])
            extra = dict(torch_only)
            if "param_names" in extra:
                extra["param_names"] = [e.name for e in members]
            out_groups.append(group_dict(otx, count, extra, ids, key_order))
            info.append((label, count, otx))
        else:
            out_groups.append({**torch_only, "params": ids})
            info.append((label, count, None))
    return {"state": out_state, "param_groups": out_groups}, info


def _torch_param_state(s: Any, entry: ParamEntry, count: int) -> dict[str, Any]:
    if isinstance(s, TorchSGDState):
        if isinstance(s.momentum_buffer, optax.EmptyState):
            return {}
        return {"momentum_buffer": _to_torch(entry, s.momentum_buffer)}
    out: dict[str, Any] = {"step": np.asarray(count, np.float32)}
    out["exp_avg"] = _to_torch(entry, s.exp_avg)
    out["exp_avg_sq"] = _to_torch(entry, s.exp_avg_sq)
    if not isinstance(s.max_exp_avg_sq, optax.EmptyState):
        out["max_exp_avg_sq"] = _to_torch(entry, s.max_exp_avg_sq)
    return out


def _as_torch(result: dict[str, Any]) -> dict[str, Any]:
    from .._arrays import numpy_to_torch

    def convert(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            return numpy_to_torch(x)
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        return x

    result["state"] = {i: convert(st) for i, st in result["state"].items()}
    return result
