"""The module tree of bound variables, as PyTorch sees a module: the walk behind every listing.

`build_tree(bound_module)` returns a `Node` per module with its own parameters and buffers
and its children, all in PyTorch's order. Registry modules (`flax_registry.Module`) give their
order from `setup()`; any other flax module (or a scope created inside a compact `__call__`)
is read from its variables: `params` are parameters, every other collection holds buffers.
A submodule reached under two names is one `Node` (memoised by its flax scope path), which
is how `named_modules` removes duplicates while `state_dict` lists every alias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from ._registry import PARAMS, Kind, Slot

# Flax's own layers create their variables in this order; after `jax.jit` the dicts come back
# sorted, so a known layer gets its definition order back from this table.
_FLAX_ORDER: dict[type, tuple[str, ...]] = {
    nn.Dense: ("kernel", "bias"),
    nn.DenseGeneral: ("kernel", "bias"),
    nn.Conv: ("kernel", "bias"),
    nn.ConvTranspose: ("kernel", "bias"),
    nn.ConvLocal: ("kernel", "bias"),
    nn.Embed: ("embedding",),
    nn.BatchNorm: ("scale", "bias", "mean", "var"),
    nn.LayerNorm: ("scale", "bias"),
    nn.GroupNorm: ("scale", "bias"),
    nn.RMSNorm: ("scale",),
}


@dataclasses.dataclass(eq=False)
class Node:
    """One module: its own tensors (name, slot, value) and its children, in PyTorch's order."""

    path: tuple[str, ...]
    module: nn.Module | None
    type_name: str
    parameters: list[tuple[str, Slot, Any]] = dataclasses.field(default_factory=list)
    buffers: list[tuple[str, Slot, Any]] = dataclasses.field(default_factory=list)
    children: list[tuple[str, Node]] = dataclasses.field(default_factory=list)


def build_tree(bound: nn.Module) -> Node:
    """The tree of a bound module (sets up every registry module reachable from it)."""
    return _Builder().module_node(bound)


def _field_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules passed as constructor arguments (dataclass fields), named by their field, as
    torch names a module its `__init__` assigned to `self.<arg>`; they come before those of
    `setup()`. A field the module names itself (a container's children) is skipped."""
    from .module import _modules_in, registry_of

    registry = registry_of(module)
    taken = {id(child) for child in registry.modules.values()}
    children = []
    for field in dataclasses.fields(module):
        if (
            not field.init
            or field.name in ("parent", "name")
            or field.name in registry.module_attrs
        ):
            continue
        for name, child in _modules_in(module.__dict__.get(field.name), field.name):
            if id(child) not in taken:
                children.append((name, child))
    return children


class _Builder:
    def __init__(self) -> None:
        self.memo: dict[tuple[str, ...], Node] = {}

    def module_node(self, module: nn.Module) -> Node:
        from .module import Module, _read, registry_of

        assert module.scope is not None, "build_tree needs a bound module"
        path = tuple(module.scope.path)
        if path in self.memo:
            return self.memo[path]
        if not isinstance(module, Module):
            return self.variables_node(path, module.variables, module)
        module._try_setup()
        node = Node(path, module, type(module).__name__)
        self.memo[path] = node
        registry = registry_of(module)
        for name, slot in registry.parameters.items():
            if slot is not None:
                node.parameters.append((name, slot, _read(module, slot)))
        for name, slot in registry.buffers.items():
            if slot is not None:
                node.buffers.append((name, slot, _read(module, slot)))
        claimed_scopes = set()
        for name, child in [*_field_children(module), *registry.modules.items()]:
            if child is None:  # registered as absent, as torch's register_module(name, None)
                continue
            child_node = self.module_node(child)
            node.children.append((name, child_node))
            claimed_scopes.add(child.name)
        self._add_unregistered(node, module.variables, claimed_scopes)
        return node

    def variables_node(
        self, path: tuple[str, ...], variables: Mapping[str, Any], module: nn.Module | None
    ) -> Node:
        """A node read from variables alone (any flax module, or a compact scope)."""
        if path in self.memo:
            return self.memo[path]
        type_name = type(module).__name__ if module is not None else "Scope"
        node = Node(path, module, type_name)
        self.memo[path] = node
        self._add_unregistered(node, variables, set())
        order = _FLAX_ORDER.get(type(module)) if module is not None else None
        if order:
            rank = {name: i for i, name in enumerate(order)}
            node.parameters.sort(key=lambda item: rank.get(item[0], len(rank)))
            node.buffers.sort(key=lambda item: rank.get(item[0], len(rank)))
        return node

    def _add_unregistered(
        self, node: Node, variables: Mapping[str, Any], claimed_scopes: set[str]
    ) -> None:
        """Tensors and child scopes present in the variables but not in the registry."""
        known = {slot.ident for _, slot, _ in node.parameters + node.buffers}
        child_scopes: dict[str, dict[str, Any]] = {}
        collections = sorted(variables, key=lambda c: c != PARAMS)  # params first, stable
        for collection in collections:
            for key, value in variables[collection].items():
                if isinstance(value, Mapping):
                    if key not in claimed_scopes:
                        child_scopes.setdefault(key, {})[collection] = value
                    continue
                slot_path = (*node.path, key)
                if (collection, slot_path) in known:
                    continue
                kind: Kind = "parameter" if collection == PARAMS else "buffer"
                slot = Slot(key, kind, collection, slot_path)
                (node.parameters if kind == "parameter" else node.buffers).append(
                    (key, slot, value)
                )
        for key, sub in child_scopes.items():
            node.children.append((key, self.variables_node((*node.path, key), sub, None)))
