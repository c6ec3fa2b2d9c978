"""Where arrays go, in one vocabulary: PyTorch names (globs) with the flax path beside them.

A `ShardingSpec`, accepted alike by `from_torch`, `CheckpointManager.restore` /
`restore_variables` and the training state, is one of

- `None`: each array keeps the sharding of its target (an abstract leaf carrying one, or a
  concrete array), else the default device;
- one `Sharding` for every array;
- a mapping from a dotted PyTorch name (`"fc.weight"`), a glob over names (`"encoder.*"`) or a
  flax path (`"params/fc/kernel"`) to a `Sharding` or `PartitionSpec`; exact names first, then
  paths, then globs in order;
- a tree shaped like the variables (`{"params": {"fc": {"kernel": P(...)}}}`);
- a callable `(name, leaf)` -> `Sharding | PartitionSpec | None`, called with the PyTorch name
  and a `jax.ShapeDtypeStruct` of the array (flax layout); `sharding_rules(mesh, rules)` builds
  one from `(pattern, PartitionSpec)` pairs.

`PartitionSpec`s are in the layout of the flax array and need a `mesh`. An optimizer-state
leaf takes the name of its parameter, so Adam's moments are sharded like the parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from ._nested import KeyPath
from ._nested import get as nested_get
from ._patterns import Pattern, matches

ShardingSpec = Any  # see the module docstring

_NEEDS_MESH = (
    "the sharding for '{name}' is a PartitionSpec but no mesh was given: pass mesh=Mesh(...) "
    "(or NamedSharding objects instead of PartitionSpecs)."
)
_TOO_MANY_AXES = (
    "sharding rule {pattern!r} -> {spec} names {n} axes, but '{name}' has shape {shape}: give a "
    "PartitionSpec with at most as many entries as the array has dimensions."
)


def sharding_rules(
    mesh: Mesh,
    rules: Sequence[tuple[Pattern, PartitionSpec]],
    default: PartitionSpec = PartitionSpec(),  # noqa: B008
) -> Callable[[str, jax.ShapeDtypeStruct], Sharding]:
    """Shardings by dotted PyTorch name: the first rule whose pattern (glob or `re.Pattern`)
    matches the name gives the `PartitionSpec` on `mesh`, `default` (replicated) otherwise.

    Args:
        mesh: the device mesh.
        rules: `(pattern, PartitionSpec)` pairs, first match wins.
        default: the spec of every array no rule matches (replicated by default).

    Returns:
        A `ShardingSpec` callable `(name, leaf) -> NamedSharding`.
    """

    def resolve(name: str, leaf: jax.ShapeDtypeStruct) -> Sharding:
        for pattern, spec in rules:
            if matches(pattern, [name]):
                if len(spec) > len(leaf.shape):
                    raise ValueError(
                        _TOO_MANY_AXES.format(
                            pattern=pattern, spec=spec, n=len(spec), name=name, shape=leaf.shape
                        )
                    )
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, default if len(default) <= len(leaf.shape) else PartitionSpec())

    return resolve


def sharding_for(
    spec: ShardingSpec,
    name: str,
    where: KeyPath,
    leaf: jax.ShapeDtypeStruct,
    mesh: Mesh | None = None,
) -> Sharding | None:
    """The sharding `spec` gives the array `name` (flax path `where`: collection, *path),
    None when it gives none (the caller then uses the target's own placement)."""
    if spec is None:
        return None
    if isinstance(spec, Sharding):
        return spec
    if callable(spec) and not isinstance(spec, Mapping):
        chosen = spec(name, leaf)
    elif isinstance(spec, Mapping):
        chosen = _from_mapping(spec, name, where)
    else:
        raise TypeError(
            f"shardings must be a Sharding, a mapping, a variables-shaped tree or a callable "
            f"(name, leaf), got {type(spec).__name__}"
        )
    if chosen is None or isinstance(chosen, Sharding):
        return chosen
    if isinstance(chosen, PartitionSpec):
        if mesh is None:
            raise ValueError(_NEEDS_MESH.format(name=name))
        return NamedSharding(mesh, chosen)
    raise TypeError(
        f"the sharding for '{name}' must be a Sharding or PartitionSpec, got {chosen!r}"
    )


def _from_mapping(spec: Mapping[str, Any], name: str, where: KeyPath) -> Any:
    if any(isinstance(v, Mapping) for v in spec.values()):  # a variables-shaped tree
        return nested_get(spec, where, None)
    if name in spec:
        return spec[name]
    path = "/".join(where)
    if path in spec:
        return spec[path]
    for pattern, value in spec.items():
        if any(c in pattern for c in "*?[") and matches(pattern, [name]):
            return value
    return None
