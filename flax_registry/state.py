"""PyTorch's state API as pure functions of `(module, variables)`.

`named_parameters`, `named_buffers`, `named_modules`, `state_dict`, `get_*` and
`load_state_dict` follow `torch.nn.Module`'s algorithms and orders exactly
(`flax_registry._node`), over the tree the module's front-end reads (one build per call).
Nothing here mutates its inputs: `load_state_dict` returns new variables.

Names: these functions give the model's own names, as PyTorch would list the Flax model as it
is (registered names; a plain flax layer's own variable names, `proj.kernel`); `to_torch` gives
the PyTorch twin's names and layouts (`proj.weight`, transposed) through conversion rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _messages as messages
from . import _nested
from ._arrays import to_array
from ._frontend import frontend_of
from ._node import Node, added_later, get_member, get_node, named_members, state_entries
from ._node import named_modules as _named_modules

Variables = Mapping[str, Any]


class IncompatibleKeys(NamedTuple):
    """What a non-strict `load_state_dict` did not match, as PyTorch's `_IncompatibleKeys`
    (`LoadReport.incompatible_keys` gives the same for a conversion)."""

    missing_keys: list[str]
    unexpected_keys: list[str]

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return (
            f"IncompatibleKeys(missing_keys={self.missing_keys!r}, "
            f"unexpected_keys={self.unexpected_keys!r})"
        )

    def __str__(self) -> str:
        return self.__repr__()


def _tree(module: Any, variables: Variables | None) -> Node:
    """The module tree of `module` over `variables` (when None: a module that holds its
    variables, an NNX model or a bound linen module)."""
    return frontend_of(module).tree(module, variables)


class _TreeView:
    """The listings the state API needs, over a module tree (`_node`'s walks)."""

    def __init__(self, root: Node) -> None:
        self.root = root

    def entries(self, prefix: str) -> list[tuple[str, Any, Any]]:
        return list(state_entries(self.root, prefix))

    def state_dict(self, prefix: str) -> dict[str, Any]:
        return {key: value for key, _, value in state_entries(self.root, prefix)}

    def members(
        self, kind: str, prefix: str, recurse: bool, remove_duplicate: bool
    ) -> Iterator[tuple[str, Any]]:
        return named_members(self.root, kind, prefix, recurse, remove_duplicate)

    def added_later(self, metadata: Mapping[str, Any] | None) -> list[str]:
        return list(added_later(self.root, metadata))

    def buffers(self) -> list[tuple[str, Any, Any]]:
        return [m for _, node in _named_modules(self.root, None, "", True) for m in node.buffers]


def _view(module: Any, variables: Variables | None) -> Any:
    """The listings of `module` over `variables`: from the front-end's structure cache where
    it has one (no tree is made: one re-fill), else over the tree (one build)."""
    frontend = frontend_of(module)
    cached = getattr(frontend, "listing", None)
    listing = cached(module, variables) if cached is not None else None
    return listing if listing is not None else _TreeView(_tree(module, variables))


# --- the public pure functions --------------------------------------------------------------


def named_parameters(
    module: Any,
    variables: Variables | None = None,
    prefix: str = "",
    recurse: bool = True,
    remove_duplicate: bool = True,
) -> Iterator[tuple[str, jax.Array]]:
    """`(name, value)` of every parameter, as `torch.nn.Module.named_parameters`.

    Pre-order over modules; a tensor reached under two names (a shared submodule, a tied
    parameter) is listed once unless `remove_duplicate=False`. Parameters of any flax
    submodule (its `params` collection) are listed under their flax names.

    Args:
        module: the model definition.
        variables: its variables (concrete or abstract).
        prefix: prepended to every name, as in PyTorch.
        recurse: include submodules' parameters.
        remove_duplicate: list a tensor reached under several names once.

    Returns:
        An iterator of `(dotted name, array)`.
    """
    return _view(module, variables).members("parameters", prefix, recurse, remove_duplicate)


def named_parameters_of(
    bound: Any, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
) -> Iterator[tuple[str, jax.Array]]:
    return named_members(_tree(bound, None), "parameters", prefix, recurse, remove_duplicate)


def parameters(
    module: Any, variables: Variables | None = None, recurse: bool = True
) -> Iterator[Any]:
    """The values of `named_parameters`, as `torch.nn.Module.parameters`.

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (omitted for an NNX model).
        recurse: include submodules' parameters.

    Returns:
        An iterator of arrays.
    """
    return (value for _, value in named_parameters(module, variables, recurse=recurse))


def named_buffers(
    module: Any,
    variables: Variables | None = None,
    prefix: str = "",
    recurse: bool = True,
    remove_duplicate: bool = True,
) -> Iterator[tuple[str, jax.Array]]:
    """`(name, value)` of every buffer, as `torch.nn.Module.named_buffers`.

    Non-persistent buffers are included (as in PyTorch); so are the non-`params` collections
    of flax submodules (`batch_stats`, ...), under their flax names.

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (omitted for an NNX model).
        prefix: prepended to every name, as in PyTorch.
        recurse: include submodules' buffers.
        remove_duplicate: list a tensor reached under several names once.

    Returns:
        An iterator of `(dotted name, array)`.
    """
    return _view(module, variables).members("buffers", prefix, recurse, remove_duplicate)


def named_buffers_of(
    bound: Any, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
) -> Iterator[tuple[str, jax.Array]]:
    return named_members(_tree(bound, None), "buffers", prefix, recurse, remove_duplicate)


def buffers(module: Any, variables: Variables | None = None, recurse: bool = True) -> Iterator[Any]:
    """The values of `named_buffers`, as `torch.nn.Module.buffers`.

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (omitted for an NNX model).
        recurse: include submodules' buffers.

    Returns:
        An iterator of arrays.
    """
    return (value for _, value in named_buffers(module, variables, recurse=recurse))


def named_modules(
    module: Any,
    variables: Variables | None = None,
    prefix: str = "",
    remove_duplicate: bool = True,
) -> Iterator[tuple[str, Any]]:
    """`(name, bound module)` pre-order, as `torch.nn.Module.named_modules`.

    A scope that only exists inside a compact `__call__` (flax creates its module object
    during that call only) is listed with `None` in place of the module.

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (omitted for an NNX model).
        prefix: prepended to every name.
        remove_duplicate: list a module reached under several names once.

    Returns:
        An iterator of `(dotted name, module)`.
    """
    return _modules(_tree(module, variables), prefix, remove_duplicate)


def named_modules_of(
    bound: Any, prefix: str = "", remove_duplicate: bool = True
) -> Iterator[tuple[str, Any]]:
    return _modules(_tree(bound, None), prefix, remove_duplicate)


def _modules(root: Node, prefix: str, remove_duplicate: bool) -> Iterator[tuple[str, Any]]:
    for name, node in _named_modules(root, None, prefix, remove_duplicate):
        yield name, node.module


def state_dict(
    module: Any, variables: Variables | None = None, prefix: str = ""
) -> dict[str, jax.Array]:
    """The PyTorch `state_dict`: parameters, then persistent buffers, then each child's.

    Every alias of a shared tensor has its own key, as in PyTorch. Unlike PyTorch the values
    are the arrays themselves (JAX arrays are immutable, so there is nothing to detach). The
    names are the model's own (see the module docstring); `to_torch` gives the twin's.

    Args:
        module: the model definition.
        variables: its variables.
        prefix: prepended to every key.

    Returns:
        `{dotted key: array}` in PyTorch's order.
    """
    return _view(module, variables).state_dict(prefix)


def state_dict_of(bound: Any, prefix: str = "") -> dict[str, jax.Array]:
    return {key: value for key, _, value in state_entries(_tree(bound, None), prefix)}


def get_submodule(module: Any, variables: Variables | None, target: str) -> Any:
    """The submodule at dotted `target`, as `torch.nn.Module.get_submodule` (a bound linen
    module, or the NNX submodule).

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (None for an NNX model).
        target: the dotted name, e.g. `"layer1.0"`.

    Returns:
        The submodule; PyTorch's AttributeError when there is none.
    """
    return get_node(_tree(module, variables), target).module


def get_submodule_of(bound: Any, target: str) -> Any:
    return get_node(_tree(bound, None), target).module


def get_parameter(module: Any, variables: Variables | None, target: str) -> jax.Array:
    """The parameter at dotted `target`, as `torch.nn.Module.get_parameter`.

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (None for an NNX model).
        target: the dotted name, e.g. `"fc.weight"`.

    Returns:
        The array; PyTorch's AttributeError when there is none.
    """
    return get_member(_tree(module, variables), target, "parameters", "an nn.Parameter")


def get_parameter_of(bound: Any, target: str) -> jax.Array:
    return get_member(_tree(bound, None), target, "parameters", "an nn.Parameter")


def get_buffer(module: Any, variables: Variables | None, target: str) -> jax.Array:
    """The buffer at dotted `target`, as `torch.nn.Module.get_buffer`.

    Args:
        module: the model definition, or an NNX model.
        variables: its variables (None for an NNX model).
        target: the dotted name, e.g. `"bn.running_mean"`.

    Returns:
        The array; PyTorch's AttributeError when there is none.
    """
    return get_member(_tree(module, variables), target, "buffers", "a buffer")


def get_buffer_of(bound: Any, target: str) -> jax.Array:
    return get_member(_tree(bound, None), target, "buffers", "a buffer")


# --- loading ---------------------------------------------------------------------------------

_KEEP_OR_PROVIDE = (
    "Pass concrete variables (from {cls}.init) to keep their current values, or provide these keys."
)


def load_state_dict(
    module: Any,
    variables: Variables | Mapping[str, Any],
    state_dict: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> Any:
    """Copy a PyTorch-keyed `state_dict` into new variables, as `torch.nn.Module.load_state_dict`.

    `variables` gives the structure, shapes and dtypes (concrete, or abstract from
    `jax.eval_shape`) and is never modified. Values may be numpy or JAX arrays or torch
    tensors; each is cast to the model's dtype. As in PyTorch, a shape mismatch raises whether
    or not `strict`, `strict=True` raises on missing or unexpected keys with PyTorch's
    message, and a buffer a module added in a later version (`num_batches_tracked`) may be
    missing from a state dict without version metadata (it keeps its value). Differences:
    nothing is applied when anything raises (PyTorch may have copied some tensors already),
    and `strict=False` refuses to leave an abstract leaf unfilled.

    An NNX model holds its variables: `load_state_dict(model, state_dict)` loads in place, as
    PyTorch does, and returns the `IncompatibleKeys` alone.

    Args:
        module: the model definition (unbound), or an NNX model.
        variables: its variables, concrete or abstract (for an NNX model: the state dict).
        state_dict: `{dotted key: array or tensor}`.
        strict: raise on missing or unexpected keys, as PyTorch.

    Returns:
        `(new_variables, IncompatibleKeys(missing_keys, unexpected_keys))`; for an NNX model,
        the `IncompatibleKeys` (the model is updated).

    Example:
        >>> import flax_registry as fr
        >>> from flax_registry import nn
        >>> layer = nn.Linear(3, 2)
        >>> sd = {"weight": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "bias": [0.5, -0.5]}
        >>> variables, result = fr.load_state_dict(layer, fr.abstract_variables(layer), sd)
        >>> result
        <All keys matched successfully>
        >>> [k for k in fr.state_dict(layer, variables)]
        ['weight', 'bias']
    """
    frontend = frontend_of(module)
    in_place = frontend.holds_state and state_dict is None
    if in_place:
        state_dict, variables = variables, frontend.variables_of(module)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
    cls = frontend.display_name(module)
    view = _view(module, variables)
    entries = view.entries("")
    expected = {key for key, _, _ in entries}
    optional = set(view.added_later(getattr(state_dict, "_metadata", None)))
    missing = [key for key, _, _ in entries if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in expected]
    errors: list[str] = []
    updates: list[tuple[Any, Any, Any]] = []  # (slot, value, dtype to cast to or None)
    for key, slot, current in entries:
        if key not in state_dict:
            continue
        value = to_array(state_dict[key])
        if tuple(np.shape(value)) != tuple(current.shape):
            errors.append(messages.size_mismatch(key, np.shape(value), current.shape))
            continue
        updates.append((slot, value, current.dtype))
    if strict:
        if unexpected:
            errors.insert(0, messages.unexpected_keys(unexpected))
        if missing:
            errors.insert(0, messages.missing_keys(missing))
    if errors:
        raise messages.load_error(cls, errors)
    abstract = [
        key
        for key, _, current in entries
        if key in missing and isinstance(current, jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise messages.abstract_left(cls, abstract, _KEEP_OR_PROVIDE.format(cls=cls))
    new_variables = _nested.copy_dicts(variables)
    for key, slot, current in entries:
        if key in optional and key not in state_dict and isinstance(current, jax.ShapeDtypeStruct):
            updates.append((slot, jnp.zeros(current.shape, current.dtype), None))  # a new module's
    for slot, value, dtype in updates:
        cast = value if dtype is None else _cast(value, dtype)
        _nested.set_leaf(new_variables, (slot.collection, *slot.path), cast)
    _drop_abstract_non_persistent(new_variables, view.buffers())
    if in_place:
        frontend.update(module, new_variables)
        return IncompatibleKeys(missing, unexpected)
    return new_variables, IncompatibleKeys(missing, unexpected)


def _drop_abstract_non_persistent(
    variables: dict[str, Any], buffers: list[tuple[str, Any, Any]]
) -> None:
    """Abstract non-persistent buffers are dropped: apply recomputes them from their initial
    value, as PyTorch's `__init__` does (they are never in a state_dict). `buffers`: those of
    every distinct module."""
    for _, slot, value in buffers:
        if not slot.persistent and isinstance(value, jax.ShapeDtypeStruct):
            parent = _nested.get(variables, (slot.collection, *slot.path[:-1]))
            del parent[slot.path[-1]]


def _cast(value: Any, dtype: Any) -> jax.Array:
    if isinstance(value, jax.Array):
        # a JAX array of the model's dtype is used as it is (immutable: nothing to copy)
        return value if value.dtype == dtype else value.astype(dtype)
    return jnp.asarray(np.asarray(value).astype(dtype, copy=False))
