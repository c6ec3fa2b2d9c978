"""PyTorch names of every variable, read from the module tree (never from dict order or key
guesses): the one table behind label trees, checkpoint key maps and sharding rules.

`torch_names(module, variables)` walks the tree the module's front-end reads and returns, for
each variable (collection + flax path), every dotted PyTorch name it has (a tied or shared
tensor has several), whether it is persistent and whether it is trainable, plus every
`state_dict` key in order. It depends only on the module definition and the structure of the
variables, so it is cached by both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from ._frontend import frontend_of
from ._nested import KeyPath
from ._node import Node
from ._registry import PARAMS

Ident = tuple[str, KeyPath]  # (collection, flax path inside the collection)


@dataclasses.dataclass
class VariableInfo:
    """One variable of the model as PyTorch sees it."""

    collection: str
    path: KeyPath
    names: list[str]  # dotted PyTorch names, first = the one `named_parameters` lists
    kind: str  # "parameter" or "buffer"
    persistent: bool = True
    trainable: bool = True

    @property
    def name(self) -> str:
        return self.names[0]


@dataclasses.dataclass(frozen=True)
class TorchNames:
    """Every variable of a module (`table`) and every PyTorch name in `state_dict` order,
    aliases and non-persistent buffers included (`keys`: `(name, ident)` pairs)."""

    table: Mapping[Ident, VariableInfo]
    keys: tuple[tuple[str, Ident], ...]

    def state_dict_keys(self) -> list[tuple[str, Ident]]:
        """The `(key, ident)` pairs `state_dict` lists, in its order."""
        return [(name, ident) for name, ident in self.keys if self.table[ident].persistent]

    def name_of(self, ident: Ident) -> str:
        """The PyTorch name of a variable (`collection/path` for one the table lacks)."""
        info = self.table.get(ident)
        return info.name if info is not None else "/".join((ident[0], *ident[1]))

    def non_persistent(self) -> set[KeyPath]:
        """`(collection, *path)` of every non-persistent buffer."""
        return {(c, *p) for (c, p), info in self.table.items() if not info.persistent}

    def parameters(self) -> dict[KeyPath, VariableInfo]:
        """The parameters, keyed by their path in `params`."""
        return {path: info for (c, path), info in self.table.items() if c == PARAMS}


_CACHE: dict[Any, TorchNames] = {}


def torch_names(module: Any, variables: Mapping[str, Any]) -> TorchNames:
    """The `TorchNames` of `module` over `variables` (concrete or abstract), cached by the
    module definition and the structure of the variables: listing a large model once per
    checkpoint or train state would cost more than orbax's own work."""
    frontend = frontend_of(module)
    module = frontend.unbound(module)
    definition = frontend.cache_key(module)
    key: Any = None
    if definition is not None:
        try:
            key = (definition, jax.tree.structure(variables))
            hash(key)
        except TypeError:
            key = None
    cached = _CACHE.get(key) if key is not None else None
    if cached is not None:
        return cached
    table: dict[Ident, VariableInfo] = {}
    keys: list[tuple[str, Ident]] = []
    _walk(frontend.tree(module, variables), "", table, keys)
    result = TorchNames(table, tuple(keys))
    if key is not None:
        if len(_CACHE) >= 64:
            _CACHE.clear()
        _CACHE[key] = result
    return result


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


def variable_names(module: Any, variables: Mapping[str, Any]) -> Mapping[Ident, VariableInfo]:
    """Every variable of `module` with its PyTorch names, in `state_dict` order.

    `variables` may be concrete or abstract (`jax.ShapeDtypeStruct` leaves).
    """
    return torch_names(module, variables).table
