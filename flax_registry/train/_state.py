"""`TrainState`: parameters, buffers, optimizer state, step and random key as one pytree.

The counterpart of a PyTorch training loop's `(model, optimizer)` pair: `params` is what
`model.parameters()` yields, `buffers` every other collection of the variables (running
statistics, counters, ...: the forward pass changes them, no optimizer sees them),
`opt_state` is `optimizer.state_dict()['state']`, kept for trainable parameters only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from .._arrays import default_prng_impl
from .._frontend import ModuleDef, frontend_of
from .._names import torch_names
from .._nested import KeyPath as Path
from .._nested import key_path, leaf_paths
from .._patterns import Patterns, as_patterns
from .._registry import PARAMS
from ._labels import ParamGroup, _label_tree, frozen_paths, group_list
from ._labels import partition as _partition
from ._scaler import GradScaler


@struct.dataclass
class TrainState:
    """Everything a training run needs to continue; a pytree, so it passes through `jax.jit`.

    - `step`: number of optimizer steps taken (int32 scalar);
    - `params`: the `params` collection;
    - `buffers`: every other collection (`{'buffers': ..., 'batch_stats': ...}`);
    - `opt_state`: the optimizer state, for trainable parameters only (frozen parameters are
      masked out by `optax.partition` and hold no state at all);
    - `rng`: the run's random key (raw `uint32` key data, so checkpoints store it as an
      array); the train step draws each step's dropout key as `fold_in(rng, step)`;
    - `loss_scale`: a `GradScaler` for float16 training with dynamic loss scaling, or None;
    - static: `module`, `tx` (the complete transformation, with frozen parameters and groups),
      `frozen` (the `params` paths never updated) and `rng_impl` (the key's PRNG
      implementation, e.g. 'rbg'; None: JAX's default).

    Two states created from the same module, `tx` object, `frozen` and `param_groups` share
    their static part, so a jitted step compiled for one is reused for the other.

    Differences from `flax.training.train_state.TrainState`: buffers are part of the state,
    frozen parameters are left bit-for-bit untouched (not even `p + 0`), and there is a key.
    """

    step: jax.Array
    params: Any
    buffers: dict[str, Any]
    opt_state: Any
    rng: jax.Array
    module: ModuleDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    frozen: frozenset[Path] = struct.field(pytree_node=False, default=frozenset())
    rng_impl: str | None = struct.field(pytree_node=False, default=None)
    loss_scale: GradScaler | None = None

    def replace(self, **updates: Any) -> TrainState:
        """A copy with some fields replaced (as `dataclasses.replace`)."""
        return dataclasses.replace(self, **updates)

    @property
    def variables(self) -> dict[str, Any]:
        """`{'params': ..., **buffers}`: what `module.apply` takes."""
        return {PARAMS: self.params, **self.buffers}

    @property
    def apply_fn(self) -> Any:
        """`module.apply`."""
        return self.module.apply

    @property
    def key(self) -> jax.Array:
        """`rng` as a typed key."""
        if self.rng_impl is None:
            return jax.random.wrap_key_data(self.rng)
        return jax.random.wrap_key_data(self.rng, impl=self.rng_impl)

    def apply_gradients(self, grads: Any) -> TrainState:
        """One optimizer step: `tx.update`, then `param + update` for every parameter that is
        not frozen (frozen ones are returned as they are), and `step + 1`. Buffers are not
        touched: they are updated by the forward pass, never by the optimizer."""
        if jax.tree.structure(grads) != jax.tree.structure(self.params):  # type: ignore[operator]
            ours, theirs = set(leaf_paths(self.params)), set(leaf_paths(grads))
            raise ValueError(
                "the gradients do not have the structure of params: missing "
                f"{sorted('/'.join(p) for p in ours - theirs)}, unexpected "
                f"{sorted('/'.join(p) for p in theirs - ours)}. Differentiate with respect "
                "to state.params (make_train_step does)."
            )
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)

        def apply(path: Any, p: Any, u: Any) -> Any:
            if self.frozen and key_path(path) in self.frozen:
                return p
            return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

        params = jax.tree_util.tree_map_with_path(apply, self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    @classmethod
    def create(cls, module: ModuleDef, variables: Mapping[str, Any], tx: Any, **kw: Any) -> Any:
        """`create_train_state(module, variables, tx, **kw)`."""
        return create_train_state(module, variables, tx, **kw)


def _owned(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` replaced by a copy on the same devices (same sharding,
    same committedness): arrays the state owns, which a donating train step may consume without
    deleting the arrays its caller still holds."""

    def copy(x: Any) -> Any:
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return x  # under jit the outputs are new arrays anyway
        if x.is_fully_addressable:
            return jax.device_put(x, may_alias=False)
        return jax.device_put(x, x.sharding, may_alias=False)  # a multi-process global array

    return jax.tree.map(copy, tree)


def _is_abstract(tree: Any) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _key_data(rng: int | jax.Array) -> tuple[jax.Array, str | None]:
    """Raw key data and the implementation name (None: JAX's default)."""
    if isinstance(rng, int):
        return jax.random.key_data(jax.random.key(rng)), None
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(rng))
        return jax.random.key_data(rng), None if impl == default_prng_impl() else impl
    return jnp.asarray(rng, jnp.uint32), None


_PARTITIONS: dict[Any, optax.GradientTransformation] = {}


