"""Where restored arrays go: one `Sharding` for all, or one per dotted PyTorch name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from ..train._labels import Pattern, _matches
from ..train._names import key_path

ShardingSpec = Sharding | Callable[[str, jax.ShapeDtypeStruct], Sharding | None] | None


def sharding_rules(
    mesh: Mesh,
    rules: Sequence[tuple[Pattern, PartitionSpec]],
    default: PartitionSpec = PartitionSpec(),  # noqa: B008
) -> Callable[[str, jax.ShapeDtypeStruct], Sharding]:
    """Shardings by dotted PyTorch name: the first rule whose pattern (glob or `re.Pattern`)
    matches the name gives the `PartitionSpec` on `mesh`, `default` (replicated) otherwise.

    Optimizer-state leaves take the name of the parameter they belong to, so Adam's moments
    are sharded like their parameter.
    """

    def resolve(name: str, leaf: jax.ShapeDtypeStruct) -> Sharding:
        for pattern, spec in rules:
            if _matches(pattern, [name]):
                if len(spec) > len(leaf.shape):
                    raise ValueError(
                        f"sharding rule {pattern!r} -> {spec} names {len(spec)} axes, but "
                        f"'{name}' has shape {tuple(leaf.shape)}: give a PartitionSpec with at "
                        "most as many entries as the array has dimensions."
                    )
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, default if len(default) <= len(leaf.shape) else PartitionSpec())

    return resolve


def abstract_with_shardings(
    tree: Any, name_of: Callable[[tuple[str, ...], tuple[int, ...]], str], shardings: ShardingSpec
) -> Any:
    """`tree` as `jax.ShapeDtypeStruct`s carrying the sharding to restore onto: `shardings`
    (a `Sharding`, or a function of the leaf's PyTorch name), else the leaf's own sharding
    (a `jax.Array`'s, or a struct's), else the default device. Never the saved sharding,
    which may name devices this process does not have."""
    default = SingleDeviceSharding(jax.devices()[0])

    def place(path: Any, leaf: Any) -> jax.ShapeDtypeStruct:
        shape, dtype = tuple(np.shape(leaf)), leaf.dtype
        sharding: Sharding | None = None
        if isinstance(shardings, Sharding):
            sharding = shardings
        elif shardings is not None:
            sharding = shardings(name_of(key_path(path), shape), jax.ShapeDtypeStruct(shape, dtype))
        if sharding is None:
            sharding = getattr(leaf, "sharding", None) or default
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, tree)
