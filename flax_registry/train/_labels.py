"""Frozen parameters and parameter groups by dotted PyTorch names: the label tree for optax.

PyTorch selects what an optimizer trains by handing it parameter objects: `requires_grad_(False)`
freezes a tensor, and `param_groups` give subsets their own hyperparameters. Here the same
choices are made by dotted `state_dict` names (glob patterns such as `"encoder.*"`, or compiled
regular expressions, matched in full) and turned into a tree of labels with exactly the
structure of `variables['params']`, built from the registry, for `optax.partition`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from .._frontend import ModuleDef, frontend_of
from .._names import VariableInfo, torch_names
from .._nested import KeyPath, key_path
from .._patterns import Pattern, Patterns, as_patterns, matches

FROZEN = "frozen"
DEFAULT = "default"

_NO_MATCH = (
    "{where} pattern {pattern!r} matches no parameter of {cls}. Parameter names are "
    "PyTorch's dotted state_dict keys, e.g. {examples}; a str is a glob (fnmatch: '*' also "
    "matches dots), a re.Pattern must match the whole name. Fix the pattern or remove it."
)
_UNKNOWN_LEAF = (
    "variables['params'] holds {keys}, which the registry of {cls} does not list as "
    "parameters (registered: {known}). Pass the variables that {cls}.init or "
    "flax_registry.load_state_dict returned for this module."
)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Parameters chosen by dotted-name patterns, trained with their own transformation.

    The counterpart of one entry of a PyTorch optimizer's `param_groups`, e.g.
    `ParamGroup(["*.bias", "*bn*.weight"], torch_adamw(1e-3, weight_decay=0.0), name="no_decay")`.
    Unlike PyTorch, a group holds a complete optax transformation (its own state), and a
    parameter matched by several groups belongs to the first one.
    """

    patterns: Patterns
    tx: optax.GradientTransformation
    name: str | None = None


def group_list(
    param_groups: Sequence[ParamGroup | tuple[Patterns, optax.GradientTransformation]],
) -> list[ParamGroup]:
    """Normalise `(patterns, tx)` pairs to `ParamGroup`s with unique names."""
    groups: list[ParamGroup] = []
    for i, group in enumerate(param_groups):
        if not isinstance(group, ParamGroup):
            patterns, tx = group
            group = ParamGroup(patterns, tx)
        name = group.name or f"group{i}"
        if name in (FROZEN, DEFAULT) or name in {g.name for g in groups}:
            raise ValueError(
                f"parameter group name {name!r} is used twice or reserved "
                f"({FROZEN!r} and {DEFAULT!r} are): give each ParamGroup its own name."
            )
        patterns = as_patterns(group.patterns)  # a tuple, so that groups hash
        groups.append(dataclasses.replace(group, patterns=patterns, name=name))
    return groups


def param_labels(
    module: ModuleDef,
    variables: Mapping[str, Any],
    *,
    frozen: Patterns = (),
    param_groups: Sequence[ParamGroup | tuple[Patterns, optax.GradientTransformation]] = (),
) -> Any:
    """The label of every parameter, as a tree with the structure of `variables['params']`.

    `"frozen"` for `Parameter(trainable=False)` and for names matched by `frozen`; the name of
    the first matching `ParamGroup`; `"default"` otherwise. A tensor with several names (tied
    or shared) takes a label if any of its names matches. A pattern that matches nothing
    raises, as it is almost always a typo.
    """
    infos = torch_names(module, variables).parameters()
    return _label_tree(
        module, variables["params"], infos, as_patterns(frozen), group_list(param_groups)
    )


def _label_tree(
    module: ModuleDef,
    params: Any,
    infos: Mapping[KeyPath, VariableInfo],
    frozen: Sequence[Pattern],
    groups: Sequence[ParamGroup],
) -> Any:
    cls = frontend_of(module).display_name(module)
    all_names = [info.name for info in infos.values()]
    examples = ", ".join(repr(n) for n in all_names[:4]) or "(none)"
    for where, patterns in [("frozen", frozen)] + [
        (f"ParamGroup {g.name!r}", as_patterns(g.patterns)) for g in groups
    ]:
        for pattern in patterns:
            if not any(matches(pattern, info.names) for info in infos.values()):
                raise ValueError(
                    _NO_MATCH.format(where=where, pattern=pattern, cls=cls, examples=examples)
                )

    def label(info: VariableInfo) -> str:
        if not info.trainable or any(matches(p, info.names) for p in frozen):
            return FROZEN
        for group in groups:
            if any(matches(p, info.names) for p in as_patterns(group.patterns)):
                assert group.name is not None
                return group.name
        return DEFAULT

    unknown: list[str] = []

    def leaf_label(path: Any, _: Any) -> str:
        info = infos.get(key_path(path))
        if info is None:
            unknown.append("/".join(key_path(path)))
            return DEFAULT
        return label(info)

    labels = jax.tree_util.tree_map_with_path(leaf_label, params)
    if unknown:
        raise ValueError(_UNKNOWN_LEAF.format(keys=unknown, cls=cls, known=all_names))
    return labels


def frozen_paths(labels: Any) -> frozenset[KeyPath]:
    """The `params` paths labelled frozen."""
    return frozenset(
        key_path(p) for p, label in jax.tree_util.tree_leaves_with_path(labels) if label == FROZEN
    )


def partition(
    labels: Any, tx: optax.GradientTransformation, groups: Sequence[ParamGroup]
) -> optax.GradientTransformation:
    """`optax.partition` over `labels`: `tx` for "default", each group's own transformation,
    and `optax.set_to_zero()` (no state at all) for "frozen". Labels with no parameter get
    no transformation, so their state is not even an empty shell."""
    present = set(jax.tree.leaves(labels))
    transforms = {DEFAULT: tx, FROZEN: optax.set_to_zero()}
    transforms.update({g.name: g.tx for g in groups if g.name is not None})
    return optax.partition({k: v for k, v in transforms.items() if k in present}, labels)
