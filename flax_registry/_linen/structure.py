"""What a module definition registers, cached: module trees re-filled instead of rebuilt.

Reading a linen module's tree binds the definition to the variables and runs `setup()` of
every registry module (`tree.build`): about half a millisecond per variable, every call. The
result's *structure* (nodes, names, slots, order, children, the torch view's layers) depends
only on the definition and on the structure of the variables, so it is kept here as a
`Skeleton`, keyed by the definition's `definition.fingerprint` (class, `setup`, field values,
submodules; None for a definition holding a value that cannot be vouched for: then nothing is
cached), the variables' tree structure, and the view (state or torch).

The values are never part of it: each call takes its own variables' leaves (by their place in
the flattened tree) and checks that every one has the shape it had when the tree was built
(a shape that no longer matches the definition must still raise flax's error from a real
build; any mismatch means a real build). A skeleton is kept only when every value of the
build was exactly the variables' leaf at the slot's path (no fallback of a non-persistent
buffer, nothing computed), so a re-filled tree is the tree a build would give.

Re-filled trees come two ways: `refill` makes the `Node`s (a node's bound module, for
`named_modules` / `get_submodule`, is found on first access only, by binding this call's
variables and setting up the modules on its path), and `Listing` gives the state API's
listings without making any node, from orders computed once per skeleton by the core's own
walks. The torch view (conversion) is built over an abstract copy of the variables, so the
layer objects kept for the rules hold no arrays. Trees read with layer records (compact
modules) are not cached. Bounded: the `LIMIT` most recently used skeletons.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

from .._node import Node, named_members, named_modules, state_entries
from .._registry import Slot
from .definition import fingerprint
from .module import Module, ensure_setup, field_children, modules_in, registry_of

LIMIT = 32
_MEMO_LIMIT = 64
_LOCK = threading.Lock()
_CACHE: collections.OrderedDict[Hashable, Skeleton] = collections.OrderedDict()
_MISSING: Any = object()

Members = tuple[tuple[str, int], ...]  # (local name, slot number)


@dataclasses.dataclass(frozen=True)
class _Shape:
    """One node without values: its members by slot number, its children by node number."""

    path: tuple[str, ...]
    type_name: str
    module_type: type | None
    parameters: Members
    buffers: Members
    children: tuple[tuple[str, int], ...]
    layer: Any
    registry: bool
    torch_children: tuple[tuple[str, int], ...] | None


@dataclasses.dataclass
class Skeleton:
    """A module tree without values: nodes by number (the root first), every distinct
    variable (`slots`) with its place among the flattened leaves and its shape."""

    nodes: tuple[_Shape, ...]
    slots: tuple[Slot, ...]
    leaf_index: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    torch_view: bool
    memo: dict[Hashable, Any] = dataclasses.field(default_factory=dict)
    _template: Node | None = None

    def template(self) -> Node:
        """The tree with each member's value its slot number (for the core's walks)."""
        if self._template is None:
            nodes = [
                Node(
                    s.path,
                    None,
                    s.type_name,
                    [(n, self.slots[i], i) for n, i in s.parameters],
                    [(n, self.slots[i], i) for n, i in s.buffers],
                )
                for s in self.nodes
            ]
            for shape, node in zip(self.nodes, nodes):
                node.children = [(n, nodes[i]) for n, i in shape.children]
            self._template = nodes[0]
        return self._template

    def remember(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        found = self.memo.get(key, _MISSING)
        if found is _MISSING:
            found = compute()
            if len(self.memo) >= _MEMO_LIMIT:
                self.memo.clear()
            self.memo[key] = found
        return found


def prepare(
    module: nn.Module, variables: Mapping[str, Any], torch_view: bool
) -> tuple[Hashable, list[Any]] | None:
    """The cache key of reading `module` over `variables`, and the variables' leaves; None
    when the definition cannot be cached."""
    definition = fingerprint(module)
    if definition is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    return (definition, treedef, torch_view), leaves


def lookup(key: Hashable) -> Skeleton | None:
    with _LOCK:
        skeleton = _CACHE.get(key)
        if skeleton is not None:
            _CACHE.move_to_end(key)
        return skeleton


def store(key: Hashable, skeleton: Skeleton) -> None:
    with _LOCK:
        _CACHE[key] = skeleton
        _CACHE.move_to_end(key)
        while len(_CACHE) > LIMIT:
            _CACHE.popitem(last=False)


def clear() -> None:
    """Forget every cached structure."""
    with _LOCK:
        _CACHE.clear()


def values_of(skeleton: Skeleton, leaves: list[Any]) -> list[Any] | None:
    """This call's value of every slot; None when a leaf's shape is not the cached one."""
    try:
        values = [leaves[i] for i in skeleton.leaf_index]
        if tuple(tuple(v.shape) for v in values) != skeleton.shapes:
            return None
    except (AttributeError, IndexError, TypeError):
        return None
    return values


def _paths(variables: Mapping[str, Any]) -> dict[tuple[str, ...], int]:
    """(collection, *path) of every leaf of plain nested mappings -> its flattened index."""
    out: dict[tuple[str, ...], int] = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    for i, (keypath, _) in enumerate(flat):
        keys = tuple(getattr(k, "key", _MISSING) for k in keypath)
        if all(isinstance(k, str) for k in keys):
            out[keys] = i
    return out


def skeleton_of(
    root: Node, variables: Mapping[str, Any], leaves: list[Any], torch_view: bool
) -> Skeleton | None:
    """The structure of a tree built over `variables`, or None when a value of it is not the
    variables' leaf at its slot (a fallback value, a boxed variable, a computed value)."""
    numbers: dict[int, int] = {}
    order: list[Node] = []

    def number(node: Node) -> int:
        if id(node) not in numbers:
            numbers[id(node)] = len(order)
            order.append(node)
            for _, child in node.children:
                number(child)
            for _, child in node.torch_children or ():
                number(child)
        return numbers[id(node)]

    number(root)
    paths = _paths(variables)
    slot_numbers: dict[Slot, int] = {}
    slots: list[Slot] = []
    leaf_index: list[int] = []

    def slot_number(slot: Slot, value: Any) -> int:
        found = slot_numbers.get(slot)
        if found is None:
            index = paths.get((slot.collection, *slot.path))
            if index is None:
                raise LookupError(slot.ident)
            found = slot_numbers[slot] = len(slots)
            slots.append(slot)
            leaf_index.append(index)
        if leaves[leaf_index[found]] is not value:
            raise LookupError(slot.ident)
        return found

    shapes: list[_Shape] = []
    try:
        for node in order:
            members = []
            for group in (node.parameters, node.buffers):
                entries = []
                for name, slot, value in group:
                    entries.append((name, slot_number(slot, value)))
                members.append(tuple(entries))
            torch_children = None
            if node.torch_children is not None:
                torch_children = tuple((n, numbers[id(c)]) for n, c in node.torch_children)
            shapes.append(
                _Shape(
                    node.path,
                    node.type_name,
                    type(node.module) if node.module is not None else None,
                    members[0],
                    members[1],
                    tuple((n, numbers[id(c)]) for n, c in node.children),
                    node.layer if torch_view else None,
                    node.registry,
                    torch_children,
                )
            )
        sizes = tuple(tuple(leaves[i].shape) for i in leaf_index)
    except (LookupError, AttributeError):
        return None
    return Skeleton(tuple(shapes), tuple(slots), tuple(leaf_index), sizes, torch_view)


