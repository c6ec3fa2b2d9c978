"""Where a `TrainState` lives on a device mesh: data-parallel or fully sharded, named in the
library's one sharding vocabulary (PyTorch names, see `flax_registry._shardings`).

- `DATA_PARALLEL`: every array replicated on every device; only the batch is split (PyTorch's
  `DistributedDataParallel`).
- `FULLY_SHARDED`: every parameter, and its optimizer state, split over the `axis` mesh
  axes along its largest dimension that they divide; arrays no dimension of which divides
  stay replicated, as do buffers, the step and the key (PyTorch's `FullyShardedDataParallel`
  with `FULL_SHARD`, ZeRO-3). XLA gathers each parameter where the computation needs it.
- any `ShardingSpec` (names, globs, flax paths, a variables-shaped tree, a callable): applied
  to parameters, buffers and, by the name of their parameter, optimizer-state leaves; what
  it leaves unplaced is replicated.

`rules=` (a `ShardingSpec`, typically `{glob: PartitionSpec}`) overrides either strategy for
the names it matches. An optimizer-state leaf is named after its parameter (the longest
suffix of its path that is a parameter path, with the parameter's shape), so Adam's moments
always sit where their parameter sits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from .._names import TorchNames, torch_names
from .._nested import KeyPath, key_path, leaf_paths
from .._registry import PARAMS
from .._shardings import ShardingSpec, sharding_for
from ._state import TrainState

DATA_PARALLEL = "data_parallel"
FULLY_SHARDED = "fully_sharded"
Axis = str | tuple[str, ...]

_BAD_STRATEGY = (
    "shardings must be '{dp}', '{fs}' or a ShardingSpec (a Sharding, a mapping of PyTorch "
    "names / globs / flax paths, a variables-shaped tree or a callable (name, leaf)), got "
    "{found!r}"
)
_NO_AXIS = (
    "mesh axis {axis!r} is not an axis of the mesh (axes {axes}): pass axis= one of them (the "
    "axis the batch is split over), or build the mesh with a '{axis}' axis"
)


def axis_size(mesh: Mesh, axis: Axis) -> int:
    """The number of devices along `axis` (a mesh axis name or a tuple of them)."""
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    for name in names:
        if name not in mesh.shape:
            raise ValueError(_NO_AXIS.format(axis=name, axes=tuple(mesh.axis_names)))
    return math.prod(mesh.shape[name] for name in names)


def fully_sharded(mesh: Mesh, axis: Axis = "data") -> Callable[[str, Any], Sharding]:
    """The FSDP / ZeRO-3 placement as a `ShardingSpec`: each array split over `axis` along
    its largest dimension that the axis size divides (the first such on a tie), replicated
    when none does (uneven shards are not supported by `NamedSharding`).

    Unlike PyTorch's FSDP, which flattens and pads parameters into one buffer per unit, each
    array is split on its own, so every array keeps its shape and its PyTorch name. Applied by
    `from_torch` or `CheckpointManager.restore` directly, it splits buffers too; through
    `shard_train_state(state, mesh, FULLY_SHARDED)` buffers stay replicated, as in FSDP.

    Args:
        mesh: the device mesh.
        axis: the mesh axis (or axes) to split over.

    Returns:
        A callable `(name, leaf) -> NamedSharding`, accepted wherever a `ShardingSpec` is.
    """
    size = axis_size(mesh, axis)

    def resolve(name: str, leaf: Any) -> Sharding:
        shape = tuple(np.shape(leaf))
        dims = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size]
        if size == 1 or not dims:
            return NamedSharding(mesh, PartitionSpec())
        dim = max(dims, key=lambda d: (shape[d], -d))
        spec: list[Any] = [None] * dim  # no trailing Nones: the form XLA hands back
        return NamedSharding(mesh, PartitionSpec(*spec, axis))

    return resolve


def train_state_shardings(
    state: TrainState,
    mesh: Mesh,
    shardings: Any = DATA_PARALLEL,
    *,
    rules: ShardingSpec = None,
    axis: Axis = "data",
) -> TrainState:
    """The `NamedSharding` of every array of `state` (concrete or abstract), as a `TrainState`
    of shardings: the `out_shardings` of a jitted `create_train_state`, and, through its
    `.variables`, the `shardings=` of `from_torch` that converts into it.

    Args:
        state: the train state to place.
        mesh: the device mesh.
        shardings: DATA_PARALLEL, FULLY_SHARDED or a `ShardingSpec` (see the module docstring).
        rules: a `ShardingSpec` that overrides the strategy for the names it matches.
        axis: the mesh axis (or axes) FULLY_SHARDED splits over.

    Returns:
        A `TrainState` whose leaves are `NamedSharding`s on `mesh`.

    Example:
        >>> import jax
        >>> import flax_registry as fr
        >>> from flax_registry import nn, train
        >>> model = nn.Linear(4, 8)
        >>> state = train.create_train_state(
        ...     model, fr.abstract_variables(model), train.torch_adam(1e-3))
        >>> mesh = jax.sharding.AbstractMesh((8,), ("data",))  # 8 devices, named "data"
        >>> placed = train.train_state_shardings(state, mesh, train.FULLY_SHARDED)
        >>> placed.params["weight"].spec, placed.step.spec  # weight: (8, 4), PyTorch's layout
        (P('data',), P())
        >>> inner = placed.opt_state.inner_states["default"].inner_state
        >>> inner.exp_avg["weight"].spec  # Adam's moment sits where its parameter sits
        P('data',)
    """
    names = torch_names(state.module, state.variables)
    strategy = _strategy(shardings, mesh, axis)
    replicated = NamedSharding(mesh, PartitionSpec())
    by_name = _opt_state_names(names, state.params)

    def choose(kind: str, name: str, where: KeyPath, leaf: Any) -> Sharding:
        struct = jax.ShapeDtypeStruct(tuple(np.shape(leaf)), _dtype(leaf))
        chosen = sharding_for(rules, name, where, struct, mesh)
        if chosen is None and (kind == PARAMS or not isinstance(shardings, str)):
            chosen = strategy(name, where, struct)
        return replicated if chosen is None else chosen

    def variable(collection: str) -> Callable[[Any, Any], Sharding]:
        kind = PARAMS if collection == PARAMS else "buffer"

        def pick(path: Any, leaf: Any) -> Sharding:
            local = key_path(path)
            return choose(kind, names.name_of((collection, local)), (collection, *local), leaf)

        return pick

    def optimizer(path: Any, leaf: Any) -> Sharding:
        param = by_name(key_path(path), tuple(np.shape(leaf)))
        if param is None:
            local = key_path(path)
            return choose("other", "opt_state." + ".".join(local), ("opt_state", *local), leaf)
        return choose(PARAMS, param[0], (PARAMS, *param[1]), leaf)

    tree_map = jax.tree_util.tree_map_with_path
    return state.replace(
        step=replicated,
        params=tree_map(variable(PARAMS), state.params),
        buffers={c: tree_map(variable(c), tree) for c, tree in state.buffers.items()},
        opt_state=tree_map(optimizer, state.opt_state),
        rng=replicated,
        loss_scale=jax.tree.map(lambda _: replicated, state.loss_scale),
    )


def shard_train_state(
    state: TrainState,
    mesh: Mesh,
    shardings: Any = DATA_PARALLEL,
    *,
    rules: ShardingSpec = None,
    axis: Axis = "data",
) -> TrainState:
    """`state` placed on `mesh`: data-parallel (replicated), fully sharded (FSDP / ZeRO-3) or
    by any `ShardingSpec`; the counterpart of wrapping a PyTorch model in
    `DistributedDataParallel` or `FullyShardedDataParallel` before building its optimizer.

    Arrays already placed as chosen are kept (no copy); others are moved with
    `jax.device_put` (in a multi-process run each process places only its own shards). An
    abstract `state` comes back abstract, its `jax.ShapeDtypeStruct`s carrying the shardings:
    the restore target of `CheckpointManager.restore` for this mesh. `make_train_step` keeps
    every array where this put it.

    Args:
        state: the train state (concrete or abstract).
        mesh: the device mesh.
        shardings: DATA_PARALLEL (default), FULLY_SHARDED or a `ShardingSpec`.
        rules: a `ShardingSpec` that overrides the strategy for the names it matches.
        axis: the mesh axis (or axes) FULLY_SHARDED splits over.

    Returns:
        The placed `TrainState`.

    Example:
        >>> import jax
        >>> import flax_registry as fr
        >>> from flax_registry import nn, train
        >>> model = nn.Linear(4, 8)
        >>> state = train.create_train_state(
        ...     model, fr.init_variables(model, jax.random.key(0)), train.torch_sgd(0.1))
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> state = train.shard_train_state(state, mesh, train.DATA_PARALLEL)
        >>> state.params["weight"].sharding.spec, dict(state.params["weight"].sharding.mesh.shape)
        (P(), {'data': 1})
    """
    placement = train_state_shardings(state, mesh, shardings, rules=rules, axis=axis)
    return place(state, placement)


def place(tree: Any, shardings: Any) -> Any:
    """Every leaf of `tree` on the sharding at its place in `shardings` (same structure);
    abstract leaves become `jax.ShapeDtypeStruct`s carrying it. Leaves already there are kept."""

    def put(leaf: Any, sharding: Sharding) -> Any:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        return jax.device_put(leaf, sharding)

    return jax.tree.map(put, tree, shardings)


def _strategy(shardings: Any, mesh: Mesh, axis: Axis) -> Callable[[str, KeyPath, Any], Any]:
    if shardings == DATA_PARALLEL:
        return lambda name, where, leaf: None
    if shardings == FULLY_SHARDED:
        split = fully_sharded(mesh, axis)
        return lambda name, where, leaf: split(name, leaf)
    if isinstance(shardings, str):
        raise ValueError(_BAD_STRATEGY.format(dp=DATA_PARALLEL, fs=FULLY_SHARDED, found=shardings))
    return lambda name, where, leaf: sharding_for(shardings, name, where, leaf, mesh)


def _opt_state_names(
    names: TorchNames, params: Any
) -> Callable[[KeyPath, tuple[int, ...]], tuple[str, KeyPath] | None]:
    """`(path, shape) -> (PyTorch name, params path)` of the parameter an optimizer-state leaf
    belongs to: the longest suffix of its path that is a parameter of the same shape."""
    shapes = {p: tuple(np.shape(v)) for p, v in leaf_paths(params).items()}
    infos = names.parameters()

    def find(path: KeyPath, shape: tuple[int, ...]) -> tuple[str, KeyPath] | None:
        for k in range(len(path), 0, -1):
            suffix = path[-k:]
            if suffix in infos and shapes.get(suffix) == shape:
                return infos[suffix].name, suffix
        return None

    return find


def _dtype(leaf: Any) -> Any:
    return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """How many bytes of `tree`'s arrays each addressable device holds (its shards only): the
    memory a placement costs, per device."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
