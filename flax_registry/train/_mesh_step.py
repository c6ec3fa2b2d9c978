"""A jitted train step that keeps the train state where it was placed on a device mesh.

Under `jax.jit`, XLA picks the sharding of each output by propagation: nothing guarantees
that new parameters come out where the old ones were, and a parameter that comes out
replicated silently costs a full copy per device. `StepOnMesh` pins them: when the state (or,
failing that, the batch) lives on a mesh, every output array of the new state is constrained
to the sharding of the input array it replaces (arrays not yet on the mesh, such as the
NumPy step and key a checkpoint restore returns, are first replicated onto it), so donation
reuses the same buffers step after step. The number of data-parallel replicas (what
per-replica BatchNorm statistics and gradient accumulation split the batch into) is read
from the batch's sharding: how many parts its leading axis is split into.

Differences from PyTorch's `DistributedDataParallel`: one program sees the global batch, so
gradients are exact means over it (no all-reduce of per-rank means to reason about) and the
global batch, not the per-device one, is what `loss_fn` receives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from .._nested import key_path
from ._sharding import place

StepFn = Callable[[Any, Any, int, Any], tuple[Any, dict[str, Any]]]

_NOT_ON_MESH = (
    "batch leaf '{path}' (shape {shape}) is {where}, but the train state is on the mesh "
    "{mesh}: a batch that is not split over the mesh is computed whole on every device (no "
    "data parallelism) and is refused in a multi-process run. Place it with "
    "flax_registry.train.shard_batch(batch, mesh) (each process passing the global batch, or "
    "local=True with its own part)"
)
_NEW_STRUCTURE = (
    "the train step changed the structure of the train state (new leaves: {added}; missing: "
    "{missing}): a forward pass may update buffers but not create new ones. Create every "
    "buffer in setup / at init"
)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first array of `tree` placed with a `NamedSharding` (None if none)."""
    return _mesh_of_leaves(jax.tree.leaves(tree))


def _mesh_of_leaves(leaves: list[Any]) -> Mesh | None:
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh  # type: ignore[return-value]
    return None


def batch_replicas(batch: Any) -> int:
    """Into how many parts the leading axis of the batch is split across devices (the
    number of data-parallel replicas; 1 for an unplaced or replicated batch)."""
    count = 1
    for leaf in jax.tree.leaves(batch):
        sharding = getattr(leaf, "sharding", None)
        shape = tuple(np.shape(leaf))
        if isinstance(sharding, Sharding) and shape and shape[0]:
            count = max(count, shape[0] // sharding.shard_shape(shape)[0])
    return count


def _on_mesh(leaves: list[Any], mesh: Mesh) -> tuple[list[Any], tuple[Sharding, ...]]:
    """The state's leaves with every array on `mesh` (unplaced ones replicated) and the
    tuple of their shardings. Runs before every step: arrays already on the mesh (the
    outputs of the previous step) cost one attribute read each."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings: list[Sharding] = []
    placed = list(leaves)
    for i, leaf in enumerate(leaves):
        own = getattr(leaf, "sharding", None)
        if isinstance(own, NamedSharding) and (own.mesh is mesh or own.mesh == mesh):
            shardings.append(own)
        else:
            shardings.append(replicated)
            placed[i] = place(leaf, replicated)
    return placed, tuple(shardings)


def _check_batch(batch: Any, mesh: Mesh) -> None:
    devices = set(mesh.devices.flat)
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = tuple(np.shape(leaf))
        if not shape:
            continue
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or sharding.device_set != devices:
            where = (
                "a host array" if sharding is None else f"on {len(sharding.device_set)} device(s)"
            )
            path_name = "/".join(key_path(path)) or "batch"
            raise ValueError(
                _NOT_ON_MESH.format(path=path_name, shape=shape, where=where, mesh=dict(mesh.shape))
            )


def constrain(new_state: Any, like: Any, shardings: tuple[Sharding, ...] | None) -> Any:
    """`new_state` with each array constrained to the sharding of the input leaf it replaces
    (`like` is the input state; `shardings` its flat shardings, None: unconstrained)."""
    if shardings is None:
        return new_state
    before, after = jax.tree.structure(like), jax.tree.structure(new_state)
    if before != after:  # type: ignore[operator]
        old = {key_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(like)}
        new = {key_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(new_state)}
        raise ValueError(
            _NEW_STRUCTURE.format(
                added=sorted("/".join(p) for p in new - old),
                missing=sorted("/".join(p) for p in old - new),
            )
        )
    placement = jax.tree.unflatten(before, shardings)
    return jax.lax.with_sharding_constraint(new_state, placement)


class StepOnMesh:
    """`(state, batch) -> (new_state, metrics)` around `step(state, batch, replicas,
    shardings)`, jitted with `replicas` and `shardings` static (see the module docstring)."""

    def __init__(
        self, step: StepFn, *, jit: bool, donate: bool, replicas: int | None = None
    ) -> None:
        self._step = step
        self._replicas = replicas
        self._run: StepFn = (
            jax.jit(step, static_argnums=(2, 3), donate_argnums=(0,) if donate else ())
            if jit
            else step
        )

    def _arguments(self, state: Any, batch: Any) -> tuple[Any, Any, int, Any]:
        replicas = self._replicas or batch_replicas(batch)
        leaves, treedef = jax.tree.flatten(state)
        mesh = _mesh_of_leaves(leaves) or mesh_of(batch)
        if mesh is None:
            return state, batch, replicas, None
        _check_batch(batch, mesh)
        placed, shardings = _on_mesh(leaves, mesh)
        if any(a is not b for a, b in zip(placed, leaves)):
            state = jax.tree.unflatten(treedef, placed)
        return state, batch, replicas, shardings

    def __call__(self, state: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        return self._run(*self._arguments(state, batch))

    def lower(self, state: Any, batch: Any) -> Any:
        """The `jax.stages.Lowered` step for these arguments: `.as_text()` is its StableHLO,
        `.compile().as_text()` the optimised HLO (collectives, dtypes), without running it."""
        run = (
            self._run if hasattr(self._run, "lower") else jax.jit(self._step, static_argnums=(2, 3))
        )
        return run.lower(*self._arguments(state, batch))
