"""PyTorch's `optimizer.state_dict()` <-> a `TrainState`'s `opt_state`, both ways, exactly.

PyTorch keeps, per parameter index, `momentum_buffer` (SGD) or `step`, `exp_avg`,
`exp_avg_sq`, `max_exp_avg_sq` (Adam, AdamW), and per group its hyper-parameters and `params`
index list. Here the same numbers live in the `TorchSGDState` / `TorchAdamState` of each
label of the `optax.partition` state that `create_train_state` builds, in flax layout (a
`nn.Dense` kernel's `exp_avg` is transposed like the kernel) and with one step counter per
group. Conversion is data movement only (no arithmetic), so both directions are bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._arrays import is_torch_tensor, torch_to_numpy
from .._names import torch_names
from .._nested import KeyPath as Path
from .._nested import key_path
from .._patterns import Patterns
from ..convert._plan import Plan, make_plan
from ._labels import DEFAULT, FROZEN, ParamGroup, group_list
from ._optim import TorchAdamState, TorchOptimizer, TorchSGDState
from ._state import TrainState
from ._torch_param_groups import (
    TORCH_ONLY_DEFAULTS,
    ParamEntry,
    TorchGroup,
    as_torch_optimizer,
    check_class,
    check_group,
    match_groups,
    param_entries,
)

Groups = Sequence[ParamGroup | tuple[Patterns, optax.GradientTransformation]]

_STATE_KEYS = (
    "optimizer state of parameter {index} ({name!r}, flax_registry group {label!r}) has "
    "entries {found}, expected {expected} for torch.optim.{cls}{why}. Fix: build the optimizer "
    "with PyTorch's hyper-parameters, or check that the checkpoint is this model's."
)
_STATE_SHAPE = (
    "size mismatch for optimizer state {key!r} of parameter {index} ({name!r}): copying a "
    "tensor with shape {found} from checkpoint, the shape in current model is {expected}. The "
    "optimizer's parameters are not in the order flax_registry assumed (model.parameters() "
    "order{order}). Fix: pass param_order=[names in the order given to the PyTorch optimizer] "
    "or group_order=[...]."
)
_LEFT_OUT = (
    "parameters {names} of {cls} are trained here but in none of the checkpoint's "
    "param_groups: PyTorch's optimizer did not train them. Fix: freeze them (frozen=[...]), "
    "or list their group in group_order."
)
_STEPS_DIFFER = (
    "optimizer state: parameter {a!r} has step {sa} and parameter {b!r} has step {sb} in the "
    "same param_groups[{index}]; flax_registry keeps one step count per group. Fix: load a "
    "checkpoint in which the group's parameters were stepped together."
)
_NO_STATE = (
    "optimizer state: parameter {index} ({name!r}, group {label!r}) has no state in the "
    "checkpoint while {other!r} of the same group has (PyTorch skips parameters whose .grad is "
    "None). flax_registry updates every trainable parameter at every step, so it cannot "
    "continue this run exactly. Fix: freeze {name!r} (frozen=[...]) if it is never trained."
)
_SGD_STEP = (
    "torch.optim.SGD saves no step count, and the checkpoint holds momentum buffers: pass "
    "step=<number of optimizer steps taken> (e.g. the checkpoint's 'step' or 'epoch * "
    "steps_per_epoch'), or save a learning-rate scheduler, whose last_epoch gives it."
)
_STEP_ARG = (
    "{source} is {given}, but the checkpoint's optimizer state says {found} steps (the 'step' "
    "of param_groups[{index}]'s parameters). Fix: {fix}"
)
STEP_FIXES = {
    "step": "drop step=, or pass the right count.",
    "the scheduler's last_epoch": (
        "flax_registry's schedules count optimizer steps, so the PyTorch scheduler must have "
        "been stepped once per optimizer.step(); a scheduler stepped once per epoch cannot be "
        "converted."
    ),
}


@dataclasses.dataclass
class TorchOptimizerLayout:
    """How a PyTorch optimizer's `param_groups` map onto flax_registry's groups.

    - `groups`: PyTorch's groups in order, each with its flax_registry label, its parameters'
      torch names in its `params` order, and the entries not modelled here (kept);
    - `frozen_in_optimizer`: whether parameters frozen here (`requires_grad=False` there)
      are in PyTorch's groups (`SGD(model.parameters())`) or not (`SGD(filter(...))`);
    - `frozen_state`: the state PyTorch kept for parameters that are frozen here (trained
      before they were frozen); not used here, written back by the export.

    `optimizer_state_to_torch(..., layout=layout)` writes the optimizer back in this layout.
    """

    groups: list[TorchGroup]
    frozen_in_optimizer: bool = False
    frozen_state: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"PyTorch optimizer: {len(self.groups)} param group(s)"]
        defaults = TORCH_ONLY_DEFAULTS["Adam"]
        for i, g in enumerate(self.groups):
            kept = {k: v for k, v in g.torch_only.items() if k not in defaults or defaults[k] != v}
            extra = f", kept as they are: {kept}" if kept else ""
            lines.append(
                f"  param_groups[{i}] = group {g.label!r}: {len(g.names)} parameters{extra}"
            )
        if self.frozen_state:
            lines.append(f"  state kept for parameters frozen here: {sorted(self.frozen_state)}")
        return "\n".join(lines)


def _to_numpy(x: Any) -> np.ndarray:
    if is_torch_tensor(x):
        return torch_to_numpy(x)
    return np.asarray(x)


def inner_states(opt_state: Any) -> dict[str, Any]:
    if not isinstance(opt_state, optax.transforms.PartitionState):
        raise TypeError(
            f"state.opt_state is a {type(opt_state).__name__}, not the optax.partition state "
            "that create_train_state builds: create the TrainState with create_train_state."
        )
    return {label: ms.inner_state for label, ms in opt_state.inner_states.items()}


def _replace_inner(opt_state: Any, inner: Mapping[str, Any]) -> Any:
    states = {
        label: optax.transforms.MaskedState(inner_state=inner.get(label, ms.inner_state))
        for label, ms in opt_state.inner_states.items()
    }
    return opt_state._replace(inner_states=states)


def tree_get(tree: Any, path: Path) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _tree_with(tree: Any, values: Mapping[Path, Any]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda kp, x: values.get(key_path(kp), x), tree)


def plan_and_entries(
    state: TrainState,
    groups: Sequence[ParamGroup],
    order: Sequence[str] | None,
    example_inputs: Any,
    rules: Any,
    tied: Any,
) -> tuple[Plan, list[ParamEntry]]:
    variables = state.variables
    plan = make_plan(state.module, variables, example_inputs, rules, tied)
    infos = torch_names(state.module, variables).parameters()
    return plan, param_entries(plan, infos, state.frozen, groups, order)


def group_labels(groups: Sequence[ParamGroup], group_order: Sequence[str] | None) -> list[str]:
    known = [DEFAULT, *(g.name for g in groups if g.name is not None)]
    if group_order is None:
        return known
    unknown = [label for label in group_order if label not in known]
    if unknown:
        raise ValueError(f"group_order names {unknown}, which are not groups here: {known}.")
    return list(group_order)


def _expected_keys(tx: TorchOptimizer) -> tuple[str, ...]:
    hp = tx.hyperparams
    if tx.torch_class == "SGD":
        has = callable(hp["momentum"]) or hp["momentum"] != 0
        return ("momentum_buffer",) if has else ()
    return ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())


def _to_flax(entry: ParamEntry, array: np.ndarray) -> list[tuple[Any, np.ndarray]]:
    """A torch-layout state tensor as `(part, flax-layout array)` for each part of the entry
    (a part with `select` is one slice of its variable: stacked or scanned layers)."""
    out: list[tuple[Any, np.ndarray]] = []
    offset = 0
    for part in entry.parts:
        piece = array
        if len(entry.parts) > 1:
            size = part.torch_shape[entry.axis]
            index = [slice(None)] * array.ndim
            index[entry.axis] = slice(offset, offset + size)
            piece, offset = array[tuple(index)], offset + size
        out.append((part, np.asarray(part.layout.to_flax(piece, part.shape), part.leaf.dtype)))
    return out


def _tree_with_parts(tree: Any, pieces: Sequence[tuple[Any, np.ndarray]]) -> Any:
    """`tree` with each piece written at its part's variable (its slice, for a selection)."""
    whole: dict[Path, Any] = {}
    for part, value in pieces:
        if not part.select:
            whole[part.path] = value
            continue
        if part.path not in whole:
            whole[part.path] = np.array(tree_get(tree, part.path), copy=True)
        index: list[Any] = [slice(None)] * whole[part.path].ndim
        for axis, i in part.fixed().items():
            index[axis] = i
        whole[part.path][tuple(index)] = value
    return _tree_with(tree, {p: jnp.asarray(v) for p, v in whole.items()})


