"""PyTorch names of every variable, read from the registry (never from dict order or key guesses).

`variable_names(module, variables)` walks the module tree that `flax_registry._tree.build_tree`
reads from the bound module and returns, for each variable (collection + flax path), every
dotted PyTorch name it has (a tied or shared tensor has several), whether it is persistent
and whether it is trainable. Label trees (`param_labels`), checkpoint key maps and sharding
rules are all built from this one table, so their containers always match the variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from .._registry import PARAMS
from .._tree import Node, build_tree

Path = tuple[str, ...]
Ident = tuple[str, Path]  # (collection, flax path inside the collection)


@dataclasses.dataclass
class VariableInfo:
    """One variable of the model as PyTorch sees it."""

    collection: str
    path: Path
    names: list[str]  # dotted PyTorch names, first = the one `named_parameters` lists
    kind: str  # "parameter" or "buffer"
    persistent: bool = True
    trainable: bool = True

    @property
    def name(self) -> str:
        return self.names[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every variable of a module (`table`) and every PyTorch name in `state_dict` order,
    aliases and non-persistent buffers included (`keys`: `(name, ident)` pairs)."""

    table: Mapping[Ident, VariableInfo]
    keys: tuple[tuple[str, Ident], ...]

    def state_dict_keys(self) -> list[tuple[str, Ident]]:
        """The `(key, ident)` pairs `state_dict` lists, in its order."""
        return [(name, ident) for name, ident in self.keys if self.table[ident].persistent]


_LAYOUTS: dict[Any, Layout] = {}


def layout(module: nn.Module, variables: Mapping[str, Any]) -> Layout:
    """The `Layout` of `module` bound to `variables` (concrete or abstract).

    It depends only on the module definition and the structure of the variables, so it is
    cached by both: listing a large model's variables once per checkpoint or train state
    would cost more than orbax's own work.
    """
    if module.scope is not None:
        module, _ = module.unbind()
    try:
        key: Any = (module, jax.tree.structure(variables))
        hash(key)
    except TypeError:  # an unhashable module field: no caching
        key = None
    cached = _LAYOUTS.get(key) if key is not None else None
    if cached is not None:
        return cached
    table: dict[Ident, VariableInfo] = {}
    keys: list[tuple[str, Ident]] = []
    _walk(build_tree(module.bind(variables)), "", table, keys)
    result = Layout(table, tuple(keys))
    if key is not None:
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = result
    return result


def variable_names(module: nn.Module, variables: Mapping[str, Any]) -> Mapping[Ident, VariableInfo]:
    """Every variable of `module` with its PyTorch names, in `state_dict` order.

    `variables` may be concrete or abstract (`jax.ShapeDtypeStruct` leaves).
    """
    return layout(module, variables).table


def _walk(
    node: Node, prefix: str, table: dict[Ident, VariableInfo], keys: list[tuple[str, Ident]]
) -> None:
    for kind, entries in (("parameter", node.parameters), ("buffer", node.buffers)):
        for name, slot, _ in entries:
            info = table.get(slot.ident)
            if info is None:
                info = VariableInfo(slot.collection, slot.path, [], kind, slot.persistent)
                table[slot.ident] = info
            info.names.append(prefix + name)
            info.trainable = info.trainable and slot.trainable
            keys.append((prefix + name, slot.ident))
    for name, child in node.children:
        _walk(child, f"{prefix}{name}.", table, keys)


def key_path(path: Any) -> Path:
    """A `jax.tree_util` key path as a tuple of strings (dict keys, attribute names, indices)."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        else:  # FlattenedIndexKey and friends
            parts.append(str(getattr(entry, "key", entry)))
    return tuple(parts)


def leaf_paths(tree: Any) -> dict[Path, Any]:
    """`{path: leaf}` of a pytree, paths as tuples of strings."""
    return {key_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def param_infos(table: Mapping[Ident, VariableInfo]) -> dict[Path, VariableInfo]:
    """The parameters of a `variable_names` table, keyed by their path in `params`."""
    return {path: info for (collection, path), info in table.items() if collection == PARAMS}
