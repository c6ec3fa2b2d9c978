"""Reading an NNX model into the core's `Node` tree, and its variables dict.

An NNX module holds its variables as attributes. The tree lists, per module, its parameters
(`nnx.Param`) and then its buffers (`Buffer`, `nnx.BatchStat` and every other variable type
but RNG state), then its children, as PyTorch orders a module's state. Order: a
`flax_registry.nnx.Module` records assignment order (NNX itself sorts attributes whenever it
splits and merges a model); flax's own layers have their definition order from a table; any
other module lists its attributes in the order the object has them. A list or dict attribute
gives PyTorch's container names (`layers.0`, `heads.q`). An object reached twice (a shared
submodule, a tied `nnx.Param`) is one node or one slot, as in PyTorch's listings. A
`LinenLayer` (a `flax_registry.nn` layer lifted into NNX) is read by the linen front-end.

The core's variables dict for an NNX model is `{collection: tree}` keyed by these paths;
`handles` maps each `(collection, path)` to the NNX variable holding it, for writing back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from .. import _nested
from .._node import Node
from .._registry import Kind, Slot
from .lifted import LinenLayer, plain
from .module import ORDER
from .module import Module as RegistryModule
from .variables import collection_of, is_parameter, is_rng_state, metadata

Ident = tuple[str, tuple[str, ...]]

# Flax's own NNX layers, in their definition order (the object may hold them sorted).
_NNX_ORDER: dict[type, tuple[str, ...]] = {
    nnx.Linear: ("kernel", "bias"),
    nnx.LinearGeneral: ("kernel", "bias"),
    nnx.Conv: ("kernel", "bias"),
    nnx.ConvTranspose: ("kernel", "bias"),
    nnx.Embed: ("embedding",),
    nnx.BatchNorm: ("scale", "bias", "mean", "var"),
    nnx.LayerNorm: ("scale", "bias"),
    nnx.GroupNorm: ("scale", "bias"),
    nnx.RMSNorm: ("scale",),
    nnx.MultiHeadAttention: ("query", "key", "value", "out", "query_ln", "key_ln"),
}


Orders = dict[tuple[str, ...], tuple[str, ...]]  # module path -> attribute names in order


@dataclasses.dataclass
class Read:
    """A model read once: its tree, its variables dict, where each variable lives, and the
    attribute order of each module (to read a merged copy of it in the same order)."""

    root: Node
    variables: dict[str, Any]
    handles: dict[Ident, Any]  # (collection, path) -> nnx.Variable
    orders: Orders


def read(
    model: nnx.Module,
    *,
    torch_view: bool = False,
    values: Mapping[str, Any] | None = None,
    orders: Orders | None = None,
) -> Read:
    """Read `model`; `values` (a variables dict) overrides the values it holds, `orders` the
    attribute order of its modules (NNX sorts attributes when it merges a model)."""
    builder = _Builder(torch_view, values, orders or {})
    root = builder.module_node(model, ())
    variables: dict[str, Any] = {}
    for (collection, path), value in builder.values.items():
        _nested.set_leaf(variables, (collection, *path), value)
    return Read(root, variables, builder.handles, builder.orders)


def _attributes(module: nnx.Module, hint: tuple[str, ...] | None) -> list[tuple[str, Any]]:
    names = [n for n in vars(module) if not n.startswith("_pytree__") and n != ORDER]
    order = vars(module).get(ORDER) or hint or _NNX_ORDER.get(type(module), ())
    rank = {name: i for i, name in enumerate(order)}
    names.sort(key=lambda n: rank.get(n, len(rank)))  # stable: the object's order otherwise
    return [(n, vars(module)[n]) for n in names]


def _items(value: Any, prefix: str) -> list[tuple[str, Any]]:
    """(torch name, item) of a container attribute: `layers.0`, `heads.q`."""
    if isinstance(value, nnx.List | list | tuple):
        return [(f"{prefix}.{i}", item) for i, item in enumerate(value)]
    if isinstance(value, nnx.Dict | dict):
        return [(f"{prefix}.{k}", item) for k, item in value.items()]
    return []


class _Builder:
    def __init__(self, torch_view: bool, values: Mapping[str, Any] | None, orders: Orders) -> None:
        self.torch_view = torch_view
        self.given = values
        self.hints = orders
        self.orders: Orders = {}
        self.nodes: dict[int, Node] = {}
        self.idents: dict[int, Ident] = {}
        self.handles: dict[Ident, Any] = {}
        self.values: dict[Ident, Any] = {}

    def module_node(self, module: nnx.Module, path: tuple[str, ...]) -> Node:
        if id(module) in self.nodes:
            return self.nodes[id(module)]
        if isinstance(module, LinenLayer):
            return self.linen_node(module, path)
        node = Node(path, module, type(module).__name__)
        self.nodes[id(module)] = node
        attributes = _attributes(module, self.hints.get(path))
        self.orders[path] = tuple(name for name, _ in attributes)
        for name, value in attributes:
            if isinstance(value, nnx.Variable):
                self.add_variable(node, name, value, (*path, name))
            elif isinstance(value, nnx.Module):
                node.children.append((name, self.module_node(value, (*path, name))))
            else:
                for torch_name, item in _items(value, name):
                    if isinstance(item, nnx.Module):
                        sub = (*path, *torch_name.split("."))
                        node.children.append((torch_name, self.module_node(item, sub)))
        if self.torch_view:
            node.layer = module
            node.registry = isinstance(module, RegistryModule)
            node.torch_children = list(node.children)
        return node

    def add_variable(self, node: Node, name: str, variable: Any, path: tuple[str, ...]) -> None:
        if is_rng_state(variable):
            return  # RNG state: neither a parameter nor a buffer
        ident = self.idents.get(id(variable))
        if ident is None:  # the first place it is reached owns it; others are aliases
            ident = (collection_of(variable), path)
            self.idents[id(variable)] = ident
            self.handles[ident] = variable
            self.values[ident] = self.value(ident, variable)
        kind: Kind = "parameter" if is_parameter(variable) else "buffer"
        slot = Slot(
            name,
            kind,
            ident[0],
            ident[1],
            persistent=bool(metadata(variable, "persistent", True)),
            trainable=bool(metadata(variable, "trainable", True)),
        )
        members = node.parameters if kind == "parameter" else node.buffers
        members.append((name, slot, self.values[ident]))

    def linen_node(self, layer: LinenLayer, path: tuple[str, ...]) -> Node:
        """A lifted linen layer: its tree from the linen front-end, moved under `path`."""
        from .._frontend import frontend_of

        variables = plain(layer.variables)
        inner = frontend_of(layer.definition).tree(
            layer.definition, variables, torch_view=self.torch_view
        )
        moved: dict[int, Node] = {}

        def move(n: Node) -> Node:
            if id(n) in moved:
                return moved[id(n)]
            out = Node(
                (*path, *n.path),
                n.module,
                n.type_name,
                layer=n.layer,
                registry=n.registry,
            )
            moved[id(n)] = out
            out.parameters = [self.moved_member(layer, m, path) for m in n.parameters]
            out.buffers = [self.moved_member(layer, m, path) for m in n.buffers]
            out.children = [(name, move(child)) for name, child in n.children]
            if n.torch_children is not None:
                out.torch_children = [(name, move(child)) for name, child in n.torch_children]
            return out

        node = move(inner)
        node.module = layer
        self.nodes[id(layer)] = node
        return node

    def moved_member(
        self, layer: LinenLayer, member: tuple[str, Slot, Any], path: tuple[str, ...]
    ) -> tuple[str, Slot, Any]:
        name, slot, _value = member
        ident = (slot.collection, (*path, *slot.path))
        variable: Any = layer.variables[slot.collection]
        for part in slot.path:
            variable = variable[part]
        if ident not in self.handles:
            self.handles[ident] = variable
            self.values[ident] = self.value(ident, variable)
        return name, dataclasses.replace(slot, path=ident[1]), self.values[ident]

    def value(self, ident: Ident, variable: Any) -> Any:
        if self.given is not None:
            given = _nested.get(self.given, (ident[0], *ident[1]), None)
            if given is not None:
                return given
        return variable.get_value()


def update(model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Write the values of a variables dict into the NNX variables of `model` (in place);
    leaves the dict lacks, or holds abstract, are left as they are."""
    import jax

    handles = read(model).handles
    for (collection, path), variable in handles.items():
        value = _nested.get(variables, (collection, *path), None)
        if value is not None and not isinstance(value, jax.ShapeDtypeStruct):
            variable.set_value(value)


def eval_shape(fn: Any, *args: Any, **kwargs: Any) -> nnx.Module:
    """`nnx.eval_shape(fn, *args, **kwargs)` (an abstract model: nothing allocated), with the
    values of its non-persistent buffers kept: they are in no checkpoint and no state dict, so
    a model restored or converted into must have them, as a PyTorch module computes them in
    `__init__`. They are computed by `fn` under `jax.jit` with everything else pruned away."""
    import jax

    model = nnx.eval_shape(fn, *args, **kwargs)
    found = read(model).root
    wanted = [
        (slot.collection, slot.path)
        for node in _all_nodes(found)
        for _, slot, _ in node.buffers
        if not slot.persistent
    ]
    if not wanted:
        return model

    def pick() -> dict[str, Any]:
        values = read(fn(*args, **kwargs)).variables
        out: dict[str, Any] = {}
        for collection, path in wanted:
            _nested.set_leaf(out, (collection, *path), _nested.get(values, (collection, *path)))
        return out

    update(model, jax.jit(pick)())
    return model


def _all_nodes(root: Node) -> list[Node]:
    seen: dict[int, Node] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen[id(node)] = node
            stack.extend(child for _, child in node.children)
    return list(seen.values())
