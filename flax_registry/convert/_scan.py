"""Scanned modules: L layers stacked on one axis of every variable, torch's `layers.{i}`.

An `nn.scan` / `nnx.scan` over a block keeps one array per variable with a layer axis
(`(L, ...)`); PyTorch keeps L submodules (`layers.0` ... `layers.{L-1}`). The module's subtree
is walked once, as one layer: a copy of it whose leaves lack the layer axis, under the torch
name `layers.{i}`, so every rule inside (by type or by path) sees one layer's shapes. The keys
of that walk are then repeated for each i, every part becoming the slice at index i of the
whole variable (`Part.select`). Nothing is read or allocated here.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax

from .._node import Node, all_slots
from ._entries import Part, Plan, ScanGroup, StackGroup
from ._rules import Scanned, describe, find_rule

if TYPE_CHECKING:
    from ._walk import Walker

_NO_AXIS = (
    "{rule} at torch '{torch}' (flax scope '{path}'): flax variable '{where}' has shape "
    "{shape}, which has no axis {axis} to hold the layers. A scanned module keeps every "
    "variable with a layer axis; check that the module at this path is the scanned one "
    "(nn.scan / nnx.scan), or give the right axis= ."
)
_LENGTHS = (
    "{rule} at torch '{torch}' (flax scope '{path}'): the variables disagree on the number of "
    "layers (the length of axis {axis}): {lengths}. Every variable of a scanned module holds "
    "the same L layers; check the axis= and the path the rule is given for."
)
_TEMPLATE = (
    "{rule} at torch '{torch}': the torch name of layer i must contain '{{i}}' (e.g. '{{i}}' "
    "for layers.0, layers.1, or 'layer.{{i}}'), got {template!r}."
)
_EMPTY_SCAN = (
    "{rule} at torch '{torch}' (flax scope '{path}'): the module has no variables, so it has "
    "no layers to unstack."
)


def _sliced_leaf(value: Any, axis: int) -> jax.ShapeDtypeStruct:
    shape = tuple(value.shape)
    return jax.ShapeDtypeStruct(shape[:axis] + shape[axis + 1 :], value.dtype)


def _one_layer(root: Node, axis: int) -> Node:
    """A copy of the subtree at `root` whose leaves lack axis `axis` (nodes outside it, such
    as a module shared from elsewhere, are kept as they are)."""
    memo: dict[int, Node] = {}

    def copy(node: Node) -> Node:
        if node.path[: len(root.path)] != root.path:
            return node
        if id(node) in memo:
            return memo[id(node)]
        out = dataclasses.replace(
            node,
            parameters=[(n, s, _sliced_leaf(v, axis)) for n, s, v in node.parameters],
            buffers=[(n, s, _sliced_leaf(v, axis)) for n, s, v in node.buffers],
            children=[],
            torch_children=None,
        )
        memo[id(node)] = out
        out.children = [(name, copy(child)) for name, child in node.children]
        if node.torch_children is not None:
            out.torch_children = [(name, copy(child)) for name, child in node.torch_children]
        return out

    return copy(root)


def _length(node: Node, prefix: str, scanned: Scanned) -> int:
    rule = describe(scanned)
    torch = prefix[:-1]
    path = "/".join(node.path) or "<root>"
    if "{i}" not in scanned.torch:
        raise ValueError(_TEMPLATE.format(rule=rule, torch=torch, template=scanned.torch))
    lengths: dict[int, list[str]] = {}
    for _, slot, value in all_slots(node):
        shape = tuple(value.shape)
        where = "/".join((slot.collection, *slot.path))
        if scanned.axis >= len(shape):
            raise ValueError(
                _NO_AXIS.format(
                    rule=rule, torch=torch, path=path, where=where, shape=shape, axis=scanned.axis
                )
            )
        lengths.setdefault(shape[scanned.axis], []).append(f"{where} {shape}")
    if not lengths:
        raise ValueError(_EMPTY_SCAN.format(rule=rule, torch=torch, path=path))
    if len(lengths) > 1:
        shown = {n: names[:3] for n, names in lengths.items()}
        raise ValueError(
            _LENGTHS.format(rule=rule, torch=torch, path=path, axis=scanned.axis, lengths=shown)
        )
    return next(iter(lengths))


def walk_scanned(walker: Walker, node: Node, prefix: str, scanned: Scanned) -> None:
    """Add the keys of the scanned module `node` (torch name `prefix`) for each of its layers."""
    if scanned.axis < 0:
        raise ValueError(
            f"{describe(scanned)}: axis must be >= 0 (the layer axis of every variable)"
        )
    length = _length(node, prefix, scanned)
    layer_prefix = prefix + scanned.torch + "."
    one = Plan(walker.plan.cls, {}, frontend=walker.plan.frontend)
    walker.fork(one).visit(
        _one_layer(node, scanned.axis), layer_prefix, _inner_rule(walker, node, scanned)
    )
    full = {(slot.collection, slot.path): value for _, slot, value in all_slots(node)}

    def lift(part: Part, i: int) -> Part:
        if part.path[: len(node.path)] != node.path:
            return part  # a variable from outside the scan: the same one in every layer
        leaf = full[(part.collection, part.path)]
        return dataclasses.replace(part, leaf=leaf, select=((scanned.axis, i), *part.select))

    layers: list[tuple[str, ...]] = []
    plan = walker.plan
    for i in range(length):
        named = prefix + scanned.torch.replace("{i}", str(i)) + "."

        def rename(key: str, named: str = named) -> str:
            assert key.startswith(layer_prefix), (key, layer_prefix)
            return named + key[len(layer_prefix) :]

        keys = []
        for key in one.order:
            if key in one.entries or key in one.aliases:
                e = one.entries[one.aliases.get(key, key)]
                parts = tuple(lift(p, i) for p in e.parts)
                plan.add(rename(key), parts, e.axis, e.layer, e.raw, e.added_in, e.rule)
                if key in one.entries:
                    keys.append(rename(key))
            elif key in one.extras and rename(key) not in plan.extras:
                plan.extras[rename(key)] = one.extras[key]
                plan.order.append(rename(key))
        for key, ident in one.nonpersistent.items():
            plan.nonpersistent[rename(key)] = ident
        for g in one.stacks:
            where = rename(g.where + ".")[:-1]
            plan.stacks.append(StackGroup(g.rule, where, g.variable, tuple(map(rename, g.keys))))
        for s in one.scans:  # a scan inside the scan
            inner = rename(s.prefix + ".")[:-1]
            renamed = tuple(tuple(map(rename, keys_)) for keys_ in s.layers)
            plan.scans.append(ScanGroup(s.rule, inner, s.template, renamed))
        layers.append(tuple(keys))
    plan.scans.append(ScanGroup(describe(scanned), prefix[:-1], scanned.torch, tuple(layers)))


def _inner_rule(walker: Walker, node: Node, scanned: Scanned) -> Any:
    """The rule of one layer: the Scanned's own, else the layer type's (unless that is the
    Scanned itself, registered for the type), else none (by name and children)."""
    if scanned.rule is not None:
        return scanned.rule
    found = find_rule(type(node.layer), walker.rules) if node.layer is not None else None
    return None if isinstance(found, Scanned) else found
