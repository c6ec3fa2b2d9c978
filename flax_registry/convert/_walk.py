"""The module walk behind `make_plan`: the torch keys of every module, by rule or by name.

Walks the module tree's torch view in PyTorch's `state_dict` order (see `_plan` for how
names and rules are chosen) and adds each torch key to the `Plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._frontend import Frontend
from .._node import Member, Node, all_slots
from ._entries import Part, Plan
from ._layout import IDENTITY
from ._rules import Rule, find_rule

_NO_TYPE = (
    "cannot convert flax scope '{path}' (variables {vars}): it was created inside a compact "
    "__call__, so its layer type is unknown and no rule can be picked. Pass example_inputs=(x,) "
    "(the inputs {cls}.init needs) so that the layer types can be recorded."
)
_NO_RULE = (
    "no conversion rule for {type} at flax scope '{path}' (its variables {vars}). Register one: "
    "flax_registry.convert.register_rule({type}, Rule(Map('weight', 'kernel', layout=LINEAR), "
    "...)), or pass rules={{{type}: ...}}; Rule(Map('<torch name>', '<flax name>')) maps a "
    "variable unchanged."
)
FLAX_LAYOUT_NAMES = ("kernel",)
"""Variable names that, in flax, denote a weight in flax's own layout (`kernel`: (in, out),
where torch keeps (out, in)): a layer without a rule that has one is refused, not loaded."""

_FLAX_NAMED = (
    "Its variable '{name}' is named as flax names weights it keeps in its own layout (a "
    "kernel is (..., in, out) where torch keeps (out, in, ...)), so it is not loaded "
    "unchanged; Rule(Map('{name}', '{name}')) says that it is stored exactly as in torch."
)
_AMBIGUOUS = (
    "cannot convert flax variable '{where}' of {type} (a layer with no conversion rule): its "
    "shape {shape} has two axes of the same length, so it may be stored in torch's order or "
    "transposed, and loading it unchanged could put every value in the wrong place. State "
    "its layout with a rule: flax_registry.convert.register_rule({type}, Rule(Map('<torch "
    "name>', '{name}', layout=LINEAR))) for a (in, out) kernel that torch keeps as (out, in), "
    "or Rule(Map('{name}', '{name}')) if it is stored exactly as in torch (or pass "
    "rules={{{type}: ...}} for one call)."
)
_LEFTOVER = (
    "the rule for {type} at flax scope '{path}' maps no torch key to flax variable(s) {vars}. "
    "Fix the rule (every variable of the layer needs a Map), or register a rule for {type}."
)


def _ambiguous(shape: tuple[int, ...]) -> bool:
    """Two axes of the same length (> 1): a transpose of the variable has its shape."""
    long = [d for d in shape if d > 1]
    return len(set(long)) < len(long)


class Walker:
    def __init__(self, plan: Plan, frontend: Frontend, rules: Mapping[type, Rule] | None) -> None:
        self.plan = plan
        self.frontend = frontend
        self.rules = rules
        self.active: list[tuple[str, ...]] = []

    def visit(self, node: Node, prefix: str) -> None:
        if node.path in self.active:  # a module that holds one of its ancestors
            return
        self.active.append(node.path)
        try:
            self._visit(node, prefix)
        finally:
            self.active.pop()

    def _visit(self, node: Node, prefix: str) -> None:
        layer = node.layer
        rule = find_rule(type(layer), self.rules) if layer is not None else None
        if rule is not None:
            self.apply_rule(node, prefix, layer, rule)
        elif node.registry:
            self.identity(node, prefix)
        else:
            own = node.parameters + node.buffers
            if own:
                where = "/".join(node.path) or "<root>"
                names = ["/".join((s.collection, *s.path[len(node.path) :])) for _, s, _ in own]
                if layer is None:
                    raise ValueError(_NO_TYPE.format(path=where, vars=names, cls=self.plan.cls))
                if self.frontend.is_library_layer(layer):
                    raise ValueError(
                        _NO_RULE.format(type=type(layer).__name__, path=where, vars=names)
                    )
                self.raw(own, prefix, type(layer).__name__, where)
            self.children(node, prefix, set())

    def raw(self, own: list[Member], prefix: str, layer: str, where: str) -> None:
        """A layer without a rule: each own variable under its own name, unchanged."""
        names = [s.collection + "/" + name for name, s, _ in own]
        for name, _, _ in own:
            if name in FLAX_LAYOUT_NAMES:
                raise ValueError(
                    _NO_RULE.format(type=layer, path=where, vars=names)
                    + " "
                    + _FLAX_NAMED.format(name=name)
                )
        for name, slot, value in own:
            shape = tuple(value.shape)
            if _ambiguous(shape):
                where = "/".join((slot.collection, *slot.path))
                raise ValueError(_AMBIGUOUS.format(where=where, type=layer, shape=shape, name=name))
            part = Part(slot.collection, slot.path, IDENTITY, value)
            self.plan.add(prefix + name, (part,), layer=layer, raw=True)

    def identity(self, node: Node, prefix: str) -> None:
        layer = node.type_name
        added = getattr(type(node.module), "_added_in_version", {})
        for name, slot, value in node.parameters:
            self.plan.add(
                prefix + name, (Part(slot.collection, slot.path, IDENTITY, value),), 0, layer
            )
        for name, slot, value in node.buffers:
            if slot.persistent:
                part = Part(slot.collection, slot.path, IDENTITY, value)
                self.plan.add(prefix + name, (part,), 0, layer, added_in=added.get(name))
            else:
                self.plan.nonpersistent[prefix + name] = (slot.collection, slot.path)
        self.children(node, prefix, set())

    def apply_rule(self, node: Node, prefix: str, layer: Any, rule: Rule) -> None:
        base = len(node.path)
        variables: dict[tuple[str, tuple[str, ...]], Any] = {}
        for _, slot, value in all_slots(node):
            variables[(slot.collection, slot.path[base:])] = value
        tensors, extras = rule.expand(layer, variables)
        used: set[tuple[str, tuple[str, ...]]] = set()
        name = type(layer).__name__
        for t in tensors:
            parts = []
            for p in t.parts:
                used.add((p.collection, p.path))
                leaf = variables[(p.collection, p.path)]
                parts.append(Part(p.collection, (*node.path, *p.path), p.layout, leaf))
            self.plan.add(prefix + t.torch, tuple(parts), t.axis, name)
        for e in extras:
            if prefix + e.torch not in self.plan.extras:
                self.plan.extras[prefix + e.torch] = (e.value, e.reason)
                self.plan.order.append(prefix + e.torch)
        touched = {path[0] for _, path in used if len(path) > 1}
        leftover = [
            "/".join((c, *p))
            for c, p in variables
            if (c, p) not in used and (len(p) == 1 or p[0] in touched)
        ]
        if leftover:
            where = "/".join(node.path) or "<root>"
            raise ValueError(_LEFTOVER.format(type=name, path=where, vars=leftover))
        self.children(node, prefix, touched)

    def children(self, node: Node, prefix: str, consumed: set[str]) -> None:
        """Visit the torch-view children, except the child scopes a rule consumed."""
        for torch_name, child in node.torch_children or ():
            own_scope = child.path[:-1] == node.path
            if own_scope and child.path[-1] in consumed:
                continue
            self.visit(child, prefix + torch_name + ".")