def _state_of(states: Mapping[Any, Any], index: Any) -> dict[str, Any] | None:
    st = states.get(index, states.get(str(index)))
    return None if st is None else dict(st)


def _step_value(x: Any) -> int:
    value = float(_to_numpy(x)) if not isinstance(x, int | float) else float(x)
    if value != int(value):
        raise ValueError(f"optimizer state 'step' is {value}, not a whole number of steps")
    return int(value)


def optimizer_state_from_torch(
    state: TrainState,
    torch_state: Mapping[str, Any],
    tx: optax.GradientTransformation,
    *,
    param_groups: Groups = (),
    step: int | None = None,
    group_order: Sequence[str] | None = None,
    frozen_in_optimizer: bool | None = None,
    param_order: Sequence[str] | None = None,
    example_inputs: Any = None,
    rules: Any = None,
    tied: Mapping[str, str] | None = None,
    step_source: str = "step",
) -> tuple[TrainState, TorchOptimizerLayout]:
    """`state` with the optimizer state of PyTorch's `optimizer.state_dict()` (the
    counterpart of `optimizer.load_state_dict(torch_state)`), and the layout it was read in.

    `state` is a `TrainState` made by `create_train_state(module, variables, tx,
    frozen=..., param_groups=param_groups)`; `tx` and `param_groups` are passed again, as
    the hyper-parameters of each group are checked against PyTorch's `param_groups`.
    `torch_state` holds torch tensors, NumPy arrays or `flax_registry.io.LazyTensor`s (a
    training checkpoint read by `flax_registry.io.load_torch_object`).

    Parameter indices: PyTorch's groups are flax_registry's groups in `group_order` (default:
    `"default"` first, then the `ParamGroup`s), each holding its parameters in
    `model.parameters()` order (`param_order`, default the model's registry order; tied and
    shared parameters once). Parameters frozen here are taken to be left out of PyTorch's
    optimizer or handed to it (`frozen_in_optimizer`; None: whichever the group sizes fit).
    Where PyTorch saved `param_names`, those are used instead. Steps: Adam's per-parameter
    `step`; SGD saves none, so `step=` gives it (required once momentum buffers exist).

    Unlike `optimizer.load_state_dict`, which checks only group sizes, every state tensor's
    shape, every hyper-parameter and the optimizer type are checked, and errors name the
    group, parameter and both values. (`step_source` names where `step` came from, for
    messages.)
    """
    groups = group_list(param_groups)
    txs: dict[str, Any] = {DEFAULT: tx, **{g.name: g.tx for g in groups if g.name is not None}}
    plan, entries = plan_and_entries(state, groups, param_order, example_inputs, rules, tied)
    torch_groups = list(torch_state["param_groups"])
    states = torch_state["state"]
    matched, frozen_in = match_groups(
        torch_groups, entries, group_labels(groups, group_order), frozen_in_optimizer, plan.cls
    )
    placed = {e.name for _, members in matched for e in members}
    left_out = [e.name for e in entries if e.label != FROZEN and e.name not in placed]
    if left_out:
        raise ValueError(_LEFT_OUT.format(names=left_out, cls=plan.cls))
    inner = inner_states(state.opt_state)
    layout = TorchOptimizerLayout([], frozen_in)
    new_inner: dict[str, Any] = {}
    counts: list[int] = []
    for gi, ((label, members), tgroup) in enumerate(zip(matched, torch_groups)):
        ids = list(tgroup["params"])
        trained = label != FROZEN and any(e.label == label for e in members)
        otx = as_torch_optimizer(label, txs[label]) if label in txs else None
        if otx is not None:  # before the state: a wrong optimizer has the wrong state keys
            check_class(gi, tgroup, label, otx)
        keys = _expected_keys(otx) if otx is not None else ()
        values: dict[str, list[tuple[Any, np.ndarray]]] = {k: [] for k in keys if k != "step"}
        steps: dict[str, int] = {}
        with_state, without = [], []
        for index, entry in zip(ids, members):
            st = _state_of(states, index)
            if entry.label == FROZEN:
                if st:
                    layout.frozen_state[entry.name] = {k: _to_numpy(v) for k, v in st.items()}
                continue
            if st is not None and st.get("momentum_buffer", 0) is None:
                del st["momentum_buffer"]  # torch < 2.0 with momentum=0
            if not st:
                without.append((index, entry))
                continue
            assert otx is not None
            if set(st) != set(keys):
                why = ""
                if "max_exp_avg_sq" in set(st) ^ set(keys):
                    why = f" with amsgrad={otx.hyperparams.get('amsgrad')}"
                elif "momentum_buffer" in set(st) ^ set(keys):
                    why = f" with momentum={otx.hyperparams.get('momentum')}"
                raise ValueError(
                    _STATE_KEYS.format(
                        index=index, name=entry.name, label=label, found=sorted(st),
                        expected=sorted(keys), cls=otx.torch_class, why=why,
                    )
                )  # fmt: skip
            with_state.append((index, entry))
            for key, value in st.items():
                if key == "step":
                    steps[entry.name] = _step_value(value)
                    continue
                array = _to_numpy(value)
                if tuple(array.shape) != entry.torch_shape:
                    order = ", from param_order" if param_order is not None else ""
                    raise ValueError(
                        _STATE_SHAPE.format(
                            key=key, index=index, name=entry.name, found=tuple(array.shape),
                            expected=entry.torch_shape, order=order,
                        )
                    )  # fmt: skip
                values[key].extend(_to_flax(entry, array))
        if with_state and without:
            index, entry = without[0]
            raise ValueError(
                _NO_STATE.format(
                    index=index, name=entry.name, label=label, other=with_state[0][1].name
                )
            )
        if len(set(steps.values())) > 1:
            (a, sa), (b, sb) = sorted(steps.items(), key=lambda kv: kv[1])[:: len(steps) - 1]
            raise ValueError(_STEPS_DIFFER.format(a=a, sa=sa, b=b, sb=sb, index=gi))
        if steps:
            count = next(iter(steps.values()))
            if step is not None and step != count:
                raise ValueError(
                    _STEP_ARG.format(
                        source=step_source, given=step, found=count, index=gi,
                        fix=STEP_FIXES.get(step_source, STEP_FIXES["step"]),
                    )
                )  # fmt: skip
        elif with_state:  # SGD with momentum buffers
            if step is None:
                raise ValueError(_SGD_STEP)
            count = step
        else:
            count = step if step is not None else 0
        torch_only = check_group(gi, tgroup, label, otx, count) if otx is not None else dict(tgroup)
        torch_only.pop("params", None)
        names = [e.name for e in members]
        layout.groups.append(TorchGroup(label, names, torch_only, list(tgroup)))
        if trained:
            counts.append(count)
            new_inner[label] = _load_inner(inner[label], values, count)
    global_step = step if step is not None else max(counts, default=0)
    new_state = state.replace(
        step=jnp.asarray(global_step, jnp.int32),
        opt_state=_replace_inner(state.opt_state, new_inner),
    )
    return new_state, layout


def _load_inner(
    inner: Any, values: Mapping[str, Sequence[tuple[Any, np.ndarray]]], count: int
) -> Any:
    step = jnp.asarray(count, jnp.int32)
    if isinstance(inner, TorchSGDState):
        buf = inner.momentum_buffer
        if values.get("momentum_buffer"):
            buf = _tree_with_parts(buf, values["momentum_buffer"])
        return inner._replace(step=step, momentum_buffer=buf)
    if isinstance(inner, TorchAdamState):
        fields = {}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if values.get(key):
                fields[key] = _tree_with_parts(getattr(inner, key), values[key])
        return inner._replace(step=step, **fields)
    raise TypeError(f"unexpected optimizer state {type(inner).__name__}")  # pragma: no cover