class _Resolver:
    """The bound modules of one call's tree, found on demand: `module.bind(variables)` once,
    then the modules on the way to a path set up (as flax sets them up: lazily)."""

    def __init__(self, module: nn.Module, variables: Mapping[str, Any]) -> None:
        self.module = module
        self.variables = variables
        self.found: dict[tuple[str, ...], nn.Module] = {}

    def at(self, path: tuple[str, ...]) -> nn.Module | None:
        if not self.found:
            self.found[()] = self.module.bind(self.variables)
        if path in self.found:
            return self.found[path]
        if not path:
            return None
        parent = self.at(path[:-1])
        if parent is None:
            return None
        ensure_setup(parent)
        for child in _submodules(parent):
            if child.scope is not None:
                self.found.setdefault(tuple(child.scope.path), child)
        return self.found.get(path)


def _submodules(mod: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    if isinstance(mod, Module):
        out += [child for _, child in field_children(mod)]
        out += [child for child in registry_of(mod).modules.values() if child is not None]
    for attr, value in list(vars(mod).items()):
        if attr not in ("parent", "scope", "name"):
            out += [child for _, child in modules_in(value, attr)]
    return out


class LazyNode(Node):
    """A re-filled node: its bound module is found when first asked for."""

    _resolve: Callable[[tuple[str, ...]], Any] | None = None

    @property  # type: ignore[override]
    def module(self) -> Any:
        value = self.__dict__.get("_module", _MISSING)
        if value is _MISSING:
            resolve = self._resolve
            value = resolve(self.path) if resolve is not None else None
            self.__dict__["_module"] = value
        return value

    @module.setter
    def module(self, value: Any) -> None:
        if value is not _MISSING:
            self.__dict__["_module"] = value

    def __repr__(self) -> str:
        return f"LazyNode({self.path!r}, {self.type_name})"


def refill(
    skeleton: Skeleton, values: list[Any], module: nn.Module, variables: Mapping[str, Any]
) -> Node:
    """The `Node` tree of `skeleton` with this call's `values` (from `values_of`)."""
    resolver = _Resolver(module, variables)
    slots = skeleton.slots
    nodes: list[Node] = []
    for shape in skeleton.nodes:
        if skeleton.torch_view:
            node = Node(shape.path, shape.layer, shape.type_name)
        else:
            node = LazyNode(shape.path, _MISSING, shape.type_name)
            if shape.module_type is not None:
                node._resolve = resolver.at
            else:
                node.module = None
        node.parameters = [(n, slots[i], values[i]) for n, i in shape.parameters]
        node.buffers = [(n, slots[i], values[i]) for n, i in shape.buffers]
        nodes.append(node)
    for shape, node in zip(skeleton.nodes, nodes):
        node.children = [(n, nodes[i]) for n, i in shape.children]
        node.registry = shape.registry
        if skeleton.torch_view:
            node.layer = shape.layer
            if shape.torch_children is not None:
                node.torch_children = [(n, nodes[i]) for n, i in shape.torch_children]
    return nodes[0]


class Listing:
    """The state API's listings of a cached tree with one call's values, made without any
    node: the orders come from the core's walks (`state_entries`, `named_members`) over the
    skeleton's template, once per skeleton and arguments."""

    def __init__(self, skeleton: Skeleton, values: list[Any]) -> None:
        self.skeleton = skeleton
        self.values = values

    def entries(self, prefix: str) -> list[tuple[str, Slot, Any]]:
        """`state_entries(root, prefix)`: (key, slot, value) of every state_dict entry."""
        order = self.skeleton.remember(
            ("entries", prefix),
            lambda: [(k, s, i) for k, s, i in state_entries(self.skeleton.template(), prefix)],
        )
        values = self.values
        return [(k, s, values[i]) for k, s, i in order]

    def state_dict(self, prefix: str) -> dict[str, Any]:
        order = self.skeleton.remember(
            ("entries", prefix),
            lambda: [(k, s, i) for k, s, i in state_entries(self.skeleton.template(), prefix)],
        )
        values = self.values
        return {k: values[i] for k, _, i in order}

    def members(
        self, kind: str, prefix: str, recurse: bool, remove_duplicate: bool
    ) -> Iterator[tuple[str, Any]]:
        """`named_members(root, kind, ...)`."""
        args = (kind, prefix, recurse, remove_duplicate)
        order = self.skeleton.remember(
            ("members", *args), lambda: list(named_members(self.skeleton.template(), *args))
        )
        values = self.values
        return iter([(name, values[i]) for name, i in order])

    def added_later(self, metadata: Mapping[str, Any] | None) -> list[str]:
        """`_node.added_later(root, metadata)`: the keys a state dict may lack."""
        added = self.skeleton.remember("added", self._added)
        out = []
        for prefix, table in added:
            info = metadata.get(prefix[:-1], {}) if metadata is not None else {}
            version = info.get("version") if isinstance(info, Mapping) else None
            out += [prefix + n for n, since in table.items() if version is None or version < since]
        return out

    def _added(self) -> list[tuple[str, Mapping[str, int]]]:
        nodes = self.skeleton.nodes
        out: list[tuple[str, Mapping[str, int]]] = []

        def walk(i: int, prefix: str) -> None:  # as `_node.added_later`: every alias
            table = getattr(nodes[i].module_type, "_added_in_version", None)
            if table:
                out.append((prefix, table))
            for name, child in nodes[i].children:
                walk(child, prefix + name + ".")

        walk(0, "")
        return out

    def buffers(self) -> list[tuple[str, Slot, Any]]:
        """The buffers of every distinct module (`named_modules` without duplicates)."""
        order = self.skeleton.remember(
            "buffers",
            lambda: [
                member
                for _, node in named_modules(self.skeleton.template(), None, "", True)
                for member in node.buffers
            ],
        )
        values = self.values
        return [(n, s, values[i]) for n, s, i in order]
