"""PyTorch's state API as pure functions of `(module, variables)`.

`named_parameters`, `named_buffers`, `named_modules`, `state_dict`, `get_*` and
`load_state_dict` follow `torch.nn.Module`'s algorithms and orders exactly, over the tree
that `flax_registry._tree.build_tree` reads from the bound module. Nothing here mutates its
inputs: `load_state_dict` returns new variables.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import _messages as messages
from ._arrays import to_array
from ._tree import Node, build_tree

Variables = Mapping[str, Any]


class IncompatibleKeys(NamedTuple):
    """What a non-strict `load_state_dict` did not match, as PyTorch's `_IncompatibleKeys`."""

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


def _tree(module: nn.Module, variables: Variables) -> Node:
    if module.scope is not None:
        raise TypeError(
            f"{type(module).__name__} is already bound; call the method on it instead "
            "(model.bind(variables).state_dict()), or pass the unbound module."
        )
    return build_tree(module.bind(variables))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- the PyTorch algorithms over Nodes ---------------------------------------------------------


def _named_modules(
    node: Node, memo: set[int] | None, prefix: str, remove_duplicate: bool
) -> Iterator[tuple[str, Node]]:
    if memo is None:
        memo = set()
    if id(node) not in memo:
        if remove_duplicate:
            memo.add(id(node))
        yield prefix, node
        for name, child in node.children:
            yield from _named_modules(child, memo, _join(prefix, name), remove_duplicate)


def _named_members(
    node: Node, kind: str, prefix: str, recurse: bool, remove_duplicate: bool
) -> Iterator[tuple[str, Any]]:
    memo: set[Any] = set()
    modules = _named_modules(node, None, prefix, remove_duplicate) if recurse else [(prefix, node)]
    for module_prefix, module in modules:
        for name, slot, value in getattr(module, kind):
            if slot.ident in memo:
                continue
            if remove_duplicate:
                memo.add(slot.ident)
            yield _join(module_prefix, name), value


