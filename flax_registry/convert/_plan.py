"""The conversion plan: every torch key of a Flax model, the variables behind it, the layout.

`make_plan` walks the module tree's torch view (read by the module's front-end over abstract
variables, once) in PyTorch's `state_dict` order. Registry modules (`flax_registry.Module`)
map by identity (their registered names are torch's); any other layer maps by the rule of
its TYPE. Types come from the front-end: bound setup-defined submodules, or, for compact
modules whose layers exist only inside `__call__`, the layers recorded while `init` ran on
the example inputs under `jax.eval_shape`. Nothing is allocated.

Names come from the torch view (see `flax_registry._linen.tree`): attribute names with torch's
container names (`layers_0` -> `layers.0`), an explicit `name=` kept (`[Layer(name=str(i))
...]` under `layer` is `layer.0`, as in the PyTorch twin), compact layers under their flax
names, and a module shared by two parents under each (one variable, aliased keys).

Modules without a rule: a `flax_registry.Module` maps by its registered names; any other
module's own variables (raw `self.param(...)` / `self.variable(...)`) map to the torch key of
the same dotted path, unchanged, provided no two of the variable's axes have the same length
(> 1). Then no transpose of it has the same shape, so a layout difference cannot pass the
shape check; a variable with two equal axes (a square 2-D matrix) is refused, naming the
rule that fixes it, because its layout cannot be told from its shape. A variable called
`kernel` is refused too (flax's name for a weight in its (in, out) layout), and so are flax's
own layers without a rule: their conventions (`kernel`, `scale`) are not torch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import _nested
from .._frontend import Frontend, frontend_of
from .._inputs import Inputs, as_inputs
from .._node import Member, Node, all_slots
from ._layout import IDENTITY, Layout
from ._rules import Rule, find_rule

IGNORED_COLLECTIONS = ("intermediates", "cache", "losses")
"""Collections that are not module state (sown values, decoding caches): never converted."""

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
_EMPTY = (
    "{cls} has no variables to convert: {why}. Pass example_inputs=(x,) (the inputs "
    "{cls}.init needs) or variables= (an abstract or concrete variables tree)."
)


@dataclasses.dataclass(frozen=True)
class Part:
    """One flax variable behind a torch key."""

    collection: str
    path: tuple[str, ...]  # full path inside the collection
    layout: Layout
    leaf: Any  # the target leaf: jax.ShapeDtypeStruct or a concrete array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.leaf.shape)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.layout.torch_shape(self.shape)

    @property
    def where(self) -> str:
        return "/".join((self.collection, *self.path))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor: the concatenation along torch axis `axis` of its parts. `layer` is
    the type of the layer it comes from; `raw` marks a variable of a layer without a rule,
    mapped unchanged."""

    key: str
    parts: tuple[Part, ...]
    axis: int = 0
    layer: str = ""
    raw: bool = False
    added_in: int | None = None  # a buffer added in this module `_version` (see Module)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        shapes = [p.torch_shape for p in self.parts]
        if len(shapes) == 1:
            return shapes[0]
        total = sum(s[self.axis] for s in shapes)
        return (*shapes[0][: self.axis], total, *shapes[0][self.axis + 1 :])


@dataclasses.dataclass
class Plan:
    """Every torch key of a model, in `state_dict` order."""

    cls: str
    target: dict[str, Any]  # the variables tree the plan was made from
    entries: dict[str, Entry] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # alias -> canonical key
    extras: dict[str, tuple[np.ndarray, str]] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)
    nonpersistent: dict[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    frontend: Frontend | None = dataclasses.field(default=None, repr=False)
    inputs: Inputs | None = None
    _owners: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)

    def add(
        self,
        key: str,
        parts: tuple[Part, ...],
        axis: int = 0,
        layer: str = "",
        raw: bool = False,
        added_in: int | None = None,
    ) -> None:
        ident = (axis, *((p.collection, p.path) for p in parts))
        if key in self.entries or key in self.aliases:
            return  # reached twice under one name (a shared module): one key
        if ident in self._owners:  # a tied parameter or a shared module: the same variables
            self.aliases[key] = self._owners[ident]
        else:
            self.entries[key] = Entry(key, parts, axis, layer, raw, added_in)
            self._owners[ident] = key
        self.order.append(key)

    def tie(self, alias: str, canonical: str) -> None:
        if canonical not in self.entries:
            raise KeyError(
                f"tied={{{alias!r}: {canonical!r}}}: {canonical!r} is not a key of {self.cls}; "
                f"its keys are {list(self.entries)[:20]}."
            )
        self.aliases[alias] = canonical
        if alias not in self.order:
            self.order.append(alias)


def _ambiguous(shape: tuple[int, ...]) -> bool:
    """Two axes of the same length (> 1): a transpose of the variable has its shape."""
    long = [d for d in shape if d > 1]
    return len(set(long)) < len(long)


class _Walker:
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


def make_plan(
    module: Any,
    variables: Any = None,
    example_inputs: Any = None,
    rules: Mapping[type, Rule] | None = None,
    tied: Mapping[str, str] | None = None,
) -> Plan:
    """The conversion plan of `module` (unbound), from abstract shapes or `variables`."""
    frontend = frontend_of(module)
    error = frontend.bound_error(module)
    if error:
        raise TypeError(error)
    cls = frontend.display_name(module)
    inputs = as_inputs(example_inputs)
    shapes: dict[str, Any] | None = None
    records: Any = {}
    if frontend.holds_state and variables is None:
        variables = frontend.variables_of(module)  # abstract for an `nnx.eval_shape` model
    elif inputs is not None:
        shapes, records = frontend.record_layers(module, inputs)
    else:
        records = frontend.remembered(module)
    if variables is not None:
        frontend.check_variables(module, variables, shapes)
        target = dict(variables)
    elif shapes is not None:
        target = shapes
    else:
        target = dict(frontend.abstract_variables(module))
    target = {c: v for c, v in target.items() if c not in IGNORED_COLLECTIONS}
    if not any(True for c in target.values() for _ in _nested.leaves(c)):
        why = (
            "init without inputs created none (flax layers such as nn.Dense create their "
            "variables when first called, in __call__)"
            if variables is None
            else "the variables passed are empty"
        )
        raise ValueError(_EMPTY.format(cls=cls, why=why))
    plan = Plan(cls, target, frontend=frontend, inputs=inputs)
    root = frontend.tree(module, target, records=records, torch_view=True)
    _Walker(plan, frontend, rules).visit(root, "")
    for alias, canonical in (tied or {}).items():
        plan.tie(alias, canonical)
    covered = {(p.collection, p.path) for e in plan.entries.values() for p in e.parts}
    covered |= set(plan.nonpersistent.values())
    uncovered = [
        "/".join((c, *path))
        for c, tree in target.items()
        for path, _ in _nested.leaves(tree)
        if (c, path) not in covered
    ]
    if uncovered:
        raise ValueError(
            f"{cls}: no torch key maps to flax variable(s) {uncovered}; their layers were "
            "not reached by the module walk. Report this with the model definition."
        )
    return plan
