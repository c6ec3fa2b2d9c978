"""Reading a bound linen module into the core's `Node` tree, as PyTorch walks a module.

The state view (`build`): registry modules (`flax_registry.Module`) give their order from
`setup()`; any other flax module, or a scope created inside a compact `__call__`, is read from
its variables: `params` are parameters, every other collection holds buffers. A submodule
reached under two names is one `Node` (memoised by its scope path).

The torch view (`build(..., torch_view=True)`), for conversion: the layer object of every
scope (bound setup attributes, or the modules recorded while `init` ran), and the children
under the names the PyTorch twin gives them: a submodule flax named after its attribute gets
torch's container name (`layers_0` -> `layers.0`, `nn.Sequential`'s children `0`, `1`), one
given an explicit `name=` keeps that name, compact layers come in call order, and a submodule
held by another scope's attribute (one `nn.Embed` passed to an encoder and a decoder) appears
under each parent. A registry module below a compact parent is read from its registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

from .._node import Node
from .._registry import PARAMS, Kind, Slot
from . import structure
from .module import Module, field_children, modules_in, read, registry_of
from .record import Records

# Flax's own layers create their variables in this order; after `jax.jit` the dicts come back
# sorted, so a known layer gets its definition order back from this table.
_FLAX_ORDER: dict[type, tuple[str, ...]] = {
    nn.Dense: ("kernel", "bias"),
    nn.DenseGeneral: ("kernel", "bias"),
    nn.Einsum: ("kernel", "bias"),
    nn.Conv: ("kernel", "bias"),
    nn.ConvTranspose: ("kernel", "bias"),
    nn.ConvLocal: ("kernel", "bias"),
    nn.Embed: ("embedding",),
    nn.BatchNorm: ("scale", "bias", "mean", "var"),
    nn.LayerNorm: ("scale", "bias"),
    nn.GroupNorm: ("scale", "bias"),
    nn.RMSNorm: ("scale",),
}

# Flax's own layers that hold no submodule (their fields are numbers, dtypes and functions;
# `nn.Embed`'s setup only declares its table): their setup need not run to list children.
# An exact type only: a subclass may define a setup that makes some.
_NO_SUBMODULES: frozenset[type] = frozenset({*_FLAX_ORDER, nn.Dropout, nn.InstanceNorm})

# Module trees built, or re-filled from the structure cache (`structure`): a test checks that
# each public call reads one tree.
BUILDS = {"count": 0}


def read_tree(
    module: nn.Module,
    variables: Mapping[str, Any],
    *,
    records: Records | None = None,
    torch_view: bool = False,
) -> Node:
    """The tree of unbound `module` over `variables`: the cached structure of its definition
    re-filled with these variables' values when it was read before, else built (and its
    structure cached, see `structure`)."""
    prepared = None if records else structure.prepare(module, variables, torch_view)
    if prepared is None:
        return build(
            module.bind(variables), records=records, torch_view=torch_view, target=variables
        )
    key, leaves = prepared
    skeleton = structure.lookup(key)
    values = structure.values_of(skeleton, leaves) if skeleton is not None else None
    if skeleton is not None and values is not None:
        BUILDS["count"] += 1
        return structure.refill(skeleton, values, module, variables)
    if torch_view:  # the layers kept for the rules must hold no arrays: build over shapes
        abstract = _abstract(variables)
        if abstract is not None:
            same = abstract is variables
            root = build(module.bind(abstract), torch_view=True, target=abstract)
            abstract_leaves = leaves if same else jax.tree_util.tree_leaves(abstract)
            skeleton = structure.skeleton_of(root, abstract, abstract_leaves, torch_view=True)
            if skeleton is not None:
                structure.store(key, skeleton)
                values = structure.values_of(skeleton, leaves)
                if same:
                    return root
                if values is not None:
                    return structure.refill(skeleton, values, module, variables)
    root = build(module.bind(variables), records=records, torch_view=torch_view, target=variables)
    if not torch_view:
        skeleton = structure.skeleton_of(root, variables, leaves, torch_view=False)
        if skeleton is not None:
            structure.store(key, skeleton)
    return root


def listing(module: nn.Module, variables: Mapping[str, Any]) -> structure.Listing | None:
    """The state API's listings of `module` over `variables` from the structure cache (one
    re-filled tree); None when the structure is not cached (then read the tree)."""
    prepared = structure.prepare(module, variables, torch_view=False)
    if prepared is None:
        return None
    key, leaves = prepared
    skeleton = structure.lookup(key)
    values = structure.values_of(skeleton, leaves) if skeleton is not None else None
    if skeleton is None or values is None:
        return None
    BUILDS["count"] += 1
    return structure.Listing(skeleton, values)


def remember_torch_view(module: nn.Module, variables: Mapping[str, Any], bound: nn.Module) -> None:
    """Cache the torch view of `bound` (`module` bound to the abstract `variables`, set up by
    `declare.declared_init`), so that the conversion that asked for the abstract variables
    does not set the model up a second time. Not counted as a build: no call read it yet."""
    prepared = structure.prepare(module, variables, torch_view=True)
    if prepared is None:
        return
    key, leaves = prepared
    root = _Builder().module_node(bound)
    _TorchView(root, {}, variables).fill(root)
    skeleton = structure.skeleton_of(root, variables, leaves, torch_view=True)
    if skeleton is not None:
        structure.store(key, skeleton)


def _abstract(variables: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """`variables` with every leaf a `jax.ShapeDtypeStruct` (itself when they all are; None
    when a leaf has no shape and dtype)."""
    leaves = jax.tree_util.tree_leaves(variables)
    if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        return variables
    try:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    except (AttributeError, TypeError):
        return None


def build(
    bound: nn.Module,
    *,
    records: Records | None = None,
    torch_view: bool = False,
    target: Mapping[str, Any] | None = None,
) -> Node:
    """The tree of a bound module (setting up every registry module reachable from it); with
    `torch_view`, the conversion view too (`target`: the variables `bound` is bound to)."""
    BUILDS["count"] += 1
    root = _Builder().module_node(bound)
    if torch_view:
        _TorchView(root, dict(records or {}), target if target is not None else {}).fill(root)
    return root


class _Builder:
    def __init__(self) -> None:
        self.memo: dict[tuple[str, ...], Node] = {}

    def module_node(self, module: nn.Module) -> Node:
        assert module.scope is not None, "a module tree needs a bound module"
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
                node.parameters.append((name, slot, read(module, slot)))
        for name, slot in registry.buffers.items():
            if slot is not None:
                node.buffers.append((name, slot, read(module, slot)))
        claimed_scopes = set()
        for name, child in [*field_children(module), *registry.modules.items()]:
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


def attribute_children(mod: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(torch name, attribute name, submodule) of a module's attributes, in assignment order.

    The attribute name is torch's container name (`layers_0` -> `layers.0`; `nn.Sequential`'s
    `layers_0` -> `0`). The torch name is the same for a submodule flax named after its
    attribute, and its own scope name for one given an explicit `name=`.
    """
    for attr, value in list(vars(mod).items()):
        if attr.startswith("_") or attr in ("parent", "scope", "name"):
            continue
        for dotted, child in modules_in(value, attr):
            auto = child.name is None or child.name == dotted.replace(".", "_")
            if isinstance(mod, nn.Sequential) and attr == "layers":
                dotted = dotted.removeprefix("layers.")
            yield (dotted if auto or child.name is None else child.name), dotted, child


