"""Where restored arrays go: the targets of a restore as `jax.ShapeDtypeStruct`s carrying the
sharding the `ShardingSpec` (see `flax_registry._shardings`) gives each PyTorch name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from .._nested import KeyPath, key_path
from .._shardings import ShardingSpec as ShardingSpec
from .._shardings import sharding_for
from .._shardings import sharding_rules as sharding_rules


def abstract_with_shardings(
    tree: Any,
    name_of: Callable[[KeyPath, tuple[int, ...]], str],
    shardings: ShardingSpec,
    collection: str = "",
    mesh: Any = None,
) -> Any:
    """`tree` as `jax.ShapeDtypeStruct`s carrying the sharding to restore onto: `shardings`
    (by the leaf's PyTorch name), else the leaf's own sharding (a `jax.Array`'s, or a
    struct's), else the default device. Never the saved sharding, which may name devices
    this process does not have."""
    default = SingleDeviceSharding(jax.devices()[0])

    def place(path: Any, leaf: Any) -> jax.ShapeDtypeStruct:
        shape, dtype = tuple(np.shape(leaf)), leaf.dtype
        local = key_path(path)
        where = (collection, *local) if collection else local
        struct = jax.ShapeDtypeStruct(shape, dtype)
        sharding: Sharding | None = sharding_for(
            shardings, name_of(local, shape), where, struct, mesh
        )
        if sharding is None:
            sharding = getattr(leaf, "sharding", None) or default
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, tree)