def _full_tx(
    labels: Any, tx: optax.GradientTransformation, groups: Sequence[ParamGroup]
) -> optax.GradientTransformation:
    """`partition(labels, tx, groups)`, the same object for the same inputs, so that states
    built twice hash equal as static jit arguments (no recompilation)."""
    try:
        key = (jax.tree.structure(labels), tuple(jax.tree.leaves(labels)), tx, tuple(groups))
        hash(key)
    except TypeError:  # an unhashable transformation: build a new one
        return _partition(labels, tx, groups)
    if key not in _PARTITIONS:
        if len(_PARTITIONS) >= 256:
            _PARTITIONS.clear()
        _PARTITIONS[key] = _partition(labels, tx, groups)
    return _PARTITIONS[key]


def create_train_state(
    module: ModuleDef,
    variables: Mapping[str, Any] | optax.GradientTransformation | None = None,
    tx: optax.GradientTransformation | None = None,
    *,
    rng: int | jax.Array = 0,
    frozen: Patterns = (),
    param_groups: Sequence[ParamGroup | tuple[Patterns, optax.GradientTransformation]] = (),
    loss_scale: GradScaler | None = None,
) -> TrainState:
    """A `TrainState` at step 0: the counterpart of `optimizer = torch.optim.X(params, ...)`.

    `tx` trains every parameter that no `ParamGroup` claims. `frozen` (dotted-name patterns)
    and `Parameter(trainable=False)` freeze parameters: the counterpart of
    `requires_grad_(False)`, they get `optax.set_to_zero()` through `optax.partition`, hence
    no optimizer state and no update, and stay in `params` and `state_dict`. `param_groups`
    are PyTorch's `param_groups`: `ParamGroup(patterns, tx)` or `(patterns, tx)` pairs.
    Labels come from the registry, so they match `variables['params']` by construction.

    `rng` is an int seed or a key; a typed key keeps its implementation (e.g.
    `jax.random.key(0, impl='rbg')`, much faster to compile on CPU than threefry).

    With abstract `variables` (`flax_registry.abstract_variables(module)`) the state is
    abstract too (nothing allocated): the target for `CheckpointManager.restore`.

    The state owns its arrays: concrete `variables` are copied (on their devices, with their
    shardings), so the donating train step (`make_train_step`'s default) never deletes the
    arrays of `variables`. They stay usable, for a second state or `fr.state_dict`; the price
    is a second copy of the model for as long as the caller keeps `variables` alive. Unlike
    `optimizer = torch.optim.X(model.parameters())`, which updates the module's own tensors,
    the state's parameters are its own: read the trained ones from the state.

    An NNX model holds its variables: `create_train_state(model, tx, ...)`; the state's
    `module` is then the model's definition, and `flax_registry.nnx.update(model,
    state.variables)` puts trained values back into a model.

    `loss_scale` (`GradScaler.create()`) turns on dynamic loss scaling for float16 compute,
    as `torch.amp.GradScaler`; place the state on a mesh with `shard_train_state`.

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (all collections), concrete or abstract (omitted for an NNX
            model).
        tx: the optax transformation for every parameter no group claims.
        rng: an int seed or a key.
        frozen: dotted-name patterns of parameters never updated.
        param_groups: `ParamGroup`s (or `(patterns, tx)` pairs).
        loss_scale: a `GradScaler` (float16 training), or None.

    Returns:
        A `TrainState` at step 0.

    Example:
        >>> import jax
        >>> import flax_registry as fr
        >>> from flax_registry import nn
        >>> model = nn.Linear(3, 2)
        >>> variables = fr.init_variables(model, jax.random.key(0))
        >>> state = fr.create_train_state(model, variables, fr.train.torch_sgd(0.1),
        ...                               frozen=["bias"])
        >>> int(state.step), sorted(state.params)
        (0, ['bias', 'weight'])
    """
    frontend = frontend_of(module)
    if tx is None and isinstance(variables, optax.GradientTransformation):
        variables, tx = None, variables  # create_train_state(nnx_model, tx)
    if tx is None:
        raise TypeError("create_train_state needs tx, the optax transformation to train with")
    if variables is None:
        variables = frontend.variables_of(module)  # an NNX model holds its variables
    assert isinstance(variables, Mapping)
    module = frontend.unbound(module)
    if PARAMS not in variables:
        raise ValueError(
            f"variables of {type(module).__name__} have no 'params' collection (found "
            f"{sorted(variables)}): pass the complete variables from init_variables or init."
        )
    groups = group_list(param_groups)
    infos = torch_names(module, variables).parameters()
    labels = _label_tree(module, variables[PARAMS], infos, as_patterns(frozen), groups)
    full_tx = _full_tx(labels, tx, groups)
    params = variables[PARAMS]
    buffers = {c: v for c, v in variables.items() if c != PARAMS}
    key, impl = _key_data(rng)
    if _is_abstract(variables):
        opt_state = jax.eval_shape(full_tx.init, params)
        step: Any = jax.ShapeDtypeStruct((), jnp.int32)
        key = jax.ShapeDtypeStruct(key.shape, key.dtype)  # type: ignore[assignment]
    else:
        params, buffers, key = _owned((params, buffers, key))
        opt_state = full_tx.init(params)
        step = jnp.zeros((), jnp.int32)
    return TrainState(
        step=step,
        params=params,
        buffers=dict(buffers),
        opt_state=opt_state,
        rng=key,
        module=module,
        tx=full_tx,
        frozen=frozen_paths(labels),
        rng_impl=impl,
        loss_scale=loss_scale,
    )