def _state_entries(node: Node, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(key, slot, value) of every `state_dict` entry, with every alias, in PyTorch's order."""
    for name, slot, value in node.parameters:
        yield prefix + name, slot, value
    for name, slot, value in node.buffers:
        if slot.persistent:
            yield prefix + name, slot, value
    for name, child in node.children:
        yield from _state_entries(child, prefix + name + ".")


def added_later(node: Node, metadata: Mapping[str, Any] | None, prefix: str = "") -> Iterator[str]:
    """Keys of buffers that a state dict may lack, as PyTorch's `_load_from_state_dict` lets
    it: a module's `_added_in_version` buffers, when the state dict records no version for
    the module (`_metadata`, which `torch.nn.Module.state_dict()` writes) or an older one."""
    added = getattr(type(node.module), "_added_in_version", None) if node.module else None
    if added:
        info = metadata.get(prefix[:-1], {}) if metadata is not None else {}
        version = info.get("version") if isinstance(info, Mapping) else None
        for name, since in added.items():
            if version is None or version < since:
                yield prefix + name
    for name, child in node.children:
        yield from added_later(child, metadata, prefix + name + ".")


def _get_node(node: Node, target: str) -> Node:
    if target == "":
        return node
    current, rest = node, target
    while rest:
        # A child of a list attribute has a dotted local name ("heads.1"): longest match wins.
        match = max(
            (name for name, _ in current.children if rest == name or rest.startswith(name + ".")),
            key=len,
            default=None,
        )
        if match is None:
            raise AttributeError(f"{current.type_name} has no attribute `{rest.split('.')[0]}`")
        current = dict(current.children)[match]
        rest = rest[len(match) + 1 :]
    return current


def _get_member(node: Node, target: str, kind: str, what: str) -> Any:
    module_path, _, name = target.rpartition(".")
    owner = _get_node(node, module_path)
    for member, _, value in getattr(owner, kind):
        if member == name:
            return value
    known = [n for n, _, _ in owner.parameters + owner.buffers] + [n for n, _ in owner.children]
    if name not in known and not (owner.module is not None and hasattr(owner.module, name)):
        raise AttributeError(f"{owner.type_name} has no attribute `{name}`")
    raise AttributeError(f"`{name}` is not {what}")


# --- the public pure functions --------------------------------------------------------------


def named_parameters(
    module: nn.Module,
    variables: Variables,
    prefix: str = "",
    recurse: bool = True,
    remove_duplicate: bool = True,
) -> Iterator[tuple[str, jax.Array]]:
    """`(name, value)` of every parameter, as `torch.nn.Module.named_parameters`.

    Pre-order over modules; a tensor reached under two names (a shared submodule, a tied
    parameter) is listed once unless `remove_duplicate=False`. Parameters of any flax
    submodule (its `params` collection) are listed under their flax names.
    """
    return named_parameters_of(module.bind(variables), prefix, recurse, remove_duplicate)


def named_parameters_of(
    bound: nn.Module, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
) -> Iterator[tuple[str, jax.Array]]:
    return _named_members(build_tree(bound), "parameters", prefix, recurse, remove_duplicate)


def parameters(module: nn.Module, variables: Variables, recurse: bool = True) -> Iterator[Any]:
    """The values of `named_parameters`, as `torch.nn.Module.parameters`."""
    return (value for _, value in named_parameters(module, variables, recurse=recurse))


def named_buffers(
    module: nn.Module,
    variables: Variables,
    prefix: str = "",
    recurse: bool = True,
    remove_duplicate: bool = True,
) -> Iterator[tuple[str, jax.Array]]:
    """`(name, value)` of every buffer, as `torch.nn.Module.named_buffers`.

    Non-persistent buffers are included (as in PyTorch); so are the non-`params` collections
    of flax submodules (`batch_stats`, ...), under their flax names.
    """
    return named_buffers_of(module.bind(variables), prefix, recurse, remove_duplicate)


def named_buffers_of(
    bound: nn.Module, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
) -> Iterator[tuple[str, jax.Array]]:
    return _named_members(build_tree(bound), "buffers", prefix, recurse, remove_duplicate)


def buffers(module: nn.Module, variables: Variables, recurse: bool = True) -> Iterator[Any]:
    """The values of `named_buffers`, as `torch.nn.Module.buffers`."""
    return (value for _, value in named_buffers(module, variables, recurse=recurse))


def named_modules(
    module: nn.Module, variables: Variables, prefix: str = "", remove_duplicate: bool = True
) -> Iterator[tuple[str, nn.Module | None]]:
    """`(name, bound module)` pre-order, as `torch.nn.Module.named_modules`.

    A scope that only exists inside a compact `__call__` (flax creates its module object
    during that call only) is listed with `None` in place of the module.
    """
    return named_modules_of(module.bind(variables), prefix, remove_duplicate)


def named_modules_of(
    bound: nn.Module, prefix: str = "", remove_duplicate: bool = True
) -> Iterator[tuple[str, nn.Module | None]]:
    for name, node in _named_modules(build_tree(bound), None, prefix, remove_duplicate):
        yield name, node.module


def state_dict(module: nn.Module, variables: Variables, prefix: str = "") -> dict[str, jax.Array]:
    """The PyTorch `state_dict`: parameters, then persistent buffers, then each child's.

    Every alias of a shared tensor has its own key, as in PyTorch. Unlike PyTorch the values
    are the arrays themselves (JAX arrays are immutable, so there is nothing to detach).
    """
    return state_dict_of(module.bind(variables), prefix)


def state_dict_of(bound: nn.Module, prefix: str = "") -> dict[str, jax.Array]:
    return {key: value for key, _, value in _state_entries(build_tree(bound), prefix)}


def get_submodule(module: nn.Module, variables: Variables, target: str) -> nn.Module | None:
    """The bound submodule at dotted `target`, as `torch.nn.Module.get_submodule`."""
    return get_submodule_of(module.bind(variables), target)


def get_submodule_of(bound: nn.Module, target: str) -> nn.Module | None:
    return _get_node(build_tree(bound), target).module


def get_parameter(module: nn.Module, variables: Variables, target: str) -> jax.Array:
    """The parameter at dotted `target`, as `torch.nn.Module.get_parameter`."""
    return get_parameter_of(module.bind(variables), target)


def get_parameter_of(bound: nn.Module, target: str) -> jax.Array:
    return _get_member(build_tree(bound), target, "parameters", "an nn.Parameter")


def get_buffer(module: nn.Module, variables: Variables, target: str) -> jax.Array:
    """The buffer at dotted `target`, as `torch.nn.Module.get_buffer`."""
    return get_buffer_of(module.bind(variables), target)


def get_buffer_of(bound: nn.Module, target: str) -> jax.Array:
    return _get_member(build_tree(bound), target, "buffers", "a buffer")


# --- loading ---------------------------------------------------------------------------------

_UNINITIALISED = (
    "Error(s) in loading state_dict for {cls}:\n\tMissing key(s) in state_dict: {keys}. \n"
    "These variables are abstract (jax.ShapeDtypeStruct) and strict=False would leave them "
    "uninitialised. Pass concrete variables (from {cls}.init) to keep their current values, "
    "or provide these keys."
)


def _copy_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def _set(tree: dict[str, Any], collection: str, path: tuple[str, ...], value: Any) -> None:
    node = tree.setdefault(collection, {})
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def load_state_dict(
    module: nn.Module, variables: Variables, state_dict: Mapping[str, Any], strict: bool = True
) -> tuple[dict[str, Any], IncompatibleKeys]:
    """Copy a PyTorch-keyed `state_dict` into new variables, as `torch.nn.Module.load_state_dict`.

    Returns `(new_variables, IncompatibleKeys(missing_keys, unexpected_keys))`. `variables`
    gives the structure, shapes and dtypes (concrete, or abstract from `jax.eval_shape`) and
    is never modified. Values may be numpy or JAX arrays or torch tensors; each is cast to
    the model's dtype. As in PyTorch, a shape mismatch raises whether or not `strict`, and
    `strict=True` raises on missing or unexpected keys with PyTorch's message. Differences:
    nothing is applied when anything raises (PyTorch may have copied some tensors already),
    and `strict=False` refuses to leave an abstract leaf unfilled.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
    cls = type(module).__name__
    root = _tree(module, variables)
    entries = list(_state_entries(root, ""))
    expected = {key for key, _, _ in entries}
    optional = set(added_later(root, getattr(state_dict, "_metadata", None)))
    missing = [key for key, _, _ in entries if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in expected]
    errors: list[str] = []
    updates: list[tuple[Any, Any]] = []
    for key, slot, current in entries:
        if key not in state_dict:
            continue
        value = to_array(state_dict[key])
        if tuple(np.shape(value)) != tuple(current.shape):
            errors.append(messages.size_mismatch(key, np.shape(value), current.shape))
            continue
        updates.append((slot, _cast(value, current.dtype)))
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
        raise RuntimeError(_UNINITIALISED.format(cls=cls, keys=messages.quoted(abstract)))
    new_variables = _copy_dicts(variables)
    for key, slot, current in entries:
        if key in optional and key not in state_dict and isinstance(current, jax.ShapeDtypeStruct):
            updates.append((slot, jnp.zeros(current.shape, current.dtype)))  # a new module's
    for slot, value in updates:
        _set(new_variables, slot.collection, slot.path, value)
    _drop_abstract_non_persistent(new_variables, module)
    return new_variables, IncompatibleKeys(missing, unexpected)


def _drop_abstract_non_persistent(variables: dict[str, Any], module: nn.Module) -> None:
    """Abstract non-persistent buffers are dropped: apply recomputes them from their initial
    value, as PyTorch's `__init__` does (they are never in a state_dict)."""
    for _, node in _named_modules(_tree(module, variables), None, "", True):
        for _, slot, value in node.buffers:
            if not slot.persistent and isinstance(value, jax.ShapeDtypeStruct):
                parent = variables[slot.collection]
                for part in slot.path[:-1]:
                    parent = parent[part]
                del parent[slot.path[-1]]


def _cast(value: Any, dtype: Any) -> jax.Array:
    if isinstance(value, jax.Array):
        return value.astype(dtype)
    return jnp.asarray(np.asarray(value).astype(dtype, copy=False))