def _index(node: Node, out: dict[tuple[str, ...], Node]) -> dict[tuple[str, ...], Node]:
    if node.path not in out:
        out[node.path] = node
        for _, child in node.children:
            _index(child, out)
    return out


class _TorchView:
    """Fills `layer`, `registry` and `torch_children` of every node reachable from the root."""

    def __init__(self, root: Node, records: Records, target: Mapping[str, Any]) -> None:
        self.records = records
        self.target = target
        self.nodes = _index(root, {})
        self.done: set[int] = set()
        # the compact layers each scope called, in call order (the records `_children` adds
        # later are setup attributes, which it has placed already)
        self.called: dict[tuple[str, ...], list[str]] = {}
        for path in records:
            if path:
                self.called.setdefault(tuple(path[:-1]), []).append(path[-1])

    def fill(self, node: Node) -> None:
        if id(node) in self.done:
            return
        self.done.add(id(node))
        layer = node.module if node.module is not None else self.records.get(node.path)
        node.layer = layer
        if isinstance(layer, Module):
            if node.module is None:  # below a compact parent: read its registry
                self._read_registry(node, layer)
            node.registry = True
            node.torch_children = list(node.children)
        else:
            node.torch_children = self._children(node, layer)
        for _, child in node.torch_children:
            self.fill(child)

    def _children(self, node: Node, mod: Any) -> list[tuple[str, Node]]:
        """The child scopes of `node` in the order their modules were assigned (then called),
        each under its torch name; a submodule of another scope held by an attribute (a
        shared module) too, under the attribute's name."""
        scopes = dict(node.children)
        ordered: list[tuple[str, Node]] = []
        seen: set[str] = set()
        if mod is not None:
            if mod.scope is not None and type(mod) not in _NO_SUBMODULES:
                # a bound module: make sure its setup() ran (flax's registers each field of
                # each layer: for BERT-large's 200 flax layers, a third of a conversion's plan)
                mod._try_setup()
            for torch_name, attribute, sub in attribute_children(mod):
                if sub.name is None:
                    continue
                own = (*node.path, sub.name)
                path = tuple(sub.scope.path) if sub.scope is not None else own
                if path == own and sub.name in scopes and sub.name not in seen:
                    seen.add(sub.name)
                    self.records.setdefault(path, sub)
                    ordered.append((torch_name, scopes[sub.name]))
                elif path != own and path in self.nodes:  # shared with another parent
                    ordered.append((attribute, self.nodes[path]))
        called = self.called.get(node.path, [])
        for name in [*called, *scopes]:  # compact layers: the order they were called in
            if name in scopes and name not in seen:
                seen.add(name)
                ordered.append((name, scopes[name]))
        return ordered

    def _read_registry(self, node: Node, mod: Module) -> None:
        """Replace a node read from variables with the registry module's own tree: a copy
        bound to its part of the target, every path and value put back in the whole target."""
        sub = {}
        for collection, tree in self.target.items():
            part: Any = tree
            for name in node.path:
                part = part.get(name) if isinstance(part, Mapping) else None
            if isinstance(part, Mapping):
                sub[collection] = part
        local = _Builder().module_node(mod.clone(parent=None).bind(sub))
        rebased = _rebase(local, node.path, self.target)
        node.module, node.type_name = rebased.module, rebased.type_name
        node.parameters, node.buffers = rebased.parameters, rebased.buffers
        node.children = rebased.children
        for child in _index(node, {}).values():
            self.nodes.setdefault(child.path, child)


def _rebase(node: Node, base: tuple[str, ...], target: Mapping[str, Any]) -> Node:
    """`node` (built from a module bound at `base`) with absolute paths and target leaves."""

    def moved(items: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
        out = []
        for name, slot, value in items:
            full = dataclasses.replace(slot, path=(*base, *slot.path))
            leaf: Any = target.get(full.collection)
            for part in full.path:
                leaf = leaf.get(part) if isinstance(leaf, Mapping) else None
            # absent: a non-persistent buffer the module recomputes (its fallback value)
            out.append((name, full, value if leaf is None else leaf))
        return out

    return Node(
        (*base, *node.path),
        node.module,
        node.type_name,
        moved(node.parameters),
        moved(node.buffers),
        [(name, _rebase(child, base, target)) for name, child in node.children],
    )
